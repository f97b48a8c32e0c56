"""Data room: catalog -> COCO roidb -> sampler (aspect groups) -> minibatch dicts. Knows nothing of models."""

from pydetectron.data.catalog import (
    DatasetSpec,
    get_dataset,
    load_catalog_file,
    register_dataset,
    register_from_string,
    resolve_short_name,
)
from pydetectron.data.coco import AnnotationError, CocoDataset, DatasetMeta
from pydetectron.data.loader import build_train_loader, build_train_loader_from_cfg
from pydetectron.data.minibatch import BlobSettings, get_minibatch, prepare_test_image, split_per_device
from pydetectron.data.roidb import combined_roidb_for_training, combined_roidb_from_cfg
from pydetectron.data.samplers import InfiniteGroupedBatchSampler

__all__ = [
    "AnnotationError",
    "BlobSettings",
    "CocoDataset",
    "DatasetMeta",
    "DatasetSpec",
    "InfiniteGroupedBatchSampler",
    "build_train_loader",
    "build_train_loader_from_cfg",
    "combined_roidb_for_training",
    "combined_roidb_from_cfg",
    "get_dataset",
    "get_minibatch",
    "load_catalog_file",
    "prepare_test_image",
    "register_dataset",
    "register_from_string",
    "resolve_short_name",
    "split_per_device",
]
