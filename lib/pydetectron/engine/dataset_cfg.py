"""The dataset part of a tool's cfg: --register and --dataset, then counts the dataset's json decides.

Shared by training and testing, so both tools read dataset flags the same way.
"""

from __future__ import annotations

from typing import Callable, Sequence

from pydetectron.data.catalog import register_from_string, resolve_short_name
from pydetectron.data.coco import DatasetMeta


def select_datasets(cfg, dataset: str | None, register: Sequence[str] = (), train: bool = True) -> None:
    """Register `register` specs ('NAME:IMAGE_DIR:ANN_JSON'), then point TEST.DATASETS (and TRAIN.DATASETS
    when `train`) at `dataset` (a short name like 'coco2017' or any catalog name), with its class count when
    the short name knows it."""
    for spec in register:
        register_from_string(spec)
    if dataset:
        short = resolve_short_name(dataset)
        if train:
            cfg.TRAIN.DATASETS = tuple(short.train)
        cfg.TEST.DATASETS = tuple(short.test)
        if short.num_classes > 0:
            cfg.MODEL.NUM_CLASSES = short.num_classes
    key = "TRAIN.DATASETS" if train else "TEST.DATASETS"
    if not (cfg.TRAIN.DATASETS if train else cfg.TEST.DATASETS):
        raise ValueError(f"no {'training' if train else 'test'} dataset: pass --dataset NAME or set {key} in "
                         "the config")


def apply_dataset_meta(cfg, meta: DatasetMeta, print_fn: Callable[[str], None] = print) -> None:
    """Class and keypoint counts of a catalog dataset the short names don't describe (shapes, custom data)."""
    if cfg.MODEL.NUM_CLASSES <= 0:
        cfg.MODEL.NUM_CLASSES = meta.num_classes
        print_fn(f"MODEL.NUM_CLASSES = {meta.num_classes} from the dataset ({meta.num_classes - 1} categories)")
    if cfg.MODEL.KEYPOINTS_ON and cfg.KRCNN.NUM_KEYPOINTS <= 0:
        cfg.KRCNN.NUM_KEYPOINTS = meta.num_keypoints
    if cfg.MODEL.KEYPOINTS_ON and not cfg.KRCNN.OKS_SIGMAS and meta.oks_sigmas:
        cfg.KRCNN.OKS_SIGMAS = tuple(meta.oks_sigmas)
