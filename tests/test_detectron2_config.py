"""load_detectron2_config: detectron2 YAMLs (``_BASE_`` chains, d2 key names, opts) into pydetectron's tree.

Expected values are detectron2's defaults and model-zoo semantics written out by hand (detectron2's
config/defaults.py); tests/detectron2_peer/test_configs.py compares with a detectron2 build where one exists.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from pydetectron.config import assert_and_infer_cfg, merge_cfg_from_list
from pydetectron.config.detectron2 import NO_EFFECT, ONLY_DEFAULT, load_detectron2_config
from pydetectron.config.detectron2_defaults import D2_DEFAULTS
from pydetectron.config.detectron2_yaml import Detectron2ConfigError
from pydetectron.engine.training import TrainOptions, adapt_cfg, split_total_batch

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "detectron2"
SHIPPED = sorted(CONFIGS.rglob("*.yaml"))
FPN_MODEL = """
MODEL:
  META_ARCHITECTURE: GeneralizedRCNN
  BACKBONE: {NAME: build_resnet_fpn_backbone}
  RESNETS: {OUT_FEATURES: [res2, res3, res4, res5]}
  FPN: {IN_FEATURES: [res2, res3, res4, res5]}
  ANCHOR_GENERATOR: {SIZES: [[32], [64], [128], [256], [512]]}
  RPN: {IN_FEATURES: [p2, p3, p4, p5, p6]}
  ROI_HEADS: {NAME: StandardROIHeads, IN_FEATURES: [p2, p3, p4, p5]}
  ROI_BOX_HEAD: {NAME: FastRCNNConvFCHead, NUM_FC: 2, POOLER_RESOLUTION: 7}
"""


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def load_text(tmp_path: Path, text: str, opts=()):
    return load_detectron2_config(write(tmp_path, "model.yaml", text), opts)


# ---------------------------------------------------------------------------------------------- tables
def test_every_detectron2_key_has_one_rule():
    assert not set(NO_EFFECT) & set(ONLY_DEFAULT)
    assert set(NO_EFFECT) | set(ONLY_DEFAULT) <= set(D2_DEFAULTS)
    assert len(D2_DEFAULTS) >= 190  # detectron2 v0.6's table


def test_key_table_matches_detectron2_defaults_py():
    """Every assignment ``_C.X = value`` in detectron2's defaults.py (when its source is here) is in the table."""
    source = Path("/work/peers/detectron2/detectron2/config/defaults.py")
    if not source.is_file():
        pytest.skip("detectron2's source is not here")
    import re

    assigned = set(re.findall(r"^_C\.([A-Z0-9_.]+) = (?!CN\()", source.read_text(), flags=re.M))
    sections = {k for k in re.findall(r"^_C\.([A-Z0-9_.]+) = CN\(\{\"ENABLED\"", source.read_text(), flags=re.M)}
    assert assigned | {f"{s}.ENABLED" for s in sections} == set(D2_DEFAULTS)


