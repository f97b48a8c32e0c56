#!/usr/bin/env python3
"""Ours vs. torchvision for every op, forward and backward, in one run: median ms and the ratio; and our
``Conv2d`` (pydetectron.ops.conv) vs torch's ``nn.Conv2d``.

    python tools/benchmark_ops.py [--threads 2] [--device cpu|cuda|all] [--repeats 7]

Workloads are realistic: an FPN P2 level (1x256x200x304 at 1/4 scale) with 512 and 2000 RoIs shaped like
proposals, 7x7 output, sampling ratio 2; NMS on 1 000 and 12 000 clustered proposal-like boxes at IoU 0.7.
Convs on the same P2 map, each side in the layout its network hands maps over (ours channels-last, torch's
NCHW), the same weights: an FPN 3x3 256->256 conv and a bottleneck 1x1 256->64 conv, forward alone and a
training step (forward, then input and weight gradients of a dense loss); and the RPN's 3x3 conv, whose loss
reaches 256 sampled positions.
"""

from __future__ import annotations

import argparse

import torch
import torchvision  # noqa: F401  (registers torch.ops.torchvision)
from torch import nn
from torchvision import ops as tv_ops

from pydetectron import ops
from pydetectron.ops._extension import OPS
from pydetectron.ops.conv import Conv2d
from pydetectron.utils.benchmark import TABLE_HEADER, Comparison, compare, machine_description

IMAGE_H, IMAGE_W = 800, 1216
FEATURE_SHAPE = (1, 256, 200, 304)
SPATIAL_SCALE = 0.25
POOLED = 7
SAMPLING = 2


