"""pydetectron.config: defaults, merging, renamed / deprecated keys, errors, freezing, inference."""

from __future__ import annotations

import copy
import logging
import math
import pickle
from pathlib import Path

import numpy as np
import pytest

from pydetectron.config import (
    CfgNode,
    ConfigError,
    FrozenConfigError,
    UnknownConfigKeyError,
    assert_and_infer_cfg,
    cfg_to_yaml,
    get_cfg,
    merge_cfg_from_cfg,
    merge_cfg_from_file,
    merge_cfg_from_list,
    merge_cfg_from_str,
    normalize_module_name,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# configs/detectron2/ holds detectron2-format YAMLs (read by load_detectron2_config: tests/test_detectron2_config.py)
ALL_YAMLS = sorted(p for p in CONFIGS.rglob("*.yaml") if "detectron2" not in p.relative_to(CONFIGS).parts)

# Values copied by hand from facebookresearch/Detectron detectron/core/config.py (master, commit 04155a0,
# "replace numpy.bool with bool"), except the Detectron.pytorch rows, read from roytseng-tw/Detectron.pytorch
# lib/core/config.py (master, commit 1b1c4ba).
DETECTRON_DEFAULTS = {
    "TRAIN.WEIGHTS": "",
    "TRAIN.DATASETS": (),
    "TRAIN.SCALES": (600,),
    "TRAIN.MAX_SIZE": 1000,
    "TRAIN.IMS_PER_BATCH": 2,
    "TRAIN.BATCH_SIZE_PER_IM": 64,
    "TRAIN.FG_FRACTION": 0.25,
    "TRAIN.FG_THRESH": 0.5,
    "TRAIN.BG_THRESH_HI": 0.5,
    "TRAIN.BG_THRESH_LO": 0.0,
    "TRAIN.USE_FLIPPED": True,
    "TRAIN.BBOX_THRESH": 0.5,
    "TRAIN.SNAPSHOT_ITERS": 80000,
    "TRAIN.RPN_POSITIVE_OVERLAP": 0.7,
    "TRAIN.RPN_NEGATIVE_OVERLAP": 0.3,
    "TRAIN.RPN_FG_FRACTION": 0.5,
    "TRAIN.RPN_BATCH_SIZE_PER_IM": 256,
    "TRAIN.RPN_NMS_THRESH": 0.7,
    "TRAIN.RPN_PRE_NMS_TOP_N": 12000,
    "TRAIN.RPN_POST_NMS_TOP_N": 2000,
    "TRAIN.RPN_STRADDLE_THRESH": 0,
    "TRAIN.CROWD_FILTER_THRESH": 0.7,
    "TRAIN.GT_MIN_AREA": -1,
    "TRAIN.FREEZE_AT": 2,
    "DATA_LOADER.NUM_THREADS": 4,
    "TEST.SCALE": 600,
    "TEST.MAX_SIZE": 1000,
    "TEST.NMS": 0.3,
    "TEST.BBOX_REG": True,
    "TEST.PROPOSAL_LIMIT": 2000,
    "TEST.RPN_PRE_NMS_TOP_N": 12000,
    "TEST.RPN_POST_NMS_TOP_N": 2000,
    "TEST.DETECTIONS_PER_IM": 100,
    "TEST.SCORE_THRESH": 0.05,
    "TEST.PRECOMPUTED_PROPOSALS": True,
    "TEST.BBOX_AUG.SCORE_HEUR": "UNION",
    "TEST.BBOX_AUG.MAX_SIZE": 4000,
    "TEST.BBOX_AUG.AREA_TH_LO": 2500,
    "TEST.BBOX_AUG.AREA_TH_HI": 32400,
    "TEST.MASK_AUG.HEUR": "SOFT_AVG",
    "TEST.KPS_AUG.HEUR": "HM_AVG",
    "TEST.SOFT_NMS.METHOD": "linear",
    "TEST.SOFT_NMS.SIGMA": 0.5,
    "TEST.BBOX_VOTE.VOTE_TH": 0.8,
    "TEST.BBOX_VOTE.SCORING_METHOD": "ID",
    "MODEL.NUM_CLASSES": -1,
    "MODEL.BBOX_REG_WEIGHTS": (10.0, 10.0, 5.0, 5.0),
    "MODEL.FASTER_RCNN": False,
    "MODEL.EXECUTION_TYPE": "dag",
    "RETINANET.ASPECT_RATIOS": (0.5, 1.0, 2.0),
    "RETINANET.SCALES_PER_OCTAVE": 3,
    "RETINANET.ANCHOR_SCALE": 4,
    "RETINANET.BBOX_REG_BETA": 0.11,
    "RETINANET.LOSS_ALPHA": 0.25,
    "RETINANET.LOSS_GAMMA": 2.0,
    "RETINANET.PRIOR_PROB": 0.01,
    "SOLVER.BASE_LR": 0.001,
    "SOLVER.LR_POLICY": "step",
    "SOLVER.GAMMA": 0.1,
    "SOLVER.STEP_SIZE": 30000,
    "SOLVER.STEPS": [],
    "SOLVER.MAX_ITER": 40000,
    "SOLVER.MOMENTUM": 0.9,
    "SOLVER.WEIGHT_DECAY": 0.0005,
    "SOLVER.WEIGHT_DECAY_GN": 0.0,
    "SOLVER.WARM_UP_ITERS": 500,
    "SOLVER.WARM_UP_METHOD": "linear",
    "SOLVER.SCALE_MOMENTUM_THRESHOLD": 1.1,
    "FAST_RCNN.MLP_HEAD_DIM": 1024,
    "FAST_RCNN.CONV_HEAD_DIM": 256,
    "FAST_RCNN.NUM_STACKED_CONVS": 4,
    "FAST_RCNN.ROI_XFORM_METHOD": "RoIPoolF",
    "FAST_RCNN.ROI_XFORM_SAMPLING_RATIO": 0,
    "FAST_RCNN.ROI_XFORM_RESOLUTION": 14,
    "RPN.SIZES": (64, 128, 256, 512),
    "RPN.STRIDE": 16,
    "RPN.ASPECT_RATIOS": (0.5, 1, 2),
    "FPN.DIM": 256,
    "FPN.COARSEST_STRIDE": 32,
    "FPN.ROI_CANONICAL_SCALE": 224,
    "FPN.ROI_CANONICAL_LEVEL": 4,
    "FPN.ROI_MAX_LEVEL": 5,
    "FPN.ROI_MIN_LEVEL": 2,
    "FPN.RPN_MAX_LEVEL": 6,
    "FPN.RPN_MIN_LEVEL": 2,
    "FPN.RPN_ANCHOR_START_SIZE": 32,
    "MRCNN.RESOLUTION": 14,
    "MRCNN.ROI_XFORM_METHOD": "RoIAlign",
    "MRCNN.ROI_XFORM_RESOLUTION": 7,
    "MRCNN.DIM_REDUCED": 256,
    "MRCNN.DILATION": 2,
    "MRCNN.UPSAMPLE_RATIO": 1,
    "MRCNN.CONV_INIT": "GaussianFill",
    "MRCNN.CLS_SPECIFIC_MASK": True,
    "MRCNN.THRESH_BINARIZE": 0.5,
    "KRCNN.HEATMAP_SIZE": -1,
    "KRCNN.UP_SCALE": -1,
    "KRCNN.DECONV_DIM": 256,
    "KRCNN.DECONV_KERNEL": 4,
    "KRCNN.NUM_STACKED_CONVS": 8,
    "KRCNN.CONV_HEAD_DIM": 256,
    "KRCNN.CONV_HEAD_KERNEL": 3,
    "KRCNN.KEYPOINT_CONFIDENCE": "bbox",
    "KRCNN.MIN_KEYPOINT_COUNT_FOR_VALID_MINIBATCH": 20,
    "KRCNN.NORMALIZE_BY_VISIBLE_KEYPOINTS": True,
    "RFCN.PS_GRID_SIZE": 3,
    "RESNETS.NUM_GROUPS": 1,
    "RESNETS.WIDTH_PER_GROUP": 64,
    "RESNETS.STRIDE_1X1": True,
    "RESNETS.TRANS_FUNC": "bottleneck_transformation",
    "RESNETS.STEM_FUNC": "basic_bn_stem",
    "RESNETS.SHORTCUT_FUNC": "basic_bn_shortcut",
    "RESNETS.RES5_DILATION": 1,
    "GROUP_NORM.DIM_PER_GP": -1,
    "GROUP_NORM.NUM_GROUPS": 32,
    "GROUP_NORM.EPSILON": 1e-5,
    "NUM_GPUS": 1,
    "RNG_SEED": 3,
    "EPS": 1e-14,
    "VIS_TH": 0.9,
    "OUTPUT_DIR": "/tmp",
    # Detectron.pytorch additions
    "SOLVER.TYPE": "SGD",
    "SOLVER.BIAS_DOUBLE_LR": True,
    "SOLVER.BIAS_WEIGHT_DECAY": False,
    "MODEL.LOAD_IMAGENET_PRETRAINED_WEIGHTS": True,
    "RESNETS.IMAGENET_PRETRAINED_WEIGHTS": "",
    "RESNETS.FREEZE_AT": 2,
    "RESNETS.USE_GN": False,
    "RPN.CLS_ACTIVATION": "sigmoid",
    "MRCNN.MEMORY_EFFICIENT_LOSS": True,
    "CROP_RESIZE_WITH_MAX_POOL": True,
}


def _get(cfg: CfgNode, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def _write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------------ defaults
@pytest.mark.parametrize("key", sorted(DETECTRON_DEFAULTS))
def test_default_matches_detectron(key):
    value, expected = _get(get_cfg(), key), DETECTRON_DEFAULTS[key]
    assert type(value) is type(expected), key
    assert value == expected, key


def test_array_and_computed_defaults():
    cfg = get_cfg()
    assert cfg.PIXEL_MEANS.shape == (1, 1, 3)
    np.testing.assert_array_equal(cfg.PIXEL_MEANS.ravel(), [102.9801, 115.9465, 122.7717])
    np.testing.assert_array_equal(cfg.PIXEL_STDS.ravel(), [1.0, 1.0, 1.0])
    assert cfg.BBOX_XFORM_CLIP == pytest.approx(math.log(1000 / 16)) and type(cfg.BBOX_XFORM_CLIP) is float
    assert cfg.DEDUP_BOXES == pytest.approx(0.0625)
    assert cfg.SOLVER.WARM_UP_FACTOR == pytest.approx(1 / 3)
    assert cfg.RESNETS.NORM == "AffineChannel" and cfg.MODEL.INPUT_COLOR_ORDER == "BGR"
    assert cfg.KRCNN.OKS_SIGMAS == () and cfg.SOLVER.LAYER_WISE_LR_DECAY == 1.0
    assert not cfg.FAST_RCNN.ROI_XFORM_ALIGNED and not cfg.MRCNN.ROI_XFORM_ALIGNED


def test_get_cfg_returns_independent_copies():
    a, b = get_cfg(), get_cfg()
    a.TRAIN.SCALES = (1,)
    a.SOLVER.STEPS.append(5)
    a.PIXEL_MEANS[0, 0, 0] = -1.0
    assert b.TRAIN.SCALES == (600,) and b.SOLVER.STEPS == []
    assert b.PIXEL_MEANS[0, 0, 0] == pytest.approx(102.9801)
    assert get_cfg().SOLVER.STEPS == [] and get_cfg().PIXEL_MEANS[0, 0, 0] == pytest.approx(102.9801)


# ------------------------------------------------------------------------------------------ shipped YAMLs
@pytest.mark.parametrize("path", ALL_YAMLS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_shipped_config_merges_and_passes_checks(path):
    cfg = get_cfg()
    merge_cfg_from_file(cfg, str(path))
    assert_and_infer_cfg(cfg)
    assert cfg.is_frozen()
    assert cfg.MODEL.CONV_BODY, "every shipped config names its body"


def test_shipped_configs_exist():
    names = {p.relative_to(CONFIGS).as_posix() for p in ALL_YAMLS}
    assert {"baselines/e2e_mask_rcnn_R-50-FPN_1x.yaml", "gn_baselines/scratch_e2e_mask_rcnn_R-50-FPN_3x_gn.yaml",
            "baselines/fast_rcnn_R-50-FPN_1x.yaml"} <= names


def test_baseline_values_are_detectrons():
    cfg = get_cfg()
    merge_cfg_from_file(cfg, str(CONFIGS / "baselines" / "e2e_mask_rcnn_R-50-FPN_1x.yaml"))
    assert_and_infer_cfg(cfg)
    assert cfg.SOLVER.STEPS == [0, 60000, 80000] and cfg.SOLVER.MAX_ITER == 90000 and cfg.SOLVER.BASE_LR == 0.02
    assert cfg.TRAIN.SCALES == (800,) and cfg.TRAIN.MAX_SIZE == 1333 and cfg.TRAIN.BATCH_SIZE_PER_IM == 512
    assert cfg.MRCNN.RESOLUTION == 28 and cfg.MRCNN.ROI_XFORM_SAMPLING_RATIO == 2
    assert cfg.RPN.RPN_ON and not cfg.TEST.PRECOMPUTED_PROPOSALS
    assert cfg.TRAIN.DATASETS == ("coco_2014_train", "coco_2014_valminusminival")


# ------------------------------------------------------------------------------------------ module names
def test_detectron_and_detectron_pytorch_module_names_both_load(tmp_path):
    spellings = {
        "detectron": ("FPN.add_fpn_ResNet50_conv5_body", "fast_rcnn_heads.add_roi_2mlp_head"),
        "pytorch": ("FPN.fpn_ResNet50_conv5_body", "fast_rcnn_heads.roi_2mlp_head"),
    }
    for style, (body, head) in spellings.items():
        path = _write(tmp_path, f"MODEL:\n  CONV_BODY: {body}\nFAST_RCNN:\n  ROI_BOX_HEAD: {head}\n", f"{style}.yaml")
        cfg = get_cfg()
        merge_cfg_from_file(cfg, str(path))
        assert_and_infer_cfg(cfg)
        assert cfg.MODEL.CONV_BODY == body  # the config keeps the string as written
        assert normalize_module_name(cfg.MODEL.CONV_BODY) == "fpn_ResNet50_conv5_body"
        assert normalize_module_name(cfg.FAST_RCNN.ROI_BOX_HEAD) == "roi_2mlp_head"


# ------------------------------------------------------------------------------------------ renamed / deprecated
def test_renamed_keys_are_translated_with_a_warning(tmp_path, caplog):
    path = _write(tmp_path, "MODEL:\n  ROI_HEAD: head_builder.add_roi_2mlp_head\n  PS_GRID_SIZE: 7\n"
                            "MRCNN:\n  MASK_HEAD_NAME: mask_rcnn_heads.mask_rcnn_fcn_head_v1up\n"
                            "TRAIN:\n  DATASET: coco_2014_train:coco_2014_valminusminival\n"
                            "TEST:\n  DATASET: coco_2014_minival\n  SCALES: (800,)\n")
    cfg = get_cfg()
    with caplog.at_level(logging.WARNING):
        merge_cfg_from_file(cfg, str(path))
    assert cfg.FAST_RCNN.ROI_BOX_HEAD == "head_builder.add_roi_2mlp_head"
    assert cfg.RFCN.PS_GRID_SIZE == 7
    assert cfg.MRCNN.ROI_MASK_HEAD == "mask_rcnn_heads.mask_rcnn_fcn_head_v1up"
    assert cfg.TRAIN.DATASETS == ("coco_2014_train", "coco_2014_valminusminival")
    assert cfg.TEST.DATASETS == ("coco_2014_minival",)
    assert cfg.TEST.SCALE == 800
    assert "MODEL.ROI_HEAD was renamed to FAST_RCNN.ROI_BOX_HEAD" in caplog.text
    assert "ROI_HEAD" not in cfg.MODEL


def test_renamed_key_from_list_and_untranslatable_renames():
    cfg = get_cfg()
    merge_cfg_from_list(cfg, ["MODEL.ROI_HEAD", "fast_rcnn_heads.add_roi_2mlp_head"])
    assert cfg.FAST_RCNN.ROI_BOX_HEAD == "fast_rcnn_heads.add_roi_2mlp_head"
    with pytest.raises(UnknownConfigKeyError, match="EXAMPLE.RENAMED.KEY was renamed to EXAMPLE.KEY"):
        merge_cfg_from_list(cfg, ["EXAMPLE.RENAMED.KEY", "1"])
    with pytest.raises(ConfigError, match="TEST.SCALE"):
        merge_cfg_from_list(cfg, ["TEST.SCALES", "(600, 800)"])


def test_deprecated_keys_warn_and_are_ignored(tmp_path, caplog):
    path = _write(tmp_path, "USE_GPU_NMS: True\nMODEL:\n  DILATION: 2\nRPN:\n  ON: True\nTEST:\n  NMS: 0.4\n")
    cfg = get_cfg()
    before = cfg_to_yaml(get_cfg())
    with caplog.at_level(logging.WARNING):
        merge_cfg_from_file(cfg, str(path))
    for key in ("USE_GPU_NMS", "MODEL.DILATION", "RPN.ON"):
        assert f"Deprecated config key (ignoring): {key}" in caplog.text
    assert cfg.TEST.NMS == 0.4
    cfg.TEST.NMS = 0.3
    assert cfg_to_yaml(cfg) == before  # nothing else changed


# ------------------------------------------------------------------------------------------ errors
def test_unknown_key_error_names_key_file_and_suggestion(tmp_path):
    path = _write(tmp_path, "TRAIN:\n  SCALE: (800,)\n")
    with pytest.raises(UnknownConfigKeyError) as info:
        merge_cfg_from_file(get_cfg(), str(path))
    message = str(info.value)
    assert "TRAIN.SCALE" in message and str(path) in message and "TRAIN.SCALES" in message
    assert isinstance(info.value, KeyError)


def test_unknown_section_and_list_key_suggestions():
    with pytest.raises(UnknownConfigKeyError, match="Did you mean .*SOLVER.BASE_LR"):
        merge_cfg_from_list(get_cfg(), ["SOLVR.BASE_LR", "0.1"])
    with pytest.raises(UnknownConfigKeyError, match="command-line"):
        merge_cfg_from_list(get_cfg(), ["NOT_A_KEY_AT_ALL", "1"])
    with pytest.raises(AttributeError, match="did you mean TRAIN.SCALES"):
        _ = get_cfg().TRAIN.SCLAES


def test_wrong_type_errors_name_key_and_file(tmp_path):
    path = _write(tmp_path, "TRAIN:\n  MAX_SIZE: big\n")
    with pytest.raises(ConfigError) as info:
        merge_cfg_from_file(get_cfg(), str(path))
    assert "TRAIN.MAX_SIZE" in str(info.value) and str(path) in str(info.value) and "int" in str(info.value)
    cases = [("TRAIN.SCALES", "800"), ("MODEL.MASK_ON", "1"), ("TRAIN.IMS_PER_BATCH", "2.5"),
             ("TRAIN.USE_FLIPPED", "'yes'"), ("PIXEL_MEANS", "[1, 2]"), ("MODEL.CONV_BODY", ("a", "b"))]
    for key, value in cases:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            merge_cfg_from_list(get_cfg(), [key, value])
    with pytest.raises(ConfigError, match=r"TRAIN \(in command-line overrides\) is a section"):
        merge_cfg_from_list(get_cfg(), ["TRAIN", "1"])


def test_bad_files_are_reported_with_their_path(tmp_path):
    with pytest.raises(ConfigError, match="missing.yaml"):
        merge_cfg_from_file(get_cfg(), str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="list.yaml"):
        merge_cfg_from_file(get_cfg(), str(_write(tmp_path, "- 1\n- 2\n", "list.yaml")))
    with pytest.raises(ConfigError, match="broken.yaml"):
        merge_cfg_from_file(get_cfg(), str(_write(tmp_path, "TRAIN: [1, 2\n", "broken.yaml")))


# ------------------------------------------------------------------------------------------ value parsing
def test_list_merge_parsing_and_coercions():
    cfg = get_cfg()
    merge_cfg_from_list(cfg, [
        "TRAIN.SCALES", "(600, 800)",
        "SOLVER.STEPS", "(0, 10, 20)",  # tuple -> list
        "TEST.NMS", "0.45",
        "SOLVER.BASE_LR", "1",  # int -> float
        "PIXEL_MEANS", "[1, 2, 3]",  # flat -> (1, 1, 3)
        "OUTPUT_DIR", "1e5",  # a str key keeps the text, not a number
        "MODEL.CONV_BODY", "'FPN.fpn_ResNet50_conv5_body'",  # a quoted literal loses its quotes
        "TEST.BBOX_AUG.ENABLED", "True",
        "KRCNN.OKS_SIGMAS", "[0.07, 0.07, 0.07]",
        "TRAIN.DATASETS", "('a',)",
        "SOLVER.MAX_ITER", "1e5",  # a whole float -> int
    ])
    assert cfg.TRAIN.SCALES == (600, 800) and cfg.SOLVER.STEPS == [0, 10, 20]
    assert cfg.TEST.NMS == 0.45 and type(cfg.SOLVER.BASE_LR) is float and cfg.SOLVER.BASE_LR == 1.0
    assert cfg.PIXEL_MEANS.shape == (1, 1, 3) and cfg.PIXEL_MEANS.ravel().tolist() == [1.0, 2.0, 3.0]
    assert cfg.OUTPUT_DIR == "1e5" and cfg.MODEL.CONV_BODY == "FPN.fpn_ResNet50_conv5_body"
    assert cfg.TEST.BBOX_AUG.ENABLED is True and cfg.KRCNN.OKS_SIGMAS == (0.07, 0.07, 0.07)
    assert cfg.TRAIN.DATASETS == ("a",)
    assert cfg.SOLVER.MAX_ITER == 100000 and type(cfg.SOLVER.MAX_ITER) is int
    with pytest.raises(ConfigError, match="odd number"):
        merge_cfg_from_list(cfg, ["TEST.NMS"])


def test_merge_cfg_from_cfg_and_nested_sections():
    cfg = get_cfg()
    merge_cfg_from_cfg(cfg, {"TEST": {"BBOX_AUG": {"ENABLED": True, "SCALES": [400, 500]}}, "NUM_GPUS": 2})
    assert cfg.TEST.BBOX_AUG.ENABLED and cfg.TEST.BBOX_AUG.SCALES == (400, 500) and cfg.NUM_GPUS == 2
    assert cfg.TEST.BBOX_AUG.MAX_SIZE == 4000  # untouched siblings keep their value
    with pytest.raises(UnknownConfigKeyError, match="TEST.BBOX_AUG.NOPE"):
        merge_cfg_from_cfg(cfg, {"TEST": {"BBOX_AUG": {"NOPE": 1}}})


def test_equality_compares_arrays_and_nested_values():
    a, b = get_cfg(), get_cfg()
    assert a == b and not a != b
    b.PIXEL_MEANS[0, 0, 1] += 1.0
    assert a != b
    b = get_cfg()
    b.TEST.BBOX_AUG.MAX_SIZE = 1
    assert a != b and a != {} and a != "cfg"


def test_yaml_round_trip():
    cfg = get_cfg()
    merge_cfg_from_file(cfg, str(CONFIGS / "baselines" / "e2e_keypoint_rcnn_R-50-FPN_1x.yaml"))
    merge_cfg_from_list(cfg, ["PIXEL_STDS", "[57.4, 57.1, 58.4]"])
    assert_and_infer_cfg(cfg)
    text = cfg_to_yaml(cfg)
    again = merge_cfg_from_str(get_cfg(), text)
    assert cfg_to_yaml(again) == text and again == cfg
    assert again.TRAIN.SCALES == cfg.TRAIN.SCALES and isinstance(again.TRAIN.SCALES, tuple)
    np.testing.assert_array_equal(again.PIXEL_STDS, cfg.PIXEL_STDS)


# ------------------------------------------------------------------------------------------ freezing
def test_frozen_cfg_refuses_every_mutation():
    cfg = assert_and_infer_cfg(get_cfg())
    mutations = [
        lambda: setattr(cfg.TRAIN, "SCALES", (1,)),
        lambda: cfg.TRAIN.__setitem__("SCALES", (1,)),
        lambda: setattr(cfg, "NUM_GPUS", 2),
        lambda: cfg.TEST.BBOX_AUG.update(ENABLED=True),
        lambda: cfg.MODEL.pop("TYPE"),
        lambda: cfg.TRAIN.__delitem__("SCALES"),
        lambda: setattr(cfg.TRAIN, "NEW_KEY", 1),
        lambda: merge_cfg_from_list(cfg, ["TEST.NMS", "0.1"]),
    ]
    for mutate in mutations:
        with pytest.raises(FrozenConfigError):
            mutate()
    with pytest.raises(FrozenConfigError, match="TRAIN.SCALES"):
        cfg.TRAIN.SCALES = (1,)
    with pytest.raises(ValueError, match="read-only"):
        cfg.PIXEL_MEANS[0, 0, 0] = 0.0
    assert cfg.TRAIN.SCALES == (600,) and cfg.TEST.NMS == 0.3


def test_clone_copy_and_pickle():
    cfg = assert_and_infer_cfg(get_cfg())
    clone = cfg.clone()
    assert not clone.is_frozen() and cfg.is_frozen()
    clone.TRAIN.SCALES = (1,)
    clone.PIXEL_MEANS[0, 0, 0] = 0.0
    assert cfg.TRAIN.SCALES == (600,) and cfg.PIXEL_MEANS[0, 0, 0] != 0.0
    for restored in (copy.deepcopy(cfg), pickle.loads(pickle.dumps(cfg))):
        assert restored.is_frozen() and restored.TRAIN.is_frozen()
        assert cfg_to_yaml(restored) == cfg_to_yaml(cfg)
        with pytest.raises(FrozenConfigError, match="TEST.NMS"):
            restored.TEST.NMS = 0.1
    assert cfg.defrost() is cfg and not cfg.TRAIN.is_frozen()
    cfg.PIXEL_MEANS[0, 0, 0] = 1.0  # writable again after defrost


# ------------------------------------------------------------------------------------------ inference and checks
def _with(*pairs: str) -> CfgNode:
    cfg = get_cfg()
    merge_cfg_from_list(cfg, list(pairs))
    return assert_and_infer_cfg(cfg)


def test_rpn_and_proposal_inference():
    assert not _with().RPN.RPN_ON and _with().TEST.PRECOMPUTED_PROPOSALS
    for key in ("MODEL.FASTER_RCNN", "MODEL.RPN_ONLY"):
        cfg = _with(key, "True")
        assert cfg.RPN.RPN_ON and not cfg.TEST.PRECOMPUTED_PROPOSALS
    cfg = _with("RETINANET.RETINANET_ON", "True")
    assert not cfg.RPN.RPN_ON and not cfg.TEST.PRECOMPUTED_PROPOSALS
    assert _with("MRCNN.ROI_MASK_HEAD", "mask_rcnn_heads.mask_rcnn_fcn_head_v0upshare").MODEL.SHARE_RES5
    assert not _with("MRCNN.ROI_MASK_HEAD", "mask_rcnn_heads.mask_rcnn_fcn_head_v0up").MODEL.SHARE_RES5


def test_freeze_at_spellings_are_reconciled():
    assert _with("TRAIN.FREEZE_AT", "0").RESNETS.FREEZE_AT == 0
    assert _with("RESNETS.FREEZE_AT", "4").TRAIN.FREEZE_AT == 4
    with pytest.raises(ConfigError, match="disagree"):
        _with("TRAIN.FREEZE_AT", "0", "RESNETS.FREEZE_AT", "4")
    with pytest.raises(ConfigError, match="FREEZE_AT"):
        _with("RESNETS.FREEZE_AT", "7")


def test_norm_selection():
    assert _with("RESNETS.USE_GN", "True").RESNETS.NORM == "GN"
    assert _with("RESNETS.TRANS_FUNC", "bottleneck_gn_transformation").RESNETS.NORM == "GN"
    cfg = _with("RESNETS.NORM", "GN")
    assert cfg.RESNETS.USE_GN
    cfg = _with("RESNETS.NORM", "SyncBN")
    assert cfg.RESNETS.NORM == "SyncBN" and not cfg.RESNETS.USE_GN
    with pytest.raises(ConfigError, match="contradicts RESNETS.USE_GN"):
        _with("RESNETS.NORM", "BN", "RESNETS.USE_GN", "True")
    with pytest.raises(ConfigError, match="RESNETS.NORM"):
        _with("RESNETS.NORM", "LayerNorm")


@pytest.mark.parametrize("pairs, key", [
    (("SOLVER.TYPE", "RMSprop"), "SOLVER.TYPE"),
    (("SOLVER.LR_POLICY", "steps_with_decay", "SOLVER.STEPS", "[60000, 80000]"), "SOLVER.STEPS"),
    (("SOLVER.LR_POLICY", "steps_with_lrs", "SOLVER.STEPS", "[0, 10]", "SOLVER.LRS", "[0.1]"), "SOLVER.LRS"),
    (("MODEL.INPUT_COLOR_ORDER", "GBR"), "MODEL.INPUT_COLOR_ORDER"),
    (("PIXEL_STDS", "[1, 0, 1]"), "PIXEL_STDS"),
    (("TRAIN.SCALES", "()"), "TRAIN.SCALES"),
    (("FAST_RCNN.ROI_XFORM_METHOD", "RoIWarp"), "FAST_RCNN.ROI_XFORM_METHOD"),
    (("FPN.RPN_MIN_LEVEL", "7"), "FPN.RPN_MIN_LEVEL"),
    (("GROUP_NORM.DIM_PER_GP", "16"), "GROUP_NORM.DIM_PER_GP"),
    (("MODEL.KEYPOINTS_ON", "True"), "KRCNN.NUM_KEYPOINTS"),
    (("KRCNN.NUM_KEYPOINTS", "3", "KRCNN.OKS_SIGMAS", "(0.07, 0.07)"), "KRCNN.OKS_SIGMAS"),
    (("SOLVER.LAYER_WISE_LR_DECAY", "0.0"), "SOLVER.LAYER_WISE_LR_DECAY"),
    (("SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "full_model"), "SOLVER.CLIP_GRADIENTS.CLIP_TYPE"),
    (("SOLVER.CLIP_GRADIENTS.CLIP_VALUE", "0.0"), "SOLVER.CLIP_GRADIENTS.CLIP_VALUE"),
    (("TEST.PRECISE_BN.NUM_ITER", "0"), "TEST.PRECISE_BN.NUM_ITER"),
])
def test_checks_name_the_offending_key(pairs, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        _with(*pairs)


def test_valid_extras_pass_checks():
    cfg = _with("SOLVER.TYPE", "AdamW", "SOLVER.LR_POLICY", "cosine_decay", "SOLVER.LAYER_WISE_LR_DECAY", "0.8",
                "MODEL.INPUT_COLOR_ORDER", "RGB", "PIXEL_STDS", "[57.375, 57.12, 58.395]",
                "MODEL.KEYPOINTS_ON", "True", "KRCNN.NUM_KEYPOINTS", "3", "KRCNN.HEATMAP_SIZE", "56",
                "KRCNN.OKS_SIGMAS", "(0.07, 0.07, 0.07)", "SOLVER.OPTIMIZER", "Adam")
    assert cfg.SOLVER.TYPE == "Adam"  # SOLVER.OPTIMIZER is an alias of Detectron.pytorch's SOLVER.TYPE
    assert cfg.is_frozen()


def test_assert_and_infer_cfg_refuses_a_frozen_cfg():
    cfg = assert_and_infer_cfg(get_cfg())
    with pytest.raises(ConfigError, match="unfrozen"):
        assert_and_infer_cfg(cfg)
    assert not assert_and_infer_cfg(get_cfg(), make_immutable=False).is_frozen()