# -------------------------------------------------------------------------------------- d2's defaults
def test_omitted_keys_get_detectron2_defaults(tmp_path):
    cfg = load_text(tmp_path, FPN_MODEL)
    assert cfg.MODEL.CONVENTIONS == "detectron2"
    assert cfg.MODEL.TYPE == "generalized_rcnn" and cfg.MODEL.FASTER_RCNN and not cfg.MODEL.MASK_ON
    assert cfg.MODEL.NUM_CLASSES == 81  # ROI_HEADS.NUM_CLASSES 80 + background
    assert cfg.TRAIN.BATCH_SIZE_PER_IM == 512 and cfg.TRAIN.FG_FRACTION == 0.25
    assert (cfg.TRAIN.FG_THRESH, cfg.TRAIN.BG_THRESH_HI, cfg.TRAIN.BG_THRESH_LO) == (0.5, 0.5, 0.0)
    assert cfg.TRAIN.RPN_PRE_NMS_TOP_N == 12000 and cfg.TEST.RPN_PRE_NMS_TOP_N == 6000
    assert cfg.TRAIN.RPN_POST_NMS_TOP_N == 2000 and cfg.TEST.RPN_POST_NMS_TOP_N == 1000
    assert (cfg.TRAIN.RPN_NEGATIVE_OVERLAP, cfg.TRAIN.RPN_POSITIVE_OVERLAP) == (0.3, 0.7)
    assert cfg.TRAIN.RPN_STRADDLE_THRESH == -1 and cfg.RPN.SMOOTH_L1_BETA == 0.0
    assert cfg.FAST_RCNN.SMOOTH_L1_BETA == 0.0 and cfg.MODEL.BBOX_REG_WEIGHTS == (10.0, 10.0, 5.0, 5.0)
    assert cfg.SOLVER.BASE_LR == 0.001 and cfg.SOLVER.WEIGHT_DECAY == 0.0001 and cfg.SOLVER.MOMENTUM == 0.9
    assert cfg.SOLVER.LR_POLICY == "steps_with_decay" and cfg.SOLVER.STEPS == [0, 30000]
    assert cfg.SOLVER.MAX_ITER == 40000 and cfg.SOLVER.WARM_UP_ITERS == 1000
    assert cfg.SOLVER.WARM_UP_FACTOR == pytest.approx(0.001) and cfg.SOLVER.WARM_UP_METHOD == "linear"
    assert not cfg.SOLVER.BIAS_DOUBLE_LR and cfg.SOLVER.BIAS_WEIGHT_DECAY and cfg.SOLVER.WEIGHT_DECAY_GN == 0.0
    assert cfg.SOLVER.IMS_PER_BATCH == 16 and cfg.TRAIN.SNAPSHOT_ITERS == 5000
    assert cfg.TRAIN.SCALES == (800,) and cfg.TRAIN.MAX_SIZE == 1333
    assert (cfg.TEST.SCALE, cfg.TEST.MAX_SIZE) == (800, 1333) and cfg.TRAIN.USE_FLIPPED
    assert cfg.PIXEL_MEANS.ravel().tolist() == [103.530, 116.280, 123.675]
    assert cfg.PIXEL_STDS.ravel().tolist() == [1.0, 1.0, 1.0] and cfg.MODEL.INPUT_COLOR_ORDER == "BGR"
    assert cfg.TEST.NMS == 0.5 and cfg.TEST.SCORE_THRESH == 0.05 and cfg.TEST.DETECTIONS_PER_IM == 100
    assert cfg.RESNETS.NORM == "AffineChannel" and cfg.TRAIN.FREEZE_AT == 2 and cfg.RESNETS.STRIDE_1X1
    assert cfg.MODEL.CONV_BODY == "FPN.add_fpn_ResNet50_conv5_body" and cfg.FPN.FPN_ON
    assert (cfg.FPN.RPN_MIN_LEVEL, cfg.FPN.RPN_MAX_LEVEL, cfg.FPN.ROI_MIN_LEVEL, cfg.FPN.ROI_MAX_LEVEL) == (2, 6, 2, 5)
    assert cfg.FPN.RPN_ANCHOR_START_SIZE == 32 and cfg.FPN.RPN_ASPECT_RATIOS == (0.5, 1.0, 2.0)
    assert cfg.FAST_RCNN.ROI_BOX_HEAD == "FastRCNNConvFCHead" and cfg.FAST_RCNN.NUM_FC == 2
    assert (cfg.FAST_RCNN.ROI_XFORM_METHOD, cfg.FAST_RCNN.ROI_XFORM_ALIGNED) == ("RoIAlign", True)
    assert cfg.FAST_RCNN.ROI_XFORM_RESOLUTION == 7 and cfg.FAST_RCNN.ROI_XFORM_SAMPLING_RATIO == 0
    assert cfg.MODEL.ROI_HEADS_NAME == "StandardROIHeads" and cfg.TRAIN.PROPOSAL_APPEND_GT
    assert cfg.OUTPUT_DIR == "./output" and cfg.TRAIN.WEIGHTS == "" and cfg.TEST.WEIGHTS == ""
    assert not cfg.MODEL.LOAD_IMAGENET_PRETRAINED_WEIGHTS
    assert_and_infer_cfg(cfg)


