"""Side-by-side timing of ours vs. a peer, as ../shared/BENCHMARKING.md asks.

Machines here are noisy, so a time only means something beside its peer's: both callables run interleaved
(A B A B ...) after warm-ups in one process, and we report each median and the ratio ours/peer.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Comparison:
    name: str
    workload: str
    ours_ms: float
    peer_ms: float

    @property
    def ratio(self) -> float:
        return self.ours_ms / self.peer_ms

    def row(self) -> str:
        return (
            f"| {self.name} | {self.workload} | {self.ours_ms:.2f} | {self.peer_ms:.2f} | {self.ratio:.2f} |"
        )


TABLE_HEADER = "| case | workload | ours ms | peer ms | ours/peer |\n|---|---|---|---|---|"


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1000.0


def compare(
    name: str,
    workload: str,
    ours: Callable[[], object],
    peer: Callable[[], object],
    device: torch.device,
    repeats: int = 7,
    warmup: int = 2,
) -> Comparison:
    """Median milliseconds of `ours` and `peer`, run interleaved after `warmup` calls of each."""
    for _ in range(warmup):
        ours()
        peer()
    ours_times, peer_times = [], []
    for _ in range(repeats):
        ours_times.append(_timed(ours, device))
        peer_times.append(_timed(peer, device))
    return Comparison(name, workload, statistics.median(ours_times), statistics.median(peer_times))


def machine_description(threads: int) -> str:
    """One line naming the CPU, core count, thread count and library versions, for BENCHMARK.md."""
    import torchvision

    cpu = platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return (
        f"{cpu}, {os.cpu_count()} cores, {threads} threads; "
        f"torch {torch.__version__}, torchvision {torchvision.__version__}"
    )


def model_benchmark_parser(doc: str | None) -> argparse.ArgumentParser:
    """The arguments every whole-model benchmark takes (threads, image size, repeats, batch), so the tools'
    figures are asked for and read the same way."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1067)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each side (median reported)")
    parser.add_argument("--ims_per_batch", type=int, default=1, help="images per training iteration")
    return parser
