"""detectron2's own model-zoo YAMLs load through load_detectron2_config, and the values pydetectron reads equal
what detectron2's ``get_cfg().merge_from_file`` gives. Skips without detectron2 or its configs folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pydetectron.config import assert_and_infer_cfg
from pydetectron.config.detectron2 import load_detectron2_config, weights_url
from pydetectron.config.detectron2_yaml import Detectron2ConfigError

d2_config = pytest.importorskip("detectron2.config")

D2_CONFIGS = Path(os.environ.get("DETECTRON2_CONFIGS", "/work/peers/detectron2/configs"))
FOLDERS = ("COCO-Detection", "COCO-InstanceSegmentation", "COCO-Keypoints")
# detectron2 configs pydetectron refuses, and the key named in the refusal
REFUSED = {
    "COCO-Detection/fast_rcnn_R_50_FPN_1x.yaml": "MODEL.LOAD_PROPOSALS",
}


def r50_configs() -> list[str]:
    """The R-50 YAMLs on Base-RCNN-FPN / Base-RCNN-C4 / Base-RetinaNet / Base-Keypoint-RCNN-FPN (not DC5)."""
    if not D2_CONFIGS.is_dir():
        return []
    found = []
    for folder in FOLDERS:
        found += [f"{folder}/{p.name}" for p in sorted((D2_CONFIGS / folder).glob("*R_50*.yaml"))
                  if "DC5" not in p.name]
    return found


def d2_cfg(relpath: str):
    cfg = d2_config.get_cfg()
    cfg.merge_from_file(str(D2_CONFIGS / relpath))
    return cfg


def test_the_r50_configs_are_found():
    if not D2_CONFIGS.is_dir():
        pytest.skip(f"no detectron2 configs at {D2_CONFIGS}")
    names = set(r50_configs())
    assert {"COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml",
            "COCO-InstanceSegmentation/mask_rcnn_R_50_C4_1x.yaml",
            "COCO-Detection/retinanet_R_50_FPN_1x.yaml", "COCO-Keypoints/keypoint_rcnn_R_50_FPN_1x.yaml"} <= names


@pytest.mark.parametrize("relpath", sorted(REFUSED))
def test_refused_configs_name_the_key(relpath):
    if not (D2_CONFIGS / relpath).is_file():
        pytest.skip(f"{relpath} is not here")
    with pytest.raises(Detectron2ConfigError, match=REFUSED[relpath].replace(".", r"\.")):
        load_detectron2_config(D2_CONFIGS / relpath)


def _anchor_sizes(cfg) -> list[list[float]]:
    """The anchor sizes per level pydetectron's cfg describes, in detectron2's layout."""
    if cfg.RETINANET.RETINANET_ON:
        r = cfg.RETINANET
        return [[r.ANCHOR_SCALE * 2 ** level * 2 ** (i / r.SCALES_PER_OCTAVE) for i in range(r.SCALES_PER_OCTAVE)]
                for level in range(cfg.FPN.RPN_MIN_LEVEL, cfg.FPN.RPN_MAX_LEVEL + 1)]
    if cfg.FPN.FPN_ON:
        levels = cfg.FPN.RPN_MAX_LEVEL - cfg.FPN.RPN_MIN_LEVEL + 1
        return [[cfg.FPN.RPN_ANCHOR_START_SIZE * 2 ** i] for i in range(levels)]
    return [list(cfg.RPN.SIZES)]


@pytest.mark.parametrize("relpath", [c for c in r50_configs() if c not in REFUSED])
def test_values_equal_detectron2s(relpath):
    ours = load_detectron2_config(D2_CONFIGS / relpath)
    assert_and_infer_cfg(ours)
    d2 = d2_cfg(relpath)
    m = d2.MODEL
    assert ours.MODEL.CONVENTIONS == "detectron2"
    assert ours.TRAIN.WEIGHTS == weights_url(m.WEIGHTS)
    assert ours.PIXEL_MEANS.ravel().tolist() == pytest.approx(list(m.PIXEL_MEAN))
    assert ours.PIXEL_STDS.ravel().tolist() == pytest.approx(list(m.PIXEL_STD))
    assert ours.MODEL.INPUT_COLOR_ORDER == d2.INPUT.FORMAT
    assert ours.TRAIN.SCALES == tuple(d2.INPUT.MIN_SIZE_TRAIN) and ours.TRAIN.MAX_SIZE == d2.INPUT.MAX_SIZE_TRAIN
    assert (ours.TEST.SCALE, ours.TEST.MAX_SIZE) == (d2.INPUT.MIN_SIZE_TEST, d2.INPUT.MAX_SIZE_TEST)
    assert ours.TRAIN.DATASETS == tuple(d2.DATASETS.TRAIN) and ours.TEST.DATASETS == tuple(d2.DATASETS.TEST)
    s = d2.SOLVER
    assert ours.SOLVER.BASE_LR == s.BASE_LR and ours.SOLVER.MAX_ITER == s.MAX_ITER and ours.SOLVER.GAMMA == s.GAMMA
    assert ours.SOLVER.STEPS == [0, *s.STEPS] and ours.SOLVER.IMS_PER_BATCH == s.IMS_PER_BATCH
    assert ours.SOLVER.WEIGHT_DECAY == s.WEIGHT_DECAY and ours.SOLVER.MOMENTUM == s.MOMENTUM
    assert (ours.SOLVER.WARM_UP_ITERS, ours.SOLVER.WARM_UP_FACTOR) == (s.WARMUP_ITERS, s.WARMUP_FACTOR)
    assert ours.TRAIN.SNAPSHOT_ITERS == s.CHECKPOINT_PERIOD
    assert ours.TRAIN.FREEZE_AT == m.BACKBONE.FREEZE_AT
    assert ours.RESNETS.STRIDE_1X1 == m.RESNETS.STRIDE_IN_1X1 and ours.RESNETS.NORM == "AffineChannel"
    assert f"ResNet{m.RESNETS.DEPTH}_conv" in ours.MODEL.CONV_BODY
    assert ours.MODEL.ANCHOR_OFFSET == m.ANCHOR_GENERATOR.OFFSET
    sizes = [[float(x) for x in level] for level in m.ANCHOR_GENERATOR.SIZES]
    assert _anchor_sizes(ours) == [pytest.approx(level) for level in sizes]
    if m.META_ARCHITECTURE == "RetinaNet":
        r = m.RETINANET
        assert ours.MODEL.NUM_CLASSES == r.NUM_CLASSES + 1
        assert (ours.RETINANET.NEGATIVE_OVERLAP, ours.RETINANET.POSITIVE_OVERLAP) == tuple(r.IOU_THRESHOLDS)
        assert ours.RETINANET.BBOX_REG_BETA == r.SMOOTH_L1_LOSS_BETA
        assert ours.RETINANET.BBOX_REG_WEIGHTS == tuple(r.BBOX_REG_WEIGHTS)
        assert (ours.RETINANET.LOSS_ALPHA, ours.RETINANET.LOSS_GAMMA) == (r.FOCAL_LOSS_ALPHA, r.FOCAL_LOSS_GAMMA)
        assert ours.RETINANET.PRE_NMS_TOP_N == r.TOPK_CANDIDATES_TEST and ours.TEST.NMS == r.NMS_THRESH_TEST
        return
    rpn = m.RPN
    assert ours.TRAIN.RPN_PRE_NMS_TOP_N == rpn.PRE_NMS_TOPK_TRAIN
    assert ours.TEST.RPN_PRE_NMS_TOP_N == rpn.PRE_NMS_TOPK_TEST
    assert (ours.TRAIN.RPN_POST_NMS_TOP_N, ours.TEST.RPN_POST_NMS_TOP_N) == (rpn.POST_NMS_TOPK_TRAIN,
                                                                            rpn.POST_NMS_TOPK_TEST)
    assert ours.TRAIN.RPN_BATCH_SIZE_PER_IM == rpn.BATCH_SIZE_PER_IMAGE
    assert ours.RPN.SMOOTH_L1_BETA == rpn.SMOOTH_L1_BETA and ours.RPN.BBOX_REG_LOSS_TYPE == rpn.BBOX_REG_LOSS_TYPE
    assert ours.RPN.BBOX_REG_LOSS_WEIGHT == rpn.BBOX_REG_LOSS_WEIGHT
    if m.META_ARCHITECTURE == "ProposalNetwork":
        assert ours.MODEL.RPN_ONLY
        return
    h = m.ROI_HEADS
    assert ours.MODEL.ROI_HEADS_NAME == h.NAME and ours.MODEL.NUM_CLASSES == h.NUM_CLASSES + 1
    assert ours.TRAIN.BATCH_SIZE_PER_IM == h.BATCH_SIZE_PER_IMAGE and ours.TRAIN.FG_FRACTION == h.POSITIVE_FRACTION
    assert ours.TEST.NMS == h.NMS_THRESH_TEST and ours.TEST.SCORE_THRESH == h.SCORE_THRESH_TEST
    b = m.ROI_BOX_HEAD
    assert ours.FAST_RCNN.ROI_XFORM_RESOLUTION == b.POOLER_RESOLUTION and ours.FAST_RCNN.ROI_XFORM_ALIGNED
    assert ours.FAST_RCNN.SMOOTH_L1_BETA == b.SMOOTH_L1_BETA
    assert ours.FAST_RCNN.BBOX_REG_LOSS_TYPE == b.BBOX_REG_LOSS_TYPE
    assert ours.FAST_RCNN.BBOX_REG_LOSS_WEIGHT == b.BBOX_REG_LOSS_WEIGHT
    assert ours.MODEL.BBOX_REG_WEIGHTS == tuple(b.BBOX_REG_WEIGHTS)
    assert ours.MODEL.MASK_ON == m.MASK_ON and ours.MODEL.KEYPOINTS_ON == m.KEYPOINT_ON
    if m.MASK_ON:
        assert ours.MRCNN.NUM_CONV == m.ROI_MASK_HEAD.NUM_CONV and ours.MRCNN.ROI_XFORM_ALIGNED
    if m.KEYPOINT_ON:
        k = m.ROI_KEYPOINT_HEAD
        assert ours.KRCNN.NUM_KEYPOINTS == k.NUM_KEYPOINTS
        assert ours.KRCNN.NUM_STACKED_CONVS == len(k.CONV_DIMS) and ours.KRCNN.CONV_HEAD_DIM == k.CONV_DIMS[0]
        assert ours.KRCNN.NORMALIZE_BY_VISIBLE_KEYPOINTS == k.NORMALIZE_LOSS_BY_VISIBLE_KEYPOINTS
        assert ours.KRCNN.HEATMAP_SIZE == 4 * k.POOLER_RESOLUTION


OUR_CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "detectron2"


@pytest.mark.parametrize("relpath", sorted(p.relative_to(OUR_CONFIGS).as_posix()
                                           for p in OUR_CONFIGS.glob("COCO-*/*.yaml")))
def test_our_model_zoo_configs_equal_detectron2s(relpath):
    """configs/detectron2/ are written here, but a user must get exactly detectron2's model-zoo config."""
    if not (D2_CONFIGS / relpath).is_file():
        pytest.skip(f"detectron2's {relpath} is not here")
    ours = load_detectron2_config(OUR_CONFIGS / relpath)
    theirs = load_detectron2_config(D2_CONFIGS / relpath)
    from pydetectron.config import cfg_to_yaml

    assert cfg_to_yaml(ours) == cfg_to_yaml(theirs)