def test_c4_and_retinanet_translation(tmp_path):
    c4 = load_text(tmp_path, "MODEL: {MASK_ON: True, RESNETS: {DEPTH: 101}}")
    assert c4.MODEL.CONV_BODY == "ResNet.add_ResNet101_conv4_body" and not c4.FPN.FPN_ON
    assert c4.MODEL.ROI_HEADS_NAME == "Res5ROIHeads" and c4.RPN.SIZES == (32, 64, 128, 256, 512)
    assert c4.FAST_RCNN.ROI_BOX_HEAD == "ResNet.add_ResNet_roi_conv5_head"
    assert c4.MRCNN.ROI_MASK_HEAD == "MaskRCNNConvUpsampleHead" and c4.MRCNN.RESOLUTION == 14  # 14 / 2 (res5) x 2
    assert c4.MRCNN.CLS_SPECIFIC_MASK and c4.MRCNN.NUM_CONV == 0
    retina = load_detectron2_config(CONFIGS / "COCO-Detection" / "retinanet_R_50_FPN_1x.yaml")
    assert retina.MODEL.TYPE == "retinanet" and retina.RETINANET.RETINANET_ON and retina.MODEL.NUM_CLASSES == 81
    assert (retina.RETINANET.ANCHOR_SCALE, retina.RETINANET.SCALES_PER_OCTAVE) == (4, 3)
    assert (retina.FPN.RPN_MIN_LEVEL, retina.FPN.RPN_MAX_LEVEL, retina.FPN.EXTRA_CONV_LEVELS) == (3, 7, True)
    assert (retina.RETINANET.NEGATIVE_OVERLAP, retina.RETINANET.POSITIVE_OVERLAP) == (0.4, 0.5)
    assert retina.RETINANET.BBOX_REG_BETA == 0.0 and retina.RETINANET.LOSS_GAMMA == 2.0
    assert retina.RETINANET.PRE_NMS_TOP_N == 1000 and retina.RETINANET.INFERENCE_TH == 0.05
    assert retina.SOLVER.BASE_LR == 0.01 and retina.FPN.COARSEST_STRIDE == 32


def test_named_mappings(tmp_path):
    cfg = load_text(tmp_path, FPN_MODEL + """
  MASK_ON: True
  KEYPOINT_ON: True
  PIXEL_MEAN: [123.675, 116.28, 103.53]
  PIXEL_STD: [58.395, 57.12, 57.375]
  RESNETS: {OUT_FEATURES: [res2, res3, res4, res5], NORM: SyncBN, STRIDE_IN_1X1: False, DEPTH: 18,
            RES2_OUT_CHANNELS: 64}
  BACKBONE: {NAME: build_resnet_fpn_backbone, FREEZE_AT: 0}
  FPN: {IN_FEATURES: [res2, res3, res4, res5], NORM: GN}
  ROI_MASK_HEAD: {CLS_AGNOSTIC_MASK: True, POOLER_TYPE: ROIAlign, NUM_CONV: 4, NORM: GN}
  ROI_KEYPOINT_HEAD: {POOLER_TYPE: ROIPool}
  ROI_BOX_HEAD: {NAME: FastRCNNConvFCHead, NUM_CONV: 4, NUM_FC: 1, NORM: BN, BBOX_REG_LOSS_TYPE: giou}
INPUT: {FORMAT: RGB, MIN_SIZE_TRAIN: [512, 640], RANDOM_FLIP: none}
SOLVER: {BIAS_LR_FACTOR: 2.0, WEIGHT_DECAY_BIAS: 0.0, WEIGHT_DECAY_NORM: 0.5, LR_SCHEDULER_NAME: WarmupCosineLR}
SEED: 7
TEST: {KEYPOINT_OKS_SIGMAS: [0.1, 0.2], PRECISE_BN: {ENABLED: True}, EVAL_PERIOD: 500}
""")
    assert cfg.MODEL.INPUT_COLOR_ORDER == "RGB" and cfg.PIXEL_MEANS.ravel().tolist() == [123.675, 116.28, 103.53]
    assert cfg.PIXEL_STDS.ravel().tolist() == [58.395, 57.12, 57.375]
    assert cfg.RESNETS.NORM == "SyncBN" and not cfg.RESNETS.STRIDE_1X1 and cfg.TRAIN.FREEZE_AT == 0
    assert cfg.MODEL.CONV_BODY == "FPN.add_fpn_ResNet18_conv5_body" and cfg.FPN.NORM == "GN" and cfg.FPN.USE_GN
    assert not cfg.MRCNN.CLS_SPECIFIC_MASK and cfg.MRCNN.RESOLUTION == 28 and cfg.MRCNN.NORM == "GN"
    assert (cfg.MRCNN.ROI_XFORM_METHOD, cfg.MRCNN.ROI_XFORM_ALIGNED) == ("RoIAlign", False)
    assert cfg.KRCNN.ROI_XFORM_METHOD == "RoIPoolF" and cfg.KRCNN.HEATMAP_SIZE == 56
    assert (cfg.KRCNN.NUM_STACKED_CONVS, cfg.KRCNN.CONV_HEAD_DIM, cfg.KRCNN.NUM_KEYPOINTS) == (8, 512, 17)
    assert cfg.FAST_RCNN.NUM_STACKED_CONVS == 4 and cfg.FAST_RCNN.NUM_FC == 1 and cfg.FAST_RCNN.NORM == "BN"
    assert cfg.FAST_RCNN.BBOX_REG_LOSS_TYPE == "giou"
    assert cfg.TRAIN.SCALES == (512, 640) and not cfg.TRAIN.USE_FLIPPED
    assert cfg.SOLVER.BIAS_DOUBLE_LR and not cfg.SOLVER.BIAS_WEIGHT_DECAY and cfg.SOLVER.WEIGHT_DECAY_GN == 0.5
    assert cfg.SOLVER.LR_POLICY == "cosine_decay" and cfg.RNG_SEED == 7
    assert cfg.KRCNN.OKS_SIGMAS == (0.1, 0.2) and cfg.TEST.PRECISE_BN.ENABLED and cfg.TEST.EVAL_PERIOD == 500


