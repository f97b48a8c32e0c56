"""Dataset catalog: Detectron's dataset names, the tools' short names, and user-registered datasets.

Built-in datasets follow Detectron.pytorch's layout under the data directory (``<repo>/data`` unless
``PYDETECTRON_DATA`` says otherwise), e.g. ``coco/images/train2017`` + ``coco/annotations/instances_train2017.json``.

Custom datasets are added without code changes, three ways:
  * ``register_dataset(name, image_dir, ann_file)`` from Python;
  * a YAML catalog file ``name: {image_dir: ..., ann_file: ...}`` loaded with ``load_catalog_file(path)``, or
    listed (``os.pathsep``-separated) in the ``PYDETECTRON_DATASETS`` environment variable, read on first lookup;
  * the CLI string ``"name:image_dir:ann_file"`` passed to ``register_from_string`` (``--register`` in the tools).
Relative paths in a catalog file are relative to that file's folder; in the CLI string, to the working folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Tuple

import yaml

_REPO_DATA_DIR = Path(__file__).resolve().parents[3] / "data"
ENV_DATA_DIR = "PYDETECTRON_DATA"
ENV_CATALOG = "PYDETECTRON_DATASETS"


@dataclass(frozen=True)
class DatasetSpec:
    """Where a dataset's images and COCO-format annotation json live (absolute paths)."""

    name: str
    image_dir: str
    ann_file: str


@dataclass(frozen=True)
class ShortName:
    """A tools' ``--dataset`` short name: the train/test dataset tuples and MODEL.NUM_CLASSES to use."""

    train: Tuple[str, ...]
    test: Tuple[str, ...]
    num_classes: int


def _coco(images: str, ann: str) -> Tuple[str, str]:
    return f"coco/images/{images}", f"coco/annotations/{ann}.json"


# name -> (image dir, annotation file), relative to the data directory (Detectron.pytorch's dataset_catalog).
_BUILTIN: Dict[str, Tuple[str, str]] = {
    "coco_2014_train": _coco("train2014", "instances_train2014"),
    "coco_2014_val": _coco("val2014", "instances_val2014"),
    "coco_2014_minival": _coco("val2014", "instances_minival2014"),
    "coco_2014_valminusminival": _coco("val2014", "instances_valminusminival2014"),
    "coco_2015_test": _coco("test2015", "image_info_test2015"),
    "coco_2015_test-dev": _coco("test2015", "image_info_test-dev2015"),
    "coco_2017_train": _coco("train2017", "instances_train2017"),
    "coco_2017_val": _coco("val2017", "instances_val2017"),
    "coco_2017_test": _coco("test2015", "image_info_test2017"),
    "coco_2017_test-dev": _coco("test2015", "image_info_test-dev2017"),
    "keypoints_coco_2014_train": _coco("train2014", "person_keypoints_train2014"),
    "keypoints_coco_2014_val": _coco("val2014", "person_keypoints_val2014"),
    "keypoints_coco_2014_minival": _coco("val2014", "person_keypoints_minival2014"),
    "keypoints_coco_2014_valminusminival": _coco("val2014", "person_keypoints_valminusminival2014"),
    "keypoints_coco_2015_test": _coco("test2015", "image_info_test2015"),
    "keypoints_coco_2015_test-dev": _coco("test2015", "image_info_test-dev2015"),
    "keypoints_coco_2017_train": _coco("train2017", "person_keypoints_train2017"),
    "keypoints_coco_2017_val": _coco("val2017", "person_keypoints_val2017"),
    # The synthetic dataset written by tools/make_shapes_dataset.py (default --out data/shapes).
    "shapes_train": ("shapes/train", "shapes/annotations/instances_train.json"),
    "shapes_val": ("shapes/val", "shapes/annotations/instances_val.json"),
    "keypoints_shapes_train": ("shapes/train", "shapes/annotations/keypoints_train.json"),
    "keypoints_shapes_val": ("shapes/val", "shapes/annotations/keypoints_val.json"),
}

