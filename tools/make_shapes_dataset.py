#!/usr/bin/env python
"""Write the synthetic shapes dataset (COCO format) where the catalog expects it: data/shapes by default.

    python tools/make_shapes_dataset.py                       # 1000 train / 200 val images, seed 0
    python tools/make_shapes_dataset.py --train 100 --val 20 --out /tmp/shapes --seed 1
"""

from __future__ import annotations

import argparse
import time

from pydetectron.data.catalog import data_dir
from pydetectron.data.shapes import make_shapes_dataset


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(data_dir() / "shapes"), help="output folder (default: %(default)s)")
    parser.add_argument("--train", type=int, default=1000, help="number of training images")
    parser.add_argument("--val", type=int, default=200, help="number of validation images")
    parser.add_argument("--seed", type=int, default=0, help="the dataset is a pure function of the seed")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.train < 0 or args.val < 0:
        raise SystemExit("--train and --val must be >= 0")
    start = time.perf_counter()
    paths = make_shapes_dataset(args.out, args.train, args.val, args.seed)
    print(f"wrote {args.train} train + {args.val} val images to {args.out} in {time.perf_counter() - start:.1f} s")
    for split, files in paths.items():
        for kind, path in files.items():
            print(f"  {split} {kind}: {path}")


if __name__ == "__main__":
    main()