def test_range_sampling_of_train_sizes(tmp_path):
    cfg = load_text(tmp_path, FPN_MODEL + "INPUT: {MIN_SIZE_TRAIN_SAMPLING: range, MIN_SIZE_TRAIN: [640, 800]}\n")
    assert cfg.TRAIN.SCALE_SAMPLING == "range" and cfg.TRAIN.SCALES == (640, 800)
    assert_and_infer_cfg(cfg)
    assert load_text(tmp_path, FPN_MODEL).TRAIN.SCALE_SAMPLING == "choice"


def test_model_zoo_weights_names_become_urls(tmp_path):
    cfg = load_text(tmp_path, FPN_MODEL, ["MODEL.WEIGHTS", "detectron2://ImageNetPretrained/MSRA/R-50.pkl"])
    url = "https://dl.fbaipublicfiles.com/detectron2/ImageNetPretrained/MSRA/R-50.pkl"
    assert cfg.TRAIN.WEIGHTS == url and cfg.TEST.WEIGHTS == url


# ----------------------------------------------------------------------------------- _BASE_ and opts
def test_base_chain_relative_to_each_file(tmp_path):
    write(tmp_path, "Base.yaml", FPN_MODEL + "SOLVER: {BASE_LR: 0.02, MAX_ITER: 100}\n")
    write(tmp_path, "zoo/mid.yaml", '_BASE_: "../Base.yaml"\nSOLVER: {MAX_ITER: 200}\n')
    leaf = write(tmp_path, "zoo/deep/leaf.yaml", '_BASE_: "../mid.yaml"\nMODEL: {MASK_ON: True}\n')
    cfg = load_detectron2_config(leaf)
    assert cfg.SOLVER.BASE_LR == 0.02 and cfg.SOLVER.MAX_ITER == 200 and cfg.MODEL.MASK_ON
    assert cfg.MODEL.ROI_HEADS_NAME == "StandardROIHeads"  # from the base of the base


def test_list_of_bases_merges_in_order(tmp_path):
    write(tmp_path, "a.yaml", FPN_MODEL + "SOLVER: {BASE_LR: 0.1, MAX_ITER: 10}\n")
    write(tmp_path, "b.yaml", "SOLVER: {BASE_LR: 0.2}\n")
    cfg = load_text(tmp_path, "_BASE_: [a.yaml, b.yaml]\n")
    assert cfg.SOLVER.BASE_LR == 0.2 and cfg.SOLVER.MAX_ITER == 10


