#!/usr/bin/env python
"""Speed of the data pipeline, each figure beside a peer taken in the same run (../shared/BENCHMARKING.md).

1. json -> roidb on a synthetic COCO-sized json (default 100 000 annotations, written to /tmp): our cold parse
   (json + validation + roidb + cache write) and our cached load, beside pycocotools' COCO() load of the
   same file, interleaved, medians.
2. Loader images/second with N workers (DATA_LOADER.NUM_THREADS) on the shapes dataset and on the synthetic
   set (a few shared 640x480 jpgs at Detectron's 800/1333 scale), beside the peer: the bare work of one image
   (cv2.imread + normalise + cv2.resize) in a loop in the main process.

    python tools/benchmark_data.py                          # both parts, workers 0 and 2
    python tools/benchmark_data.py --workers 0 1 2 --annotations 100000 --batches 40
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from pycocotools.coco import COCO

from pydetectron.data.catalog import DatasetSpec, data_dir
from pydetectron.data.coco import CocoDataset
from pydetectron.data.loader import build_train_loader
from pydetectron.data.minibatch import BlobSettings
from pydetectron.data.roidb import extend_with_flipped_entries, filter_for_training
from pydetectron.data.shapes import make_shapes_dataset
from pydetectron.data.transforms import prep_im_for_blob, read_image

MEANS = (102.9801, 115.9465, 122.7717)


def synthetic_coco(folder: Path, num_annotations: int, per_image: int = 7, seed: int = 0) -> Path:
    """A COCO-like json (80 categories, polygons of 8-24 points, 1 % crowd RLE) over a few shared jpgs."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(4):
        name = f"shared_{i}.jpg"
        cv2.imwrite(str(folder / name), rng.integers(0, 255, size=(480, 640, 3), dtype=np.uint8))
        files.append(name)
    num_images = max(1, num_annotations // per_image)
    images = [{"id": i + 1, "file_name": files[i % 4], "width": 640, "height": 480} for i in range(num_images)]
    cats = [{"id": c, "name": f"cat{c}", "supercategory": "x"} for c in range(1, 91) if c % 9 != 0][:80]
    anns = []
    for a in range(num_annotations):
        x, y = rng.uniform(0, 560), rng.uniform(0, 400)
        w, h = rng.uniform(4, 80), rng.uniform(4, 80)
        ann = {"id": a + 1, "image_id": a % num_images + 1, "category_id": cats[a % 80]["id"],
               "bbox": [round(x, 2), round(y, 2), round(w, 2), round(h, 2)], "area": round(w * h * 0.7, 2),
               "iscrowd": 0}
        if a % 100 == 99:
            ann["iscrowd"] = 1
            ann["segmentation"] = {"size": [480, 640], "counts": [int(480 * x), int(h), 480 * 640 - int(480 * x)
                                                                  - int(h)]}
        else:
            k = int(rng.integers(4, 13))
            t = np.sort(rng.uniform(0, 2 * np.pi, k))
            pts = np.stack([x + w / 2 * (1 + np.cos(t)), y + h / 2 * (1 + np.sin(t))], 1)
            ann["segmentation"] = [np.round(pts, 2).reshape(-1).tolist()]
        anns.append(ann)
    path = folder / "instances_synthetic.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_json(ann_file: Path, image_dir: Path, repeats: int) -> None:
    cache = Path(tempfile.mkdtemp(prefix="pyd_roidb_cache_"))
    spec = DatasetSpec("synthetic", str(image_dir), str(ann_file))

    def cold():
        for p in cache.glob("*.pkl"):
            p.unlink()
        CocoDataset(spec, cache_dir=str(cache)).get_roidb()

    def cached():
        CocoDataset(spec, cache_dir=str(cache)).get_roidb()

    def peer():
        with contextlib.redirect_stdout(io.StringIO()):
            COCO(str(ann_file))

    times = {"ours cold (parse + cache write)": [], "ours cached": [], "peer pycocotools COCO()": []}
    for _ in range(repeats):
        times["ours cold (parse + cache write)"].append(_timed(cold))
        times["ours cached"].append(_timed(cached))
        times["peer pycocotools COCO()"].append(_timed(peer))
    size_mb = ann_file.stat().st_size / 1e6
    print(f"\n## json -> roidb: {ann_file} ({size_mb:.0f} MB), median of {repeats}, interleaved")
    print("| case | seconds |\n|---|---|")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values):.2f} |")


