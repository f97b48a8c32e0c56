"""``<output_dir>/log.txt``: everything a run prints (stdout, stderr, logging, the final traceback) also goes
to a file, appended to when a run is resumed into the same folder. Only rank 0 keeps one."""

from __future__ import annotations

import io
import logging
import sys
import traceback
from pathlib import Path
from typing import TextIO


class _Tee(io.TextIOBase):
    """A text stream writing to the console stream and to the log file."""

    def __init__(self, console: TextIO, log: TextIO):
        self.console = console
        self.log = log

    def write(self, text: str) -> int:
        self.console.write(text)
        self.log.write(text)
        self.log.flush()
        return len(text)

    def flush(self) -> None:
        self.console.flush()
        self.log.flush()

    def isatty(self) -> bool:
        return self.console.isatty()

    def fileno(self) -> int:
        return self.console.fileno()


class ConsoleLog:
    """Context manager teeing the console into `path` (None = nothing, for ranks other than 0)."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path is not None else None
        self._file: TextIO | None = None
        self._saved: tuple[TextIO, TextIO] | None = None
        self._handler: logging.Handler | None = None

    def __enter__(self) -> ConsoleLog:
        if self.path is None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")
        self._saved = (sys.stdout, sys.stderr)
        sys.stdout = _Tee(sys.stdout, self._file)
        sys.stderr = _Tee(sys.stderr, self._file)
        # logging handlers configured earlier hold the original streams: give the root logger the file too
        self._handler = logging.StreamHandler(self._file)
        self._handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(self._handler)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._file is None:
            return
        if exc is not None:
            self._file.write("".join(traceback.format_exception(exc_type, exc, tb)))
        logging.getLogger().removeHandler(self._handler)
        sys.stdout, sys.stderr = self._saved
        self._file.close()
        self._file = None
