"""Dataset catalog: built-in names, short names, custom datasets via API, YAML file, env var and CLI string."""

from __future__ import annotations

import json
import os

import pytest

from pydetectron.data import catalog
from pydetectron.data.coco import CocoDataset


@pytest.fixture(autouse=True)
def _clean_registry(monkeypatch):
    monkeypatch.setattr(catalog, "_registered", {})
    monkeypatch.setattr(catalog, "_env_loaded", None)


def test_builtin_layout(monkeypatch, tmp_path):
    monkeypatch.setenv("PYDETECTRON_DATA", str(tmp_path))
    spec = catalog.get_dataset("coco_2017_train")
    assert spec.image_dir == str(tmp_path / "coco/images/train2017")
    assert spec.ann_file == str(tmp_path / "coco/annotations/instances_train2017.json")
    assert catalog.get_dataset("keypoints_coco_2014_minival").ann_file.endswith(
        "coco/annotations/person_keypoints_minival2014.json")
    assert catalog.get_dataset("coco_2014_valminusminival").image_dir.endswith("coco/images/val2014")
    assert catalog.get_dataset("shapes_val").ann_file == str(tmp_path / "shapes/annotations/instances_val.json")
    assert catalog.get_dataset("keypoints_shapes_train").image_dir == str(tmp_path / "shapes/train")


def test_short_names():
    s = catalog.resolve_short_name("coco2017")
    assert (s.train, s.test, s.num_classes) == (("coco_2017_train",), ("coco_2017_val",), 81)
    assert catalog.resolve_short_name("keypoints_coco2017").num_classes == 2
    assert catalog.resolve_short_name("shapes").train == ("shapes_train",)
    custom = catalog.resolve_short_name("coco_2014_minival")
    assert custom.train == custom.test == ("coco_2014_minival",)
    with pytest.raises(KeyError, match="unknown dataset 'nope'.*coco_2017_train"):
        catalog.resolve_short_name("nope")


def _tiny_json(path):
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg", "width": 10, "height": 10}],
                                "categories": [{"id": 4, "name": "thing"}], "annotations": []}))


def test_register_from_cli_string(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _tiny_json(tmp_path / "ann.json")
    spec = catalog.register_from_string("mydata:imgs/:ann.json")
    assert spec.image_dir == str(tmp_path / "imgs") and spec.ann_file == str(tmp_path / "ann.json")
    assert catalog.get_dataset("mydata") == spec and "mydata" in catalog.available_datasets()
    ds = CocoDataset("mydata")
    assert ds.get_roidb()[0]["image"] == os.path.join(str(tmp_path / "imgs"), "a.jpg")
    assert ds.meta.json_category_id_to_contiguous_id == {4: 1}
    for bad in ("mydata", "a:b", "a::c", "a:b:c:d"):
        with pytest.raises(ValueError, match="name:image_dir:ann_file"):
            catalog.register_from_string(bad)


def test_catalog_file_via_env_relative_to_file(tmp_path, monkeypatch):
    sub = tmp_path / "cat"
    sub.mkdir()
    _tiny_json(sub / "ann.json")
    (sub / "datasets.yaml").write_text("fromfile:\n  image_dir: pics\n  ann_file: ann.json\n")
    monkeypatch.setenv("PYDETECTRON_DATASETS", str(sub / "datasets.yaml"))
    spec = catalog.get_dataset("fromfile")
    assert spec.image_dir == str(sub / "pics") and spec.ann_file == str(sub / "ann.json")
    assert len(CocoDataset("fromfile").get_roidb()) == 1


def test_bad_catalog_files(tmp_path):
    (tmp_path / "a.yaml").write_text("x:\n  image_dir: i\n")
    with pytest.raises(ValueError, match="'x' needs keys"):
        catalog.load_catalog_file(str(tmp_path / "a.yaml"))
    (tmp_path / "b.yaml").write_text("[1, 2]")
    with pytest.raises(ValueError, match="must map names"):
        catalog.load_catalog_file(str(tmp_path / "b.yaml"))
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        catalog.load_catalog_file(str(tmp_path / "missing.yaml"))
