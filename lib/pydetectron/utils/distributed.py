"""torch.distributed helpers every room may use: rank queries, object gathers, loss averaging.

All of them work unchanged in a single process (no process group): the rank is 0, the world size 1, gathers
return ``[obj]``. Nothing here starts processes; ``engine/launch.py`` does.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main_process() -> bool:
    """Rank 0: the only process that writes checkpoints, metrics, pictures and log.txt."""
    return get_rank() == 0


def synchronize() -> None:
    """A barrier when several processes run (no-op otherwise)."""
    if get_world_size() > 1:
        dist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every rank (pickled through the process group)."""
    if get_world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank (e.g. an output folder named after rank 0's clock)."""
    if get_world_size() == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def average_scalars(values: Mapping[str, float], device: torch.device | str = "cpu") -> dict[str, float]:
    """Each named float averaged over the ranks (one all_reduce); every rank must pass the same names."""
    if get_world_size() == 1:
        return dict(values)
    names = sorted(values)
    packed = torch.tensor([float(values[n]) for n in names], dtype=torch.float64, device=device)
    dist.all_reduce(packed)
    packed /= get_world_size()
    return dict(zip(names, packed.tolist()))


def collective_device() -> torch.device:
    """Where small tensors for collectives live: the current GPU under NCCL, else the CPU."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
