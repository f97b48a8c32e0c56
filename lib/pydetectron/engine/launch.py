"""Starting a distributed run: under torchrun, or detectron2-style with --num-gpus / --num-machines.

* ``torchrun --nproc_per_node N tool.py ...``: torchrun starts one process per device and sets RANK,
  WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT; each process joins the group through ``env://``.
* ``tool.py --num-gpus N [--num-machines M --machine-rank R --dist-url tcp://HOST:PORT]``: this module spawns
  N local processes with ``torch.multiprocessing`` (as detectron2's ``launch`` does); rank = R x N + local rank.

The group uses NCCL when the processes train on GPUs and gloo on the CPU, with a timeout (``--dist-timeout``).
A watchdog thread in every process keeps a heartbeat in the group's key-value store: a rank that raises
records its error there, and a rank that dies stops beating; every other rank then prints which rank failed
and exits non-zero (within the heartbeat timeout) instead of waiting in a collective that can never finish.
"""

from __future__ import annotations

import argparse
import datetime
import os
import pickle
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

from pydetectron.utils.distributed import synchronize

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
POLL_SECONDS = 1.0
WATCHDOG_EXIT_CODE = 75  # a rank that stops because another failed (launch() then names that other one)
MAX_HEARTBEAT_TIMEOUT = 60.0


class DistributedRunError(RuntimeError):
    """A process of a spawned run failed; the message names its rank."""


@dataclass
class LaunchSettings:
    """detectron2's launch flags (see ``add_launch_args``)."""

    num_gpus: int = 1
    num_machines: int = 1
    machine_rank: int = 0
    dist_url: str = "auto"
    timeout_s: float = 1800.0
    use_cuda: bool = True

    @property
    def world_size(self) -> int:
        return self.num_gpus * self.num_machines

    @property
    def heartbeat_timeout_s(self) -> float:
        """How long a silent rank is waited for before the others give up on it."""
        return min(self.timeout_s, MAX_HEARTBEAT_TIMEOUT)


def add_launch_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "distributed", "run under `torchrun --nproc_per_node N` (any machine count, torchrun's flags), or let the "
        "tool start its processes detectron2-style with the flags below")
    group.add_argument("--num-gpus", dest="num_gpus", type=int, default=1,
                       help="processes to start on this machine, one per GPU (gloo processes with --no_cuda)")
    group.add_argument("--num-machines", dest="num_machines", type=int, default=1, help="machines taking part")
    group.add_argument("--machine-rank", dest="machine_rank", type=int, default=0,
                       help="this machine's index, 0 .. num-machines - 1 (0 hosts the rendezvous)")
    group.add_argument("--dist-url", dest="dist_url", default="auto",
                       help="tcp://HOST:PORT of machine 0 (required with several machines; 'auto' = a free local "
                            "port on one machine)")
    group.add_argument("--dist-timeout", dest="dist_timeout", type=float, default=1800.0,
                       help="seconds a collective may wait for the other ranks before the run fails; a rank that "
                            "dies is noticed within min(this, 60) seconds")


def settings_from_args(args: argparse.Namespace) -> LaunchSettings:
    return LaunchSettings(args.num_gpus, args.num_machines, args.machine_rank, args.dist_url, args.dist_timeout,
                          getattr(args, "cuda", True))


