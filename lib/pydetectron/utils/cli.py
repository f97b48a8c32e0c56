"""Command-line pieces the tools share, so `--cfg`, `--set` and `--register` read the same everywhere."""

from __future__ import annotations

import argparse
import sys

from pydetectron.config import CfgNode, get_cfg, merge_cfg_from_file, merge_cfg_from_list
from pydetectron.engine.predictor import weights_flags

REGISTER_METAVAR = "NAME:IMAGE_DIR:ANN_JSON"


def add_config_args(parser: argparse.ArgumentParser, cfg_help: str, set_example: str) -> None:
    """--cfg (required) and --set KEY VALUE ... (config overrides)."""
    parser.add_argument("--cfg", dest="cfg_file", required=True, help=cfg_help)
    parser.add_argument("--set", dest="set_cfgs", nargs="+", default=[], metavar="KEY VALUE",
                        help=f"config overrides, e.g. --set {set_example}")


def add_register_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--register", action="append", default=[], metavar=REGISTER_METAVAR,
                        help="register a custom COCO-format dataset (repeatable); see data/README.md")


def check_config_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if len(args.set_cfgs) % 2:
        parser.error(f"--set takes KEY VALUE pairs; got an odd number of items: {args.set_cfgs}")


def load_cfg(args: argparse.Namespace) -> CfgNode:
    """A fresh default cfg with --cfg merged in, then the --set overrides (not yet frozen)."""
    cfg = get_cfg()
    merge_cfg_from_file(cfg, args.cfg_file)
    merge_cfg_from_list(cfg, args.set_cfgs)
    return cfg


def add_weights_args(parser: argparse.ArgumentParser) -> None:
    """--load_ckpt / --load_detectron of the inference tools (else the cfg's TEST.WEIGHTS, see `weights_of`)."""
    parser.add_argument("--load_ckpt", help="pydetectron checkpoint (.pth), path or http(s) URL")
    parser.add_argument("--load_detectron", help="Detectron weights (.pkl), path or http(s) URL "
                        "(without either flag: the cfg's TEST.WEIGHTS, as Detectron's test_net.py reads it)")


def weights_of(args: argparse.Namespace, cfg: CfgNode) -> tuple[str | None, str | None]:
    """(load_ckpt, load_detectron): the flag given (parse_args refuses both), else Detectron's TEST.WEIGHTS (any
    format, read by content); exits with a message when there are none."""
    if args.load_ckpt or args.load_detectron:
        return args.load_ckpt, args.load_detectron
    if not cfg.TEST.WEIGHTS:
        sys.exit("error: no weights: give --load_ckpt, --load_detectron or --set TEST.WEIGHTS <file or URL>")
    return weights_flags(cfg.TEST.WEIGHTS)
