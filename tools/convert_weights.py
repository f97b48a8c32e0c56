#!/usr/bin/env python3
"""Convert, merge, split and inspect weights files (any format pydetectron reads; see pydetectron.weights).

    python tools/convert_weights.py inspect resnet50.pth
    python tools/convert_weights.py convert R-50.pkl r50_d2.pkl --to detectron2
    python tools/convert_weights.py convert resnet50.pth r50.pkl --to detectron --input_order RGB
    python tools/convert_weights.py merge --teacher model_final.pth --student r18_d2.pkl T50-S18.pkl
    python tools/convert_weights.py split T50-S18.pkl student.pkl --part student

``convert --to`` writes Caffe2 blob names (``detectron``: a Detectron ``.pkl``, BGR, Detectron's class layout),
detectron2 names (``detectron2``: ``{'model': ..., '__author__', 'matching_heuristics'}``; a whole detector in
detectron2's names and class layout, loadable by detectron2's DetectionCheckpointer; ``.pth`` DST: tensors) or
our state dict (``pydetectron``).
Round trips are bit-exact. ``merge`` writes MGD's teacher + student layout (``t_net.`` / ``s_net.`` keys).
"""

from __future__ import annotations

import argparse
import sys

from pydetectron.weights import convert


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    conv = commands.add_parser("convert", help="write a weights file in another format")
    conv.add_argument("src")
    conv.add_argument("dst")
    conv.add_argument("--to", required=True, choices=convert.TARGETS)
    conv.add_argument("--input_order", choices=("BGR", "RGB"),
                      help="the source's input channel order, when the file does not say it")
    merge = commands.add_parser("merge", help="teacher and student in one file (MGD's layout)")
    merge.add_argument("--teacher", required=True)
    merge.add_argument("--student", required=True)
    merge.add_argument("out")
    split = commands.add_parser("split", help="one part of a merged file back out, or the student of a "
                                "distillation checkpoint")
    split.add_argument("merged")
    split.add_argument("out")
    split.add_argument("--part", required=True, choices=convert.PARTS)
    inspect = commands.add_parser("inspect", help="format, tensors, backbone and the cfg settings a file needs")
    inspect.add_argument("file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        if args.command == "convert":
            print(convert.convert(args.src, args.dst, args.to, args.input_order))
        elif args.command == "merge":
            print(convert.merge(args.teacher, args.student, args.out))
        elif args.command == "split":
            print(convert.split(args.merged, args.out, args.part))
        else:
            print("\n".join(convert.inspect(args.file)))
    except (OSError, ValueError, KeyError) as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