def under_torchrun() -> bool:
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def free_port() -> int:
    """A TCP port free on this machine right now (bind to port 0 and ask which one the kernel chose)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check_settings(settings: LaunchSettings) -> None:
    if settings.num_gpus < 1 or settings.num_machines < 1:
        raise ValueError(f"--num-gpus ({settings.num_gpus}) and --num-machines ({settings.num_machines}) must be >= 1")
    if not 0 <= settings.machine_rank < settings.num_machines:
        raise ValueError(f"--machine-rank {settings.machine_rank} is not in 0 .. {settings.num_machines - 1}")
    if settings.timeout_s <= 0:
        raise ValueError(f"--dist-timeout must be positive, got {settings.timeout_s}")
    if settings.dist_url == "auto":
        if settings.num_machines > 1:
            raise ValueError("--dist-url auto works on one machine only; with --num-machines give tcp://HOST:PORT of "
                             "machine 0 (the same on every machine)")
    elif not settings.dist_url.startswith(("tcp://", "env://", "file://")):
        raise ValueError(f"--dist-url {settings.dist_url!r}: expected tcp://HOST:PORT (or env://, file://)")
    if settings.use_cuda and torch.cuda.is_available() and settings.num_gpus > torch.cuda.device_count():
        raise ValueError(f"--num-gpus {settings.num_gpus} but this machine has {torch.cuda.device_count()} GPUs")


def launch(main_fn: Callable[..., Any], settings: LaunchSettings, args: tuple = ()) -> None:
    """Run ``main_fn(*args)`` in every process of the run (just here when there is one process).

    `main_fn` must be a module-level function (the spawned processes import it)."""
    if under_torchrun():
        if settings.world_size > 1:
            raise ValueError("the tool runs under torchrun: give the process counts to torchrun "
                             "(--nproc_per_node/--nnodes), not --num-gpus/--num-machines")
        _worker_main(main_fn, args, int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                     int(os.environ["LOCAL_RANK"]), "env://", settings)
        return
    check_settings(settings)
    if settings.world_size == 1:
        main_fn(*args)
        return
    url = f"tcp://127.0.0.1:{free_port()}" if settings.dist_url == "auto" else settings.dist_url
    context = mp.start_processes(_spawned_worker, nprocs=settings.num_gpus, args=(main_fn, args, settings, url),
                                 daemon=False, start_method="spawn", join=False)
    try:
        while not context.join():
            pass
    except ProcessException as err:
        index, detail = _culprit(context, err)
        rank = settings.machine_rank * settings.num_gpus + index
        raise DistributedRunError(f"rank {rank} (local process {index}) failed: {detail}") from None


def _culprit(context, err: ProcessException) -> tuple[int, str]:
    """(local index, what happened) of the process that failed first: the one torch reports, unless that one
    only stopped because its watchdog saw another local process fail, whose error file then names it."""
    if getattr(err, "exit_code", None) != WATCHDOG_EXIT_CODE:
        return err.error_index, str(err)
    for index, path in enumerate(context.error_files):
        if index != err.error_index and os.path.isfile(path) and os.path.getsize(path):
            with open(path, "rb") as f:
                return index, pickle.load(f)
    return err.error_index, f"{err}, because another rank failed (named in the message above)"


def _spawned_worker(local_rank: int, main_fn, args: tuple, settings: LaunchSettings, url: str) -> None:
    if "OMP_NUM_THREADS" not in os.environ:  # as torchrun: the processes share the cores instead of fighting
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // settings.num_gpus))
    rank = settings.machine_rank * settings.num_gpus + local_rank
    _worker_main(main_fn, args, rank, settings.world_size, local_rank, url, settings)


def _worker_main(main_fn, args: tuple, rank: int, world_size: int, local_rank: int, init_method: str,
                 settings: LaunchSettings) -> None:
    use_nccl = settings.use_cuda and torch.cuda.is_available()
    if use_nccl:
        torch.cuda.set_device(local_rank)
    os.environ["LOCAL_RANK"] = str(local_rank)  # the training code picks its GPU from it
    dist.init_process_group("nccl" if use_nccl else "gloo", init_method=init_method, world_size=world_size,
                            rank=rank, timeout=datetime.timedelta(seconds=settings.timeout_s))
    watchdog = Watchdog(_group_store(), rank, world_size, settings.heartbeat_timeout_s)
    watchdog.start()
    try:
        main_fn(*args)
        synchronize()  # every rank ends together: none stops beating while another still works
    except BaseException as exc:
        watchdog.report(exc)
        raise
    finally:
        watchdog.stop()
    dist.destroy_process_group()


def _group_store() -> dist.Store:
    """The key-value store the default process group rendezvoused through (torch keeps it; its accessor is
    private, hence the clear error if a torch version renames it)."""
    getter = getattr(dist.distributed_c10d, "_get_default_store", None)
    if getter is None:
        raise RuntimeError("this torch version has no torch.distributed.distributed_c10d._get_default_store: the "
                           "failure watchdog of engine/launch.py needs the process group's store")
    return getter()


def is_collective_error(exc: BaseException) -> bool:
    """An error raised by a collective because a peer went away (gloo raises plain RuntimeErrors for it)."""
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(word in text for word in ("gloo", "NCCL", "Connection", "peer"))


class Watchdog:
    """Heartbeats and failure records in the process group's store, checked by a daemon thread.

    Keys (under the ``pydetectron_watchdog/`` prefix): ``beat/<rank>`` (a counter each rank advances every
    second) and ``failed/<rank>`` (the error of a rank that raised)."""

    def __init__(self, store: dist.Store, rank: int, world_size: int, heartbeat_timeout_s: float,
                 exit_fn: Callable[[int], None] = os._exit):  # os._exit: a thread cannot raise in the main one
        self.store = dist.PrefixStore("pydetectron_watchdog/", store)
        self.rank = rank
        self.world_size = world_size
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.exit_fn = exit_fn
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pydetectron-watchdog", daemon=True)
        self._beats = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=5 * POLL_SECONDS)

    def report(self, exc: BaseException) -> None:
        """This rank failed with `exc`. A collective error is usually the echo of another rank's death: give the
        thread time to name that rank first; otherwise record this rank as the failed one."""
        if is_collective_error(exc):
            deadline = time.monotonic() + self.heartbeat_timeout_s + 3 * POLL_SECONDS
            while time.monotonic() < deadline and self._thread.is_alive():
                time.sleep(POLL_SECONDS / 2)
        try:
            self.store.set(f"failed/{self.rank}", f"{type(exc).__name__}: {exc}"[:2000])
        except Exception:  # the store itself is gone: the other ranks notice through the lost store
            pass

    def _run(self) -> None:
        last_seen = {r: (None, time.monotonic()) for r in range(self.world_size) if r != self.rank}
        store_lost_since = None
        while not self._stopping.wait(POLL_SECONDS):
            try:
                self._beats += 1
                self.store.set(f"beat/{self.rank}", str(self._beats))
                for other, (value, since) in last_seen.items():
                    if self.store.check([f"failed/{other}"]):
                        message = self.store.get(f"failed/{other}").decode(errors="replace")
                        self._give_up(f"rank {other} failed: {message}")
                    beat = self.store.get(f"beat/{other}") if self.store.check([f"beat/{other}"]) else None
                    now = time.monotonic()
                    if beat != value:
                        last_seen[other] = (beat, now)
                    elif now - since > self.heartbeat_timeout_s:
                        self._give_up(f"rank {other} stopped responding (no heartbeat for {now - since:.0f} s: "
                                      "killed, crashed or frozen)")
                store_lost_since = None
            except Exception as err:  # noqa: BLE001 - any store error means the host of the store is gone
                store_lost_since = store_lost_since or time.monotonic()
                if self._stopping.is_set():
                    return
                if time.monotonic() - store_lost_since > 3 * POLL_SECONDS:
                    self._give_up(f"lost the rendezvous store (hosted by rank 0 or the torchrun agent): {err}")

    def _give_up(self, reason: str) -> None:
        if self._stopping.is_set():
            return
        print(f"[rank {self.rank}] distributed run failed: {reason}; rank {self.rank} exits", file=sys.stderr,
              flush=True)
        self.exit_fn(WATCHDOG_EXIT_CODE)