# The tools' --dataset short names (Detectron.pytorch's train_net_step.py / test_net.py).
SHORT_NAMES: Dict[str, ShortName] = {
    "coco2017": ShortName(("coco_2017_train",), ("coco_2017_val",), 81),
    "coco2014": ShortName(("coco_2014_train", "coco_2014_valminusminival"), ("coco_2014_minival",), 81),
    "keypoints_coco2017": ShortName(("keypoints_coco_2017_train",), ("keypoints_coco_2017_val",), 2),
    "keypoints_coco2014": ShortName(
        ("keypoints_coco_2014_train", "keypoints_coco_2014_valminusminival"), ("keypoints_coco_2014_minival",), 2
    ),
    "shapes": ShortName(("shapes_train",), ("shapes_val",), 4),
    "keypoints_shapes": ShortName(("keypoints_shapes_train",), ("keypoints_shapes_val",), 2),
}

_registered: Dict[str, DatasetSpec] = {}
_env_loaded: str | None = None


def data_dir() -> Path:
    """The folder built-in dataset paths are relative to (Detectron's DATA_DIR)."""
    return Path(os.environ.get(ENV_DATA_DIR, str(_REPO_DATA_DIR))).expanduser().resolve()


def register_dataset(name: str, image_dir: str, ann_file: str, base_dir: str | None = None) -> DatasetSpec:
    """Register (or replace) dataset ``name``; relative paths are resolved against ``base_dir`` (default cwd)."""
    if not name or not isinstance(name, str):
        raise ValueError(f"dataset name must be a non-empty string, got {name!r}")
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    spec = DatasetSpec(
        name,
        str((base / Path(image_dir).expanduser()).resolve()),
        str((base / Path(ann_file).expanduser()).resolve()),
    )
    _registered[name] = spec
    return spec


def register_from_string(text: str) -> DatasetSpec:
    """Register from the CLI form ``"name:image_dir:ann_file"`` (paths relative to the working folder)."""
    parts = text.split(":")
    if len(parts) != 3 or not all(parts):
        raise ValueError(f"--register expects 'name:image_dir:ann_file', got {text!r}")
    return register_dataset(*parts)


def load_catalog_file(path: str) -> Dict[str, DatasetSpec]:
    """Register every dataset of a YAML catalog file ``name: {image_dir: ..., ann_file: ...}``."""
    path = str(Path(path).expanduser())
    try:
        with open(path) as f:
            entries = yaml.safe_load(f)
    except OSError as e:
        raise FileNotFoundError(f"dataset catalog file {path!r} cannot be read: {e}") from e
    except yaml.YAMLError as e:
        raise ValueError(f"dataset catalog file {path!r} is not valid YAML: {e}") from e
    if not isinstance(entries, dict):
        raise ValueError(f"dataset catalog file {path!r} must map names to {{image_dir, ann_file}}")
    out = {}
    for name, entry in entries.items():
        if not isinstance(entry, dict) or {"image_dir", "ann_file"} - set(entry):
            raise ValueError(f"dataset catalog file {path!r}: entry {name!r} needs keys 'image_dir' and 'ann_file'")
        out[name] = register_dataset(str(name), entry["image_dir"], entry["ann_file"], base_dir=Path(path).parent)
    return out


def _load_env_catalogs() -> None:
    """Load the catalog files named by PYDETECTRON_DATASETS once (again if the variable changes)."""
    global _env_loaded
    value = os.environ.get(ENV_CATALOG, "")
    if value == _env_loaded:
        return
    _env_loaded = value
    for path in filter(None, value.split(os.pathsep)):
        load_catalog_file(path)


def get_dataset(name: str) -> DatasetSpec:
    """The paths of dataset ``name`` (registered datasets shadow built-in ones)."""
    _load_env_catalogs()
    if name in _registered:
        return _registered[name]
    if name in _BUILTIN:
        image_dir, ann_file = _BUILTIN[name]
        root = data_dir()
        return DatasetSpec(name, str(root / image_dir), str(root / ann_file))
    raise KeyError(f"unknown dataset {name!r}; known: {', '.join(available_datasets())}")


def available_datasets() -> list[str]:
    """Every dataset name a lookup accepts."""
    _load_env_catalogs()
    return sorted(set(_BUILTIN) | set(_registered))


def resolve_short_name(name: str) -> ShortName:
    """A tools' ``--dataset`` value: a short name, or any catalog name (used for training and testing; its
    ``num_classes`` is then 0: take it from the json, ``CocoDataset(name).meta.num_classes``)."""
    if name in SHORT_NAMES:
        return SHORT_NAMES[name]
    get_dataset(name)  # raises with the list of names if unknown
    return ShortName((name,), (name,), 0)
