"""Training progress a person can follow: console lines, a JSON-lines metrics file, tensorboardX scalars."""

from __future__ import annotations

import datetime
import json
import math
import re
import resource
import statistics
from collections import defaultdict, deque
from pathlib import Path
from typing import Callable, Mapping

import torch

METRICS_FILE = "metrics.json"


class SmoothedValue:
    """Median over a sliding window (as Detectron's logs show), plus the global average."""

    def __init__(self, window: int = 20):
        self.window: deque[float] = deque(maxlen=window)
        self.total = 0.0
        self.count = 0

    def add(self, value: float) -> None:
        """Record `value`; a non-finite one (an AMP step that was skipped) is left out of the statistics."""
        if not math.isfinite(value):
            return
        self.window.append(value)
        self.total += value
        self.count += 1

    @property
    def median(self) -> float:
        return statistics.median(self.window) if self.window else 0.0

    @property
    def global_avg(self) -> float:
        return self.total / max(self.count, 1)


def peak_memory_mb() -> float:
    """Peak CUDA memory allocated when on GPU, else the process's peak resident memory."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


_FPN_LEVEL = re.compile(r"_fpn\d+$")


def sum_fpn_levels(values: Mapping[str, float]) -> dict[str, float]:
    """Per-FPN-level losses (loss_rpn_cls_fpn2 ...) summed under their common name, for a readable line."""
    summed: dict[str, float] = {}
    for name, value in values.items():
        key = _FPN_LEVEL.sub("", name)
        summed[key] = summed.get(key, 0.0) + value
    return summed


class TrainingLogger:
    """Smooths per-step values and reports them every `disp_interval` steps.

    Console: step, total and each loss (per-FPN-level losses summed), lr, time/iter, data time, ETA, memory.
    `metrics.json` in `output_dir` gets one JSON object per reported step with every loss (and one per
    evaluation); tensorboardX gets the same scalars when `use_tfboard`.
    """

    def __init__(
        self,
        output_dir: str | Path | None,
        max_iter: int,
        disp_interval: int = 20,
        use_tfboard: bool = False,
        print_fn: Callable[[str], None] = print,
    ):
        self.max_iter = max_iter
        self.disp_interval = max(disp_interval, 1)
        self.print = print_fn
        self.values: dict[str, SmoothedValue] = defaultdict(SmoothedValue)
        self.metrics_path = Path(output_dir) / METRICS_FILE if output_dir else None
        self.tb_writer = None
        if self.metrics_path:
            self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        if use_tfboard and output_dir:
            from tensorboardX import SummaryWriter

            self.tb_writer = SummaryWriter(str(Path(output_dir) / "tensorboard"))

    def log_step(
        self, step: int, losses: Mapping[str, float], lr: float, iter_time: float, data_time: float
    ) -> None:
        """Record one optimizer step (0-based `step`); report when the interval or the last step is reached."""
        for name, value in losses.items():
            self.values[name].add(float(value))
        self.values["time"].add(iter_time)
        self.values["data_time"].add(data_time)
        last = step + 1 == self.max_iter
        if (step + 1) % self.disp_interval and not last:
            return
        loss_values = {name: self.values[name].median for name in losses}
        time_per_iter = self.values["time"].median
        eta = datetime.timedelta(seconds=int(time_per_iter * (self.max_iter - step - 1)))
        memory = peak_memory_mb()
        total = loss_values.get("loss", sum(v for k, v in loss_values.items() if k.startswith("loss")))
        parts = [f"loss {total:.4f}"] + [f"{k} {v:.4f}" for k, v in sum_fpn_levels(loss_values).items() if k != "loss"]
        self.print(
            f"[step {step + 1}/{self.max_iter}] " + ", ".join(parts)
            + f" | lr {lr:.6f} | {time_per_iter:.3f}s/it (data {self.values['data_time'].median:.3f}s)"
            + f" | eta {eta} | mem {memory:.0f}MB"
        )
        record = {"step": step + 1, **loss_values, "lr": lr, "time": time_per_iter,
                  "data_time": self.values["data_time"].median, "eta_seconds": eta.total_seconds(),
                  "memory_mb": memory}
        self._write(record)

    def log_eval(self, step: int, metrics: Mapping[str, float]) -> None:
        """Evaluation figures (e.g. {'bbox/AP': 0.61}) at `step` (1-based, as printed)."""
        self.print(f"[step {step}] evaluation: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        self._write({"step": step, **{f"eval/{k}": v for k, v in metrics.items()}})

    def _write(self, record: dict) -> None:
        if self.metrics_path:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.tb_writer:
            for key, value in record.items():
                if key != "step":
                    self.tb_writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.tb_writer:
            self.tb_writer.close()


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.json file, in order."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