def proposal_like_boxes(n: int, generator: torch.Generator) -> torch.Tensor:
    """(n, 4) x1y1x2y2 boxes clustered around objects, sizes 16-512 px, like RPN proposals."""
    num_objects = max(n // 40, 1)
    centers = torch.rand(num_objects, 2, generator=generator) * torch.tensor([IMAGE_W, IMAGE_H])
    sizes = torch.exp(torch.empty(num_objects, 2).uniform_(4.0, 6.2, generator=generator))
    pick = torch.randint(num_objects, (n,), generator=generator)
    jitter = 1 + 0.25 * torch.randn(n, 4, generator=generator)
    c, s = centers[pick], sizes[pick]
    half = s / 2
    x1 = (c[:, 0] - half[:, 0] * jitter[:, 0]).clamp(0, IMAGE_W - 1)
    y1 = (c[:, 1] - half[:, 1] * jitter[:, 1]).clamp(0, IMAGE_H - 1)
    x2 = (c[:, 0] + half[:, 0] * jitter[:, 2]).clamp(0, IMAGE_W - 1)
    y2 = (c[:, 1] + half[:, 1] * jitter[:, 3]).clamp(0, IMAGE_H - 1)
    corners = [torch.minimum(x1, x2), torch.minimum(y1, y2), torch.maximum(x1, x2), torch.maximum(y1, y2)]
    return torch.stack(corners, 1)


def roi_cases(device: torch.device, generator: torch.Generator, repeats: int) -> list[Comparison]:
    features = torch.randn(*FEATURE_SHAPE, generator=generator).to(device)
    n, c, h, w = FEATURE_SHAPE
    results = []
    for num_rois in (512, 2000):
        boxes = proposal_like_boxes(num_rois, generator)
        rois = torch.cat([torch.zeros(num_rois, 1), boxes], 1).to(device)
        grad = torch.randn(num_rois, c, POOLED, POOLED, generator=generator).to(device)
        workload = f"{n}x{c}x{h}x{w}, {num_rois} RoIs, {POOLED}x{POOLED}"
        results.append(compare(
            "roi_align fwd", workload + f", sr {SAMPLING}",
            lambda: ops.roi_align(features, rois, POOLED, SPATIAL_SCALE, SAMPLING),
            lambda: tv_ops.roi_align(features, rois, POOLED, SPATIAL_SCALE, SAMPLING, aligned=False),
            device, repeats))
        align_args = (rois, SPATIAL_SCALE, POOLED, POOLED, n, c, h, w, SAMPLING, False)
        results.append(compare(
            "roi_align bwd", workload + f", sr {SAMPLING}",
            lambda: OPS.roi_align_backward(grad, *align_args),
            lambda: torch.ops.torchvision._roi_align_backward(grad, *align_args),
            device, repeats))
        results.append(compare(
            "roi_pool fwd", workload,
            lambda: ops.roi_pool(features, rois, POOLED, SPATIAL_SCALE),
            lambda: tv_ops.roi_pool(features, rois, POOLED, SPATIAL_SCALE),
            device, repeats))
        _, our_argmax = OPS.roi_pool_forward(features, rois, SPATIAL_SCALE, POOLED, POOLED)
        _, peer_argmax = torch.ops.torchvision.roi_pool(features, rois, SPATIAL_SCALE, POOLED, POOLED)
        pool_args = (SPATIAL_SCALE, POOLED, POOLED, n, c, h, w)
        results.append(compare(
            "roi_pool bwd", workload,
            lambda: OPS.roi_pool_backward(grad, rois, our_argmax, *pool_args),
            lambda: torch.ops.torchvision._roi_pool_backward(grad, rois, peer_argmax, *pool_args),
            device, repeats))
    return results


def nms_cases(device: torch.device, generator: torch.Generator, repeats: int) -> list[Comparison]:
    results = []
    for num_boxes in (1000, 12000):
        boxes = proposal_like_boxes(num_boxes, generator).to(device)
        scores = torch.rand(num_boxes, generator=generator).to(device)
        kept = len(ops.nms(boxes, scores, 0.7))
        results.append(compare(
            "nms", f"{num_boxes} boxes, IoU 0.7, {kept} kept",
            lambda: ops.nms(boxes, scores, 0.7),
            lambda: tv_ops.nms(boxes, scores, 0.7),
            device, repeats))
    return results


def conv_cases(device: torch.device, generator: torch.Generator, repeats: int) -> list[Comparison]:
    n, c, h, w = FEATURE_SHAPE
    nchw = torch.randn(*FEATURE_SHAPE, generator=generator).to(device)
    channels_last = nchw.contiguous(memory_format=torch.channels_last).requires_grad_()
    nchw.requires_grad_()
    results = []
    for name, kernel, dim_out, sampled in (("conv 3x3", 3, 256, None), ("conv 1x1", 1, 64, None),
                                           ("rpn conv 3x3", 3, 256, 256)):
        ours = Conv2d(c, dim_out, kernel, padding=kernel // 2, sparse_output_grad=sampled is not None).to(device)
        peer = nn.Conv2d(c, dim_out, kernel, padding=kernel // 2).to(device)
        peer.load_state_dict(ours.state_dict())
        loss_weights = torch.randn(n, dim_out, h, w, generator=generator)
        workload = f"{n}x{c}x{h}x{w} -> {dim_out}"
        if sampled is not None:  # the loss reaches `sampled` random positions, as the RPN's sampled anchors
            keep = torch.zeros(n * h * w, dtype=torch.bool)
            keep[torch.randperm(n * h * w, generator=generator)[:sampled]] = True
            loss_weights *= keep.reshape(n, 1, h, w)
            workload += f", loss at {sampled} positions"
        loss_weights = loss_weights.to(device)
        ours_weights = loss_weights.contiguous(memory_format=torch.channels_last)

        def step(conv: nn.Conv2d, features: torch.Tensor, weights: torch.Tensor) -> None:
            conv.zero_grad(set_to_none=True)
            features.grad = None
            (conv(features) * weights).sum().backward()
        if sampled is None:
            with torch.no_grad():
                results.append(compare(f"{name} fwd", workload, lambda: ours(channels_last), lambda: peer(nchw),
                                       device, repeats))
        results.append(compare(f"{name} fwd+bwd", workload, lambda: step(ours, channels_last, ours_weights),
                               lambda: step(peer, nchw, loss_weights), device, repeats))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for both sides (CPU)")
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all",
                        help="'all' = CPU, plus CUDA when a GPU is visible")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs of each side (median reported)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    devices = [torch.device("cpu")] if args.device in ("cpu", "all") else []
    if args.device in ("cuda", "all") and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    elif args.device == "cuda":
        parser.error("--device cuda: no GPU is visible")

    print(machine_description(args.threads))
    for device in devices:
        label = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        print(f"\n### {label} (peer = torchvision; conv rows: torch's nn.Conv2d)\n\n{TABLE_HEADER}")
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for cases in (roi_cases, nms_cases):
                for result in cases(device, generator, args.repeats):
                    print(result.row(), flush=True)
        for result in conv_cases(device, generator, args.repeats):
            print(result.row(), flush=True)


if __name__ == "__main__":
    main()
