"""DataParallel for detection: one differently sized sub-batch per device, dict outputs gathered.

torch's DataParallel splits one tensor along dim 0, which cannot hold images of different sizes, and it
moves every input to the GPUs. Here the data loader has already made one sub-batch per device (each padded
to its own size); keyword inputs are lists with one entry per device, those named in `cpu_keywords` (the
roidb) stay on the CPU, and outputs are gathered: scalar losses averaged, lists concatenated.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn
from torch.nn.parallel import parallel_apply, replicate


def to_device(value: Any, device: torch.device) -> Any:
    """Move every tensor inside nested dicts / lists / tuples to `device`."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(v, device) for v in value)
    return value


def gather_outputs(outputs: Sequence[Any], device: torch.device) -> Any:
    """Merge per-replica outputs: dicts key by key, 0-d tensors averaged, tensors and lists concatenated."""
    first = outputs[0]
    if isinstance(first, dict):
        return {k: gather_outputs([o[k] for o in outputs], device) for k in first}
    if isinstance(first, torch.Tensor):
        moved = [o.to(device) for o in outputs]
        return torch.stack(moved).mean(0) if first.dim() == 0 else torch.cat(moved)
    if isinstance(first, list):
        return [item for o in outputs for item in o]
    raise TypeError(f"cannot gather outputs of type {type(first).__name__}")


class DataParallel(nn.Module):
    """Runs `module(**inputs_i)` for the i-th sub-batch of every keyword input, one device each.

    With one sub-batch it is a plain call. On the CPU or a single GPU the sub-batches run one after another
    and are gathered the same way, so training code never branches on the hardware. With several GPUs,
    sub-batch i runs on device i (more sub-batches than devices is an error).
    """

    def __init__(self, module: nn.Module, device_ids: Sequence[int] | None = None,
                 cpu_keywords: Sequence[str] = ("roidb",)):
        super().__init__()
        self.module = module
        if device_ids is None:
            device_ids = list(range(torch.cuda.device_count()))
        self.device_ids = list(device_ids)
        self.cpu_keywords = set(cpu_keywords)

    def forward(self, **inputs: Sequence[Any]) -> Any:
        lengths = {k: len(v) for k, v in inputs.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"every keyword input needs one entry per sub-batch; got lengths {lengths}")
        num_splits = next(iter(lengths.values()))
        per_split = [{k: v[i] for k, v in inputs.items()} for i in range(num_splits)]
        if len(self.device_ids) <= 1:
            device = torch.device("cuda", self.device_ids[0]) if self.device_ids else torch.device("cpu")
            outputs = [self.module(**self._place(kwargs, device)) for kwargs in per_split]
            return outputs[0] if num_splits == 1 else gather_outputs(outputs, device)
        if num_splits > len(self.device_ids):
            raise ValueError(f"{num_splits} sub-batches for {len(self.device_ids)} devices {self.device_ids}")
        devices = [torch.device("cuda", d) for d in self.device_ids[:num_splits]]
        replicas = replicate(self.module, self.device_ids[:num_splits], not torch.is_grad_enabled())
        placed = [self._place(kwargs, device) for kwargs, device in zip(per_split, devices)]
        outputs = parallel_apply(replicas, [()] * num_splits, placed, self.device_ids[:num_splits])
        return gather_outputs(outputs, devices[0])

    def _place(self, kwargs: dict, device: torch.device) -> dict:
        return {k: v if k in self.cpu_keywords else to_device(v, device) for k, v in kwargs.items()}
