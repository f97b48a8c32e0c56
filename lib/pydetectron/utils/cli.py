"""Command-line pieces the tools share, so `--cfg` / `--config-file`, `--set` and `--register` read the same
everywhere."""

from __future__ import annotations

import argparse
import sys

from pydetectron.config import CfgNode, get_cfg, merge_cfg_from_file, merge_cfg_from_list
from pydetectron.config.detectron2 import load_detectron2_config
from pydetectron.engine.predictor import weights_flags

REGISTER_METAVAR = "NAME:IMAGE_DIR:ANN_JSON"


def add_config_args(parser: argparse.ArgumentParser, cfg_help: str, set_example: str) -> None:
    """--cfg (a Detectron YAML) or --config-file (a detectron2 YAML, with detectron2's trailing KEY VALUE opts),
    and --set KEY VALUE ... (overrides in pydetectron's key names, applied last)."""
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--cfg", dest="cfg_file", help=cfg_help)
    which.add_argument("--config-file", dest="config_file", metavar="FILE",
                       help="a detectron2 YAML config (its _BASE_ chain followed; run in detectron2 mode); KEY VALUE "
                            "pairs in detectron2's names may follow the flags, e.g. MODEL.WEIGHTS w.pkl OUTPUT_DIR out")
    parser.add_argument("--set", dest="set_cfgs", nargs="+", default=[], metavar="KEY VALUE",
                        help=f"config overrides in pydetectron's key names, e.g. --set {set_example} (before "
                             "detectron2 opts, or end --set with --)")
    parser.add_argument("opts", nargs="*", default=[], metavar="D2_KEY VALUE",
                        help="with --config-file: detectron2 config overrides, e.g. MODEL.WEIGHTS model_final.pth")


def add_register_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--register", action="append", default=[], metavar=REGISTER_METAVAR,
                        help="register a custom COCO-format dataset (repeatable); see data/README.md")


def check_config_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if len(args.set_cfgs) % 2:
        parser.error(f"--set takes KEY VALUE pairs; got an odd number of items: {args.set_cfgs}")
    if args.opts and not args.config_file:
        parser.error(f"KEY VALUE opts after the flags are detectron2 overrides for --config-file; with --cfg use "
                     f"--set (got {args.opts})")
    if len(args.opts) % 2:
        parser.error(f"detectron2 opts are KEY VALUE pairs; got an odd number of items: {args.opts}")


def config_path(args: argparse.Namespace) -> str:
    """The config file the tool was given (--cfg or --config-file)."""
    return args.config_file or args.cfg_file


def load_cfg(args: argparse.Namespace) -> CfgNode:
    """A fresh cfg from --cfg (Detectron's defaults + the YAML) or --config-file (detectron2's defaults + the YAML
    and its trailing opts, translated), then the --set overrides (not yet frozen)."""
    if args.config_file:
        cfg = load_detectron2_config(args.config_file, args.opts)
    else:
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