def test_base_cycle_names_the_files(tmp_path):
    write(tmp_path, "a.yaml", "_BASE_: b.yaml\n")
    write(tmp_path, "b.yaml", "_BASE_: a.yaml\n")
    with pytest.raises(Detectron2ConfigError, match=r"cycle: .*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        load_detectron2_config(tmp_path / "a.yaml")


def test_missing_base_names_both_files(tmp_path):
    with pytest.raises(Detectron2ConfigError, match=r"nope\.yaml does not exist \(_BASE_ of .*model\.yaml\)"):
        load_text(tmp_path, "_BASE_: nope.yaml\n")


def test_trailing_opts_in_detectron2_names(tmp_path):
    cfg = load_text(tmp_path, FPN_MODEL, ["MODEL.WEIGHTS", "w.pkl", "OUTPUT_DIR", "out",
                                          "INPUT.MIN_SIZE_TRAIN", "(600, 700)", "SOLVER.BASE_LR", "0.5",
                                          "MODEL.ROI_HEADS.NUM_CLASSES", "3"])
    assert cfg.TRAIN.WEIGHTS == cfg.TEST.WEIGHTS == "w.pkl" and cfg.OUTPUT_DIR == "out"
    assert cfg.TRAIN.SCALES == (600, 700) and cfg.SOLVER.BASE_LR == 0.5 and cfg.MODEL.NUM_CLASSES == 4
    with pytest.raises(Detectron2ConfigError, match="KEY VALUE pairs"):
        load_text(tmp_path, FPN_MODEL, ["OUTPUT_DIR"])
    with pytest.raises(Detectron2ConfigError, match=r"TRAIN\.SCALES \(in command-line overrides\) is not a detectron2"):
        load_text(tmp_path, FPN_MODEL, ["TRAIN.SCALES", "(600,)"])


# ------------------------------------------------------------------------------------------ refusals
def test_unknown_key_names_key_and_file(tmp_path):
    with pytest.raises(Detectron2ConfigError, match=r"MODEL\.ROI_HEADS\.BATCH_SIZE \(in .*model\.yaml\) is not a "
                       r"detectron2 config key.*BATCH_SIZE_PER_IMAGE"):
        load_text(tmp_path, "MODEL:\n  ROI_HEADS: {BATCH_SIZE: 3}\n")


@pytest.mark.parametrize("yaml_text, key, why", [
    ("MODEL: {RESNETS: {DEFORM_ON_PER_STAGE: [False, True, True, True]}}", "MODEL.RESNETS.DEFORM_ON_PER_STAGE",
     "deformable"),
    ("INPUT: {CROP: {ENABLED: True}}", "INPUT.CROP.ENABLED", "random crops"),
    ("SOLVER: {LR_SCHEDULER_NAME: WarmupStepWithFixedGammaLR}", "SOLVER.LR_SCHEDULER_NAME", "lr schedule"),
    ("MODEL: {META_ARCHITECTURE: PanopticFPN}", "MODEL.META_ARCHITECTURE", "meta-architecture"),
    ("MODEL: {META_ARCHITECTURE: RetinaNet}", "MODEL.BACKBONE.NAME", "build_retinanet_resnet_fpn_backbone"),
    ("MODEL: {BACKBONE: {NAME: build_retinanet_resnet_fpn_backbone}}", "MODEL.BACKBONE.NAME", "ResNet-FPN"),
    ("MODEL: {ROI_HEADS: {NAME: CascadeROIHeads}}", "MODEL.ROI_HEADS.NAME", "ROI-heads class"),
    ("MODEL: {ROI_BOX_HEAD: {TRAIN_ON_PRED_BOXES: True}}", "MODEL.ROI_BOX_HEAD.TRAIN_ON_PRED_BOXES", "predicted"),
    ("MODEL: {ROI_BOX_HEAD: {USE_FED_LOSS: True}}", "MODEL.ROI_BOX_HEAD.USE_FED_LOSS", "federated"),
    ("INPUT: {MIN_SIZE_TRAIN_SAMPLING: range_by_clipping}", "INPUT.MIN_SIZE_TRAIN_SAMPLING", "range_by_clipping"),
    ("INPUT: {MIN_SIZE_TRAIN_SAMPLING: range, MIN_SIZE_TRAIN: [640, 672, 800]}", "INPUT.MIN_SIZE_TRAIN", "(lo, hi)"),
    ("MODEL: {ANCHOR_GENERATOR: {SIZES: [[32, 48], [64], [128], [256], [512]]}}", "MODEL.ANCHOR_GENERATOR.SIZES",
     "doubling"),
    ("MODEL: {ANCHOR_GENERATOR: {ASPECT_RATIOS: [[0.5], [1.0], [2.0], [1.0], [1.0]]}}",
     "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS", "one list"),
    ("SOLVER: {NESTEROV: True}", "SOLVER.NESTEROV", "Nesterov"),
    ("SOLVER: {REFERENCE_WORLD_SIZE: 8}", "SOLVER.REFERENCE_WORLD_SIZE", "rescaling"),
    ("SOLVER: {BIAS_LR_FACTOR: 3.0}", "SOLVER.BIAS_LR_FACTOR", "bias lr"),
    ("MODEL: {RESNETS: {NORM: LN}}", "MODEL.RESNETS.NORM", "FrozenBN"),
    ("TEST: {AUG: {ENABLED: True}}", "TEST.AUG.ENABLED", "GeneralizedRCNNWithTTA"),
    ("INPUT: {FORMAT: L}", "INPUT.FORMAT", "colour"),
    ("VERSION: 1", "VERSION", "version 2"),
])
def test_unsupported_values_fail_naming_key_file_and_reason(tmp_path, yaml_text, key, why):
    write(tmp_path, "base.yaml", FPN_MODEL)
    with pytest.raises(Detectron2ConfigError) as err:
        load_text(tmp_path, "_BASE_: base.yaml\n" + yaml_text)
    message = str(err.value)
    assert message.startswith(key + " = ") and "model.yaml" in message and why in message, message


def test_default_values_of_unimplemented_keys_are_accepted(tmp_path):
    cfg = load_text(tmp_path, FPN_MODEL + "INPUT: {CROP: {ENABLED: False, SIZE: [0.5, 0.5]}}\nVIS_PERIOD: 20\n"
                    "CUDNN_BENCHMARK: True\n")
    assert cfg.MODEL.CONVENTIONS == "detectron2"


def test_lazy_config_is_refused(tmp_path):
    path = write(tmp_path, "mask_rcnn_R_50_FPN_1x.py", "from ..common.models.mask_rcnn_fpn import model\n")
    with pytest.raises(Detectron2ConfigError, match=r"mask_rcnn_R_50_FPN_1x\.py is a detectron2 LazyConfig"):
        load_detectron2_config(path)


def test_eval_tag_evaluates_arithmetic_only(tmp_path):
    anchors = "[[s, s * 2 ** (1 / 3), s * 2 ** (2 / 3)] for s in [32, 64, 128, 256, 512]]"
    retina = """MODEL:
  META_ARCHITECTURE: RetinaNet
  BACKBONE: {NAME: build_retinanet_resnet_fpn_backbone}
  RESNETS: {OUT_FEATURES: [res3, res4, res5]}
  FPN: {IN_FEATURES: [res3, res4, res5]}
  ANCHOR_GENERATOR:
    SIZES: !!python/object/apply:eval ["%s"]
"""
    cfg = load_text(tmp_path, retina % anchors)
    assert cfg.RETINANET.ANCHOR_SCALE == 4 and cfg.RETINANET.SCALES_PER_OCTAVE == 3
    with pytest.raises(Detectron2ConfigError, match="uses Call"):
        load_text(tmp_path, retina % "__import__('os').getcwd()")


# --------------------------------------------------------------------------- SOLVER.IMS_PER_BATCH
def test_total_batch_is_divided_by_the_devices_of_the_run(tmp_path):
    cfg = load_text(tmp_path, FPN_MODEL + "SOLVER: {IMS_PER_BATCH: 16, BASE_LR: 0.02, STEPS: [60], MAX_ITER: 90}\n")
    lines = []
    adapt_cfg(cfg, TrainOptions(), num_devices=8, print_fn=lines.append)
    assert (cfg.NUM_GPUS, cfg.TRAIN.IMS_PER_BATCH) == (8, 2)
    assert cfg.SOLVER.BASE_LR == 0.02 and cfg.SOLVER.STEPS == [0, 60] and cfg.SOLVER.MAX_ITER == 90  # unscaled
    one = load_text(tmp_path, FPN_MODEL + "SOLVER: {IMS_PER_BATCH: 4}\n")
    split_total_batch(one, 1, lines.append)
    assert (one.NUM_GPUS, one.TRAIN.IMS_PER_BATCH) == (1, 4)
    with pytest.raises(ValueError, match=r"SOLVER\.IMS_PER_BATCH = 16 .* not divisible by the 3 devices"):
        split_total_batch(load_text(tmp_path, FPN_MODEL), 3, lines.append)


def test_detectron_configs_keep_their_batch_rule():
    from pydetectron.config import get_cfg

    cfg = get_cfg()
    cfg.NUM_GPUS, cfg.TRAIN.IMS_PER_BATCH = 8, 2
    split_total_batch(cfg, 2, print)
    assert (cfg.NUM_GPUS, cfg.TRAIN.IMS_PER_BATCH) == (8, 2)  # SOLVER.IMS_PER_BATCH 0: untouched


# ------------------------------------------------------------------------------------- shipped YAMLs
def test_shipped_detectron2_configs_exist():
    names = {p.relative_to(CONFIGS).as_posix() for p in SHIPPED}
    assert {"Base-RCNN-FPN.yaml", "Base-RCNN-C4.yaml", "Base-RetinaNet.yaml",
            "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml",
            "COCO-InstanceSegmentation/mask_rcnn_R_50_C4_1x.yaml",
            "COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml", "COCO-Detection/retinanet_R_50_FPN_1x.yaml",
            "COCO-Keypoints/keypoint_rcnn_R_50_FPN_1x.yaml", "shapes_mask_rcnn_R_50_FPN.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_shipped_config_loads_and_passes_checks(path):
    cfg = load_detectron2_config(path)
    assert_and_infer_cfg(cfg)
    assert cfg.MODEL.CONVENTIONS == "detectron2" and cfg.MODEL.CONV_BODY


SHRINK = ["MODEL.NUM_CLASSES", "4", "FPN.DIM", "32", "TRAIN.BATCH_SIZE_PER_IM", "16", "FAST_RCNN.MLP_HEAD_DIM", "32",
          "MRCNN.DIM_REDUCED", "16", "KRCNN.CONV_HEAD_DIM", "16", "TEST.RPN_PRE_NMS_TOP_N", "100",
          "TEST.RPN_POST_NMS_TOP_N", "20"]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_shipped_config_builds_and_infers(path):
    from pydetectron.modeling.detector import build_detector

    cfg = load_detectron2_config(path)
    merge_cfg_from_list(cfg, SHRINK + (["KRCNN.NUM_KEYPOINTS", "3"] if cfg.MODEL.KEYPOINTS_ON else []))
    assert_and_infer_cfg(cfg)
    torch.manual_seed(0)
    model = build_detector(cfg).eval()
    data = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        out = model(data, torch.tensor([[64.0, 96.0, 1.0]]), [{"height": 64, "width": 96}])
    assert len(out) == 1 and out[0]["boxes"].shape[1] == 4
    assert math.isfinite(float(out[0]["scores"].sum()))


@pytest.mark.parametrize("name", ["shapes_mask_rcnn_R_50_FPN.yaml", "COCO-Detection/retinanet_R_50_FPN_1x.yaml"])
def test_shipped_config_trains_with_detectron2_losses(name):
    from test_detector import synthetic_batch, train_step

    from pydetectron.modeling.detector import build_detector

    cfg = load_detectron2_config(CONFIGS / name, ["MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64"])
    merge_cfg_from_list(cfg, SHRINK)
    assert_and_infer_cfg(cfg)
    torch.manual_seed(0)
    losses = train_step(build_detector(cfg), synthetic_batch(num_classes=4))
    expected = {"loss_cls", "loss_box_reg"} | ({"loss_rpn_cls", "loss_rpn_loc", "loss_mask"} if cfg.MODEL.MASK_ON
                                               else set())
    assert set(losses) == expected and all(math.isfinite(v) for v in losses.values())
