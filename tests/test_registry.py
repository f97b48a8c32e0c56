"""pydetectron.modeling.registry: spellings, errors, lazy imports, and the names used by shipped configs."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pydetectron.config import get_cfg, merge_cfg_from_file
from pydetectron.modeling import registry

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture
def empty_registry(monkeypatch):
    """An isolated, empty registry so these tests neither see nor leave real builders."""
    monkeypatch.setattr(registry, "_REGISTRY", {kind: {} for kind in registry.KINDS})
    return registry


@pytest.mark.parametrize("spelling", [
    "FPN.add_fpn_ResNet50_conv5_body",  # Detectron
    "FPN.fpn_ResNet50_conv5_body",  # Detectron.pytorch
    "add_fpn_ResNet50_conv5_body",
    "fpn_ResNet50_conv5_body",
    "some.package.module.add_fpn_ResNet50_conv5_body",
])
def test_every_spelling_builds_the_same_builder(empty_registry, spelling):
    calls = []

    @registry.register("body", "FPN.add_fpn_ResNet50_conv5_body")
    def fpn_body(cfg, scale=1):
        calls.append((cfg, scale))
        return "built"

    assert registry.build("body", spelling, "cfg", scale=3) == "built"
    assert calls == [("cfg", 3)]
    assert registry.lookup("body", spelling) is fpn_body
    assert registry.registered("body") == ["fpn_ResNet50_conv5_body"]


def test_only_one_leading_add_is_stripped(empty_registry):
    @registry.register("box_head", "add_add_head")
    def builder():
        return None

    assert registry.registered("box_head") == ["add_head"]
    assert registry.lookup("box_head", "fast_rcnn_heads.add_add_head") is builder
    with pytest.raises(registry.RegistryError):
        registry.lookup("box_head", "head")


def test_unknown_name_lists_valid_names_sorted_and_closest(empty_registry):
    for name in ("roi_Xconv1fc_head", "roi_2mlp_head", "ResNet_roi_conv5_head"):
        registry.register("box_head", f"fast_rcnn_heads.{name}")(lambda *a: None)
    with pytest.raises(registry.RegistryError) as info:
        registry.build("box_head", "fast_rcnn_heads.add_roi_2mpl_head", None, 256, [0.25])
    message = str(info.value)
    assert "'fast_rcnn_heads.add_roi_2mpl_head'" in message
    assert "Closest match: 'roi_2mlp_head'" in message
    assert "ResNet_roi_conv5_head, roi_2mlp_head, roi_Xconv1fc_head" in message  # sorted
    assert isinstance(info.value, KeyError)


def test_unknown_kind_and_duplicates(empty_registry):
    for call in (lambda: registry.register("neck", "x"), lambda: registry.build("neck", "x"),
                 lambda: registry.registered("neck")):
        with pytest.raises(registry.RegistryError, match="unknown registry kind 'neck'.*body, box_head"):
            call()

    def first(cfg):
        return 1

    def second(cfg):
        return 2

    registry.register("mask_head", "mask_rcnn_heads.v1")(first)
    registry.register("mask_head", "v1")(first)  # the same builder twice is harmless
    with pytest.raises(registry.RegistryError, match="already registered"):
        registry.register("mask_head", "add_v1")(second)
    with pytest.raises(registry.RegistryError, match="empty"):
        registry.register("mask_head", "FPN.add_")
    with pytest.raises(registry.RegistryError, match="none registered"):
        registry.lookup("keypoint_head", "roi_pose_head_v1convX")


def test_import_builtin_modules_registers_them_and_a_missing_one_is_an_error(tmp_path, monkeypatch, empty_registry):
    (tmp_path / "pyd_reg_ok.py").write_text(textwrap.dedent("""
        from pydetectron.modeling.registry import register

        @register("keypoint_head", "keypoint_rcnn_heads.add_roi_pose_head_v1convX")
        def pose_head(cfg, dim_in, spatial_scales):
            return (dim_in, spatial_scales)
    """))
    (tmp_path / "pyd_reg_broken.py").write_text("import pyd_dependency_that_does_not_exist\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "BUILTIN_MODULES", ("pyd_reg_ok",))
    assert registry.import_builtin_modules() == ["pyd_reg_ok"]
    assert registry.build("keypoint_head", "roi_pose_head_v1convX", None, 256, [0.25]) == (256, [0.25])

    for modules, missing in ((("pyd_reg_ok", "pyd_reg_module_not_written"), "pyd_reg_module_not_written"),
                             (("pyd_reg_broken",), "pyd_dependency_that_does_not_exist")):
        monkeypatch.setattr(registry, "BUILTIN_MODULES", modules)
        with pytest.raises(ModuleNotFoundError, match=missing):
            registry.import_builtin_modules()


def test_registry_imports_no_model_code():
    code = ("import sys, pydetectron.modeling.registry\n"
            "print(sorted(m for m in sys.modules if m.startswith(('pydetectron.modeling', 'torch'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['pydetectron.modeling', 'pydetectron.modeling.registry']"


def _names_in_shipped_configs():
    keys = {"body": ("MODEL", "CONV_BODY"), "box_head": ("FAST_RCNN", "ROI_BOX_HEAD"),
            "mask_head": ("MRCNN", "ROI_MASK_HEAD"), "keypoint_head": ("KRCNN", "ROI_KEYPOINTS_HEAD"),
            "roi_heads": ("MODEL", "ROI_HEADS_NAME")}
    for path in sorted(CONFIGS.rglob("*.yaml")):
        if "detectron2" in path.relative_to(CONFIGS).parts:
            continue  # detectron2-format YAMLs: tests/test_detectron2_config.py
        cfg = get_cfg()
        merge_cfg_from_file(cfg, str(path))
        for kind, (section, key) in keys.items():
            if cfg[section][key]:
                yield path.relative_to(CONFIGS).as_posix(), kind, cfg[section][key]


@pytest.mark.parametrize("config, kind, name", list(_names_in_shipped_configs()))
def test_names_used_by_shipped_configs_are_registered(config, kind, name):
    registry.import_builtin_modules()
    registry.lookup(kind, name)