def _peer_batch(entries, settings: BlobSettings, rng: np.random.Generator) -> None:
    """The bare work of the same images: read, flip, normalise, resize to a random scale (no targets, no blob)."""
    for entry in entries:
        im = read_image(entry["image"])
        if entry["flipped"]:
            im = im[:, ::-1]
        target = settings.scales[int(rng.integers(len(settings.scales)))]
        prep_im_for_blob(im, settings.means, settings.stds, target, settings.max_size)


def bench_loader(title: str, roidb, settings: BlobSettings, workers, batch_size: int, batches: int) -> None:
    """Per batch, interleaved: time to get our next minibatch, then the peer's time on the same images.
    With workers, ours keeps prefetching while the peer runs, so its figure is the steady-state rate."""
    print(f"\n## loader: {title}, {len(roidb)} roidb entries, batch {batch_size}, scales {settings.scales}, "
          f"max {settings.max_size}, median over {batches} batches after 3 warm-up, interleaved with the peer")
    print("| case | images/s ours | images/s peer (bare read+flip+normalise+resize loop) | ours/peer time |")
    print("|---|---|---|---|")
    rng = np.random.default_rng(0)
    by_id = {}
    for e in roidb:
        by_id.setdefault((e["id"], e["flipped"]), e)
    for n in workers:
        loader = iter(build_train_loader(roidb, settings, batch_size, num_workers=n, seed=0))
        for _ in range(3):
            next(loader)
        ours, peer = [], []
        for _ in range(batches):
            start = time.perf_counter()
            batch = next(loader)
            ours.append((time.perf_counter() - start) / len(batch["roidb"]))
            entries = [by_id[(e["id"], e["flipped"])] for e in batch["roidb"]]
            start = time.perf_counter()
            _peer_batch(entries, settings, rng)
            peer.append((time.perf_counter() - start) / len(entries))
        o, p = statistics.median(ours), statistics.median(peer)
        print(f"| {n} workers | {1 / o:.1f} | {1 / p:.1f} | {o / p:.2f} |")
        del loader


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--annotations", type=int, default=100_000)
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3, help="json load repeats")
    parser.add_argument("--shapes", default=str(data_dir() / "shapes"), help="shapes dataset (made if missing)")
    parser.add_argument("--tmp", default="/tmp/pydetectron_bench_data")
    args = parser.parse_args()
    print(f"# data pipeline benchmark: {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, cv2 {cv2.__version__}")

    tmp = Path(args.tmp)
    ann_file = synthetic_coco(tmp / "synthetic", args.annotations)
    bench_json(ann_file, tmp / "synthetic", args.repeats)

    shapes = Path(args.shapes)
    if not (shapes / "annotations" / "instances_train.json").is_file():
        shapes = tmp / "shapes"
        make_shapes_dataset(shapes)
    ds = CocoDataset(DatasetSpec("shapes_bench", str(shapes / "train"),
                                 str(shapes / "annotations" / "instances_train.json")))
    roidb = filter_for_training(extend_with_flipped_entries(ds.get_roidb(), ds.meta))
    bench_loader("shapes train", roidb, BlobSettings((192, 224, 256), 320, MEANS, stride=32), args.workers, 4,
                 args.batches)

    syn = CocoDataset(DatasetSpec("synthetic", str(tmp / "synthetic"), str(ann_file)))
    syn_roidb = filter_for_training(syn.get_roidb())
    bench_loader("synthetic COCO-sized", syn_roidb, BlobSettings((800,), 1333, MEANS, stride=32), args.workers,
                 2, args.batches)


if __name__ == "__main__":
    main()
