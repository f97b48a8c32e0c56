"""The dataset part of a tool's cfg: --register and --dataset, then counts the dataset's json decides.

Shared by training and testing, so both tools read dataset flags the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from pydetectron.data.builtin_meta import coco_meta, coco_person_keypoints_meta
from pydetectron.data.catalog import get_dataset, register_from_string, resolve_short_name
from pydetectron.data.coco import CocoDataset, DatasetMeta


class DatasetMismatchError(ValueError):
    """A dataset names a class count other than the cfg's MODEL.NUM_CLASSES."""


def check_num_classes(cfg, meta: DatasetMeta, source: str) -> None:
    """MODEL.NUM_CLASSES must be the class count of the dataset whose names and ids label the detections
    (`source` says which, e.g. "--dataset 'coco'"); an RPN-only model has no classes to check."""
    if cfg.MODEL.RPN_ONLY or cfg.MODEL.NUM_CLASSES == meta.num_classes:
        return
    raise DatasetMismatchError(
        f"MODEL.NUM_CLASSES is {cfg.MODEL.NUM_CLASSES} but {source} names {meta.num_classes} classes (with "
        "background); pass the dataset the model was trained on")


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


def dataset_meta(dataset: str) -> DatasetMeta:
    """Class names ('__background__' first), keypoint names with their left/right pairs, and the 1-based
    keypoint skeleton of an inference tool's --dataset.

    A catalog dataset (or short name) whose annotation file exists gives its own categories and keypoints;
    otherwise COCO names ('coco*', 'keypoints_coco*') fall back to the built-in COCO lists."""
    name = resolve_short_name(dataset).test[0] if dataset not in ("coco", "keypoints_coco") else None
    if name is not None and Path(get_dataset(name).ann_file).is_file():
        coco = CocoDataset(name)
        coco.get_roidb()
        return coco.meta
    if dataset.startswith("keypoints_coco"):
        return coco_person_keypoints_meta()
    if dataset.startswith("coco"):
        return coco_meta()
    raise FileNotFoundError(f"--dataset {dataset!r}: annotation file {get_dataset(name).ann_file} (for the class "
                            "names) does not exist")


def model_meta(cfg, num_classes: int) -> DatasetMeta:
    """Class names of a model with `num_classes` classes (background included) when no --dataset names them.

    The cfg's own datasets (TEST.DATASETS, then TRAIN.DATASETS) when their annotation file is here and their
    class count is the model's; else by the count, as Detectron's infer_simple draws its models: COCO's classes
    for 81, 'person' with COCO's 17 keypoints for a 2-class keypoint model; else 'class 1', 'class 2', ...
    """
    for name in (*cfg.TEST.DATASETS, *cfg.TRAIN.DATASETS):
        try:
            found = Path(get_dataset(name).ann_file).is_file()
        except KeyError:
            continue
        if found:
            meta = dataset_meta(name)
            if meta.num_classes == num_classes:
                return meta
    if num_classes == coco_meta().num_classes:
        return coco_meta()
    person = coco_person_keypoints_meta()
    if (num_classes == person.num_classes and cfg.MODEL.KEYPOINTS_ON
            and (cfg.KRCNN.NUM_KEYPOINTS <= 0 or cfg.KRCNN.NUM_KEYPOINTS == person.num_keypoints)):
        return person
    return DatasetMeta(["__background__"] + [f"class {c}" for c in range(1, num_classes)], {}, {})
