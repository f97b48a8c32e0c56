#!/usr/bin/env python3
"""The last lines of `make demo`: how long its four steps took and the COCO AP that test_net.py measured.

    python tools/demo_summary.py Outputs/demo

Reads DEMO_DIR/started (Unix time written by `make demo` before its first step) and
DEMO_DIR/test/evaluation.json (written by test_net.py). The demo promises box AP >= 0.50 and mask AP >= 0.45
on shapes_val; a result below that is said plainly.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

PROMISED_AP = {"bbox": ("box", 0.50), "segm": ("mask", 0.45)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("demo_dir", type=Path, help="the demo's output folder (make demo's DEMO_DIR)")
    return parser.parse_args(argv)


def read_text(path: Path, what: str) -> str:
    if not path.is_file():
        raise SystemExit(f"{path} does not exist: {what}")
    return path.read_text()


def summary_lines(elapsed_s: float, evaluation: dict) -> list[str]:
    """'<m> min <s> s' for the demo, then one AP line per evaluated dataset, checked against the promise."""
    minutes, seconds = divmod(round(elapsed_s), 60)
    lines = [f"make demo: dataset, training, test_net and infer_simple took {minutes} min {seconds} s"]
    for dataset, tasks in evaluation.items():
        missing = sorted(set(PROMISED_AP) - set(tasks))
        if missing:
            raise SystemExit(f"the evaluation of {dataset} has no {missing} figures (it has {sorted(tasks)})")
        figures = [f"{label} AP {tasks[task]['AP']:.3f}" for task, (label, _) in PROMISED_AP.items()]
        short = [f"{label} AP {tasks[task]['AP']:.3f} < {floor:.2f}"
                 for task, (label, floor) in PROMISED_AP.items() if tasks[task]["AP"] < floor]
        verdict = f"BELOW the demo's promise: {', '.join(short)}" if short else "promised: box >= 0.50, mask >= 0.45"
        lines.append(f"{dataset}: {', '.join(figures)}; {verdict}")
    return lines


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started_file = args.demo_dir / "started"
    started = read_text(started_file, "make demo writes the time there before its first step").strip()
    if not started.isdigit():
        raise SystemExit(f"{started_file} holds {started[:40]!r}, expected the Unix time in seconds (date +%s)")
    evaluation_file = args.demo_dir / "test" / "evaluation.json"
    evaluation = json.loads(read_text(evaluation_file, "tools/test_net.py writes it"))
    for line in summary_lines(time.time() - int(started), evaluation):
        print(line)


if __name__ == "__main__":
    main()
