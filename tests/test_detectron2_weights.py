"""detectron2 detector checkpoints: names both ways, class layouts, strict loading, export (issue 15 item 3).

The name tables below are written by hand from detectron2's ``c2_model_loading.convert_c2_detectron_names``
(the Caffe2 name each detectron2 key is renamed from) and its module names; the class-layout values from
the rule detectron2 applies when it loads a Detectron model (background row moved from first to last, the
background box rows and mask channel dropped).
"""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from pydetectron.config import assert_and_infer_cfg, get_cfg, merge_cfg_from_file, merge_cfg_from_list
from pydetectron.config.merge import cfg_to_yaml
from pydetectron.modeling.detector import build_detector
from pydetectron.weights import WeightMismatchError, load_pretrained, model_weight_mapping, read_weights
from pydetectron.weights.class_layout import convert_class_layout, model_class_layouts
from pydetectron.weights.convert import convert, detectron2_state
from pydetectron.weights.detectron2 import (
    FIXED_UPSAMPLE_BLOBS,
    DetectorNames,
    blob_to_detector_key,
    detector_key_to_blob,
    detector_names_of_blobs,
    detectron2_detector_to_blobs,
)
from pydetectron.weights.detectron_pkl import detectron_blobs, save_detectron_weights

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")
R50_FPN = DetectorNames(body_prefix="backbone.bottom_up.", last_blocks={2: 2, 3: 3, 4: 5, 5: 2}, rpn_level=2)
R50_C4 = DetectorNames(body_prefix="backbone.", last_blocks={2: 2, 3: 3, 4: 5, 5: 2}, rpn_level=None,
                       res5_in_head=True)
RETINA_GN = DetectorNames(last_blocks={3: 3, 4: 5, 5: 2}, retina_level=3, retina_norm=True)
MASK_GN = DetectorNames(last_blocks={2: 2, 3: 3, 4: 5, 5: 2}, mask_norm=True)

# (detectron2 key, Caffe2 blob, the names' context); norm keys of modules with statistics are batch norms
NAME_TABLE = [
    ("backbone.bottom_up.stem.conv1.weight", "conv1_w", R50_FPN),
    ("backbone.bottom_up.stem.conv1.norm.running_var", "res_conv1_bn_riv", R50_FPN),
    ("backbone.bottom_up.res4.5.conv3.norm.bias", "res4_5_branch2c_bn_b", R50_FPN),
    ("backbone.bottom_up.res2.0.shortcut.weight", "res2_0_branch1_w", R50_FPN),
    ("backbone.fpn_lateral2.weight", "fpn_inner_res2_2_sum_lateral_w", R50_FPN),
    ("backbone.fpn_lateral4.bias", "fpn_inner_res4_5_sum_lateral_b", R50_FPN),
    ("backbone.fpn_lateral5.weight", "fpn_inner_res5_2_sum_w", R50_FPN),
    ("backbone.fpn_output3.bias", "fpn_res3_3_sum_b", R50_FPN),
    ("backbone.fpn_output5.weight", "fpn_res5_2_sum_w", R50_FPN),
    ("backbone.fpn_lateral3.norm.weight", "fpn_inner_res3_3_sum_lateral_gn_s", R50_FPN),
    ("backbone.fpn_output4.norm.bias", "fpn_res4_5_sum_gn_b", R50_FPN),
    ("backbone.top_block.p6.weight", "fpn_6_w", RETINA_GN),
    ("backbone.top_block.p7.bias", "fpn_7_b", RETINA_GN),
    ("proposal_generator.rpn_head.conv.weight", "conv_rpn_fpn2_w", R50_FPN),
    ("proposal_generator.rpn_head.objectness_logits.bias", "rpn_cls_logits_fpn2_b", R50_FPN),
    ("proposal_generator.rpn_head.anchor_deltas.weight", "rpn_bbox_pred_fpn2_w", R50_FPN),
    ("proposal_generator.rpn_head.conv.bias", "conv_rpn_b", R50_C4),
    ("proposal_generator.rpn_head.objectness_logits.weight", "rpn_cls_logits_w", R50_C4),
    ("proposal_generator.rpn_head.anchor_deltas.bias", "rpn_bbox_pred_b", R50_C4),
    ("backbone.res4.5.conv2.weight", "res4_5_branch2b_w", R50_C4),
    ("roi_heads.res5.2.conv3.norm.running_mean", "res5_2_branch2c_bn_rm", R50_C4),
    ("roi_heads.res5.norm.weight", "res5_extra_bn_s", R50_C4),
    ("roi_heads.box_head.fc1.weight", "fc6_w", R50_FPN),
    ("roi_heads.box_head.fc2.bias", "fc7_b", R50_FPN),
    ("roi_heads.box_head.fc3.weight", "fc8_w", R50_FPN),
    ("roi_heads.box_head.conv1.weight", "head_conv1_w", R50_FPN),
    ("roi_heads.box_head.conv4.norm.weight", "head_conv4_gn_s", R50_FPN),
    ("roi_heads.box_head.conv2.norm.running_var", "head_conv2_bn_riv", R50_FPN),
    ("roi_heads.box_predictor.cls_score.weight", "cls_score_w", R50_FPN),
    ("roi_heads.box_predictor.bbox_pred.bias", "bbox_pred_b", R50_FPN),
    ("roi_heads.mask_head.mask_fcn1.weight", "_[mask]_fcn1_w", R50_FPN),
    ("roi_heads.mask_head.mask_fcn4.bias", "_[mask]_fcn4_b", R50_FPN),
    ("roi_heads.mask_head.mask_fcn2.norm.bias", "_mask_fcn2_gn_b", MASK_GN),
    ("roi_heads.mask_head.mask_fcn3.weight", "_mask_fcn3_w", MASK_GN),
    ("roi_heads.mask_head.deconv.weight", "conv5_mask_w", R50_C4),
    ("roi_heads.mask_head.predictor.bias", "mask_fcn_logits_b", R50_FPN),
    ("roi_heads.keypoint_head.conv_fcn1.weight", "conv_fcn1_w", R50_FPN),
    ("roi_heads.keypoint_head.conv_fcn8.bias", "conv_fcn8_b", R50_FPN),
    ("roi_heads.keypoint_head.score_lowres.weight", "kps_score_lowres_w", R50_FPN),
    ("head.cls_subnet.0.weight", "retnet_cls_conv_n0_fpn3_w", RETINA_GN),
    ("head.cls_subnet.1.weight", "retnet_cls_conv_n0_fpn3_gn_s", RETINA_GN),
    ("head.bbox_subnet.9.bias", "retnet_bbox_conv_n3_fpn3_b", RETINA_GN),
    ("head.bbox_subnet.10.bias", "retnet_bbox_conv_n3_fpn3_gn_b", RETINA_GN),
    ("head.cls_subnet.4.weight", "retnet_cls_conv_n2_fpn3_w", DetectorNames(retina_level=3)),
    ("head.cls_score.bias", "retnet_cls_pred_fpn3_b", RETINA_GN),
    ("head.bbox_pred.weight", "retnet_bbox_pred_fpn3_w", RETINA_GN),
]
# norm modules with running statistics in those files (detectron2 BN / FrozenBN), for d2 -> Caffe2 naming
STATS = {"roi_heads.box_head.conv2.norm", "roi_heads.res5.norm"}


@pytest.mark.parametrize("key,blob,names", NAME_TABLE, ids=[row[0] for row in NAME_TABLE])
def test_detector_names_both_ways(key, blob, names):
    prefix = names.body_prefix
    body_key = key.startswith(prefix) or key.startswith("roi_heads.res5.") and key != "roi_heads.res5.norm.weight"
    if not body_key:
        assert detector_key_to_blob(key, names, STATS) == blob
    else:  # body keys go through the ResNet table of the whole-file reader
        blobs, file_names, left_out, _ = detectron2_detector_to_blobs({key: np.zeros(1), **_stats_of(key)}, prefix)
        assert left_out == [] and file_names[blob] == key
    assert blob_to_detector_key(blob, names) == key


def _stats_of(key: str) -> dict:
    module = key.rsplit(".", 1)[0]
    return {f"{module}.running_mean": np.zeros(1)} if ".norm." in key else {}


def test_keys_without_a_caffe2_name_are_left_out_and_d2_buffers_dropped():
    state = {"backbone.bottom_up.res2.0.conv1.weight": np.zeros(1), "backbone.fpn_lateral2.weight": np.zeros(1),
             "pixel_mean": np.zeros(3), "pixel_std": np.ones(3),
             "backbone.bottom_up.res2.0.conv1.norm.num_batches_tracked": np.zeros(()),
             "proposal_generator.anchor_generator.cell_anchors.0": np.zeros((3, 4)),
             "roi_heads.box_head.flatten.weight": np.zeros(1), "head.cls_subnet.3.weight": np.zeros(1)}
    blobs, _, left_out, _ = detectron2_detector_to_blobs(state, "backbone.bottom_up.")
    assert set(blobs) == {"res2_0_branch2a_w", "fpn_inner_res2_0_sum_lateral_w"}
    assert left_out == ["roi_heads.box_head.flatten.weight", "head.cls_subnet.3.weight"]


# ---- class layouts on hand tensors ------------------------------------------------------------------------------

def _rows(n: int, width: int = 2) -> np.ndarray:
    return np.arange(n * width, dtype=np.float32).reshape(n, width) + 1


def test_detectron_to_detectron2_layout_is_detectron2s_rule():
    cls_w, cls_b = _rows(4), np.array([10, 11, 12, 13], np.float32)  # background, then 3 classes
    box_w, box_b, mask_w = _rows(16), np.arange(16, dtype=np.float32), _rows(4, 3)
    blobs = {"cls_score_w": cls_w, "cls_score_b": cls_b, "bbox_pred_w": box_w, "bbox_pred_b": box_b,
             "mask_fcn_logits_w": mask_w, "fc6_w": _rows(3)}
    targets = dict.fromkeys(["cls_score_w", "cls_score_b", "bbox_pred_w", "bbox_pred_b", "mask_fcn_logits_w"],
                            "detectron2")
    out, lines = convert_class_layout(blobs, "detectron", targets)
    np.testing.assert_array_equal(out["cls_score_w"], cls_w[[1, 2, 3, 0]])
    np.testing.assert_array_equal(out["cls_score_b"], [11, 12, 13, 10])
    np.testing.assert_array_equal(out["bbox_pred_w"], box_w[4:])
    np.testing.assert_array_equal(out["bbox_pred_b"], np.arange(4, 16))
    np.testing.assert_array_equal(out["mask_fcn_logits_w"], mask_w[1:])
    assert out["fc6_w"] is blobs["fc6_w"] and len(lines) == 5
    back, _ = convert_class_layout(out, "detectron2", dict.fromkeys(targets, "detectron"))
    np.testing.assert_array_equal(back["cls_score_w"], cls_w)
    np.testing.assert_array_equal(back["bbox_pred_w"][:4], 0)  # the background box rows are zero
    np.testing.assert_array_equal(back["bbox_pred_w"][4:], box_w[4:])
    np.testing.assert_array_equal(back["mask_fcn_logits_w"][0], 0)
    np.testing.assert_array_equal(back["mask_fcn_logits_w"][1:], mask_w[1:])


def test_class_agnostic_predictors_keep_their_foreground():
    agnostic_box, one_mask = _rows(8), _rows(1, 3)  # Detectron: background + foreground box; one mask channel
    out, _ = convert_class_layout({"bbox_pred_w": agnostic_box, "mask_fcn_logits_w": one_mask}, "detectron",
                                  {"bbox_pred_w": "detectron2", "mask_fcn_logits_w": "detectron2"})
    np.testing.assert_array_equal(out["bbox_pred_w"], agnostic_box[4:])
    np.testing.assert_array_equal(out["mask_fcn_logits_w"], one_mask)
    back, _ = convert_class_layout(out, "detectron2", {"mask_fcn_logits_w": "detectron"}, {"mask_fcn_logits_w": 2})
    np.testing.assert_array_equal(back["mask_fcn_logits_w"], np.concatenate([np.zeros((1, 3)), one_mask]))
    same, _ = convert_class_layout(out, "detectron2", {"mask_fcn_logits_w": "detectron"})
    np.testing.assert_array_equal(same["mask_fcn_logits_w"], one_mask)


# ---- whole detectors ---------------------------------------------------------------------------------------------

SMALL = ["MODEL.NUM_CLASSES", "4", "FPN.DIM", "32", "FAST_RCNN.MLP_HEAD_DIM", "32", "FAST_RCNN.CONV_HEAD_DIM", "32",
         "MRCNN.DIM_REDUCED", "32", "KRCNN.CONV_HEAD_DIM", "32", "KRCNN.NUM_STACKED_CONVS", "2",
         "KRCNN.NUM_KEYPOINTS", "3"]


def _model(relpath: str, extra=(), seed: int = 0):
    cfg = get_cfg()
    merge_cfg_from_file(cfg, os.path.join(CONFIGS, relpath))
    merge_cfg_from_list(cfg, SMALL + list(extra))
    assert_and_infer_cfg(cfg)
    torch.manual_seed(seed)
    model = build_detector(cfg).eval()
    mapping = model_weight_mapping(model)  # fixed kernels and training state (None: no weight) keep their init
    fixed = {k for k, b in mapping.items() if b is None or FIXED_UPSAMPLE_BLOBS.match(b)}
    with torch.no_grad():  # every learned tensor random, so a misplaced one cannot pass unnoticed
        for key, value in model.state_dict().items():
            if value.dtype.is_floating_point and key not in fixed:
                value.copy_(torch.rand_like(value) + 0.5 if value.dim() == 1 else torch.randn_like(value))
    return cfg, model


def _zero_background_rows(model):
    """What a Detectron-layout model keeps through detectron2's layout: its background box rows and mask
    channel become zero (class_layout.py)."""
    mapping = model_weight_mapping(model)
    layouts = model_class_layouts(model, mapping)
    with torch.no_grad():
        for key, blob in mapping.items():
            tensor = model.state_dict()[key]
            if layouts.get(blob) != "detectron":
                continue
            if blob in ("bbox_pred_w", "bbox_pred_b"):
                tensor[:4] = 0
            elif blob in ("mask_fcn_logits_w", "mask_fcn_logits_b") and tensor.shape[0] > 1:
                tensor[:1] = 0


def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0, msg=key)


MASK_GN_CFG = "getting_started/e2e_mask_rcnn_R-18-FPN_shapes.yaml"
KEYPOINT_CFG = "getting_started/e2e_keypoint_rcnn_R-18-FPN_shapes.yaml"
RETINA_CFG = "getting_started/retinanet_R-18-FPN_shapes.yaml"


D2_MODE = ["MODEL.CONVENTIONS", "detectron2", "FAST_RCNN.ROI_BOX_HEAD", "FastRCNNConvFCHead"]
D2_MASK = D2_MODE + ["FAST_RCNN.NUM_STACKED_CONVS", "2", "FAST_RCNN.NUM_FC", "1", "FAST_RCNN.NORM", "GN",
                     "MRCNN.ROI_MASK_HEAD", "MaskRCNNConvUpsampleHead", "MRCNN.NORM", "GN"]
D2_KEYPOINT = D2_MODE + ["KRCNN.ROI_KEYPOINTS_HEAD", "KRCNNConvDeconvUpsampleHead"]
MODELS = [(MASK_GN_CFG, ()), (KEYPOINT_CFG, ()), (RETINA_CFG, ()), (MASK_GN_CFG, D2_MASK),
          (KEYPOINT_CFG, D2_KEYPOINT), (RETINA_CFG, ["MODEL.CONVENTIONS", "detectron2"])]
MODEL_IDS = ["mask", "keypoint", "retinanet", "d2-mask-gn", "d2-keypoint", "d2-retinanet"]


@pytest.mark.parametrize("relpath,extra", MODELS, ids=MODEL_IDS)
@pytest.mark.parametrize("suffix", [".pkl", ".pth"])
def test_detector_to_detectron2_file_and_back_is_bit_exact(tmp_path, relpath, extra, suffix):
    cfg, model = _model(relpath, extra)
    state, _ = detectron2_state(model)
    path = tmp_path / f"model_final{suffix}"
    if suffix == ".pth":  # detectron2's own checkpoint: {'model': tensors, 'iteration', 'optimizer', 'scheduler'}
        torch.save({"model": {k: torch.from_numpy(v) for k, v in state.items()}, "iteration": 9, "optimizer": {},
                    "scheduler": {}}, path)
    else:  # a detectron2 model-zoo .pkl
        with open(path, "wb") as f:
            pickle.dump({"model": state, "__author__": "Detectron2 Model Zoo"}, f)
    _, fresh = _model(relpath, extra, seed=1)
    lines = []
    report = load_pretrained(fresh, path, cfg, training=False, print_fn=lines.append)
    assert report.missing == report.unused == report.unmapped == []
    _zero_background_rows(model)  # detectron2 files have none; Detectron-mode heads get zeros
    _assert_same_state(model, fresh)
    if "cls_score_w" in model_weight_mapping(model).values() and not extra:  # Detectron heads: background moved
        cls = model.box_outputs.cls_score.weight
        torch.testing.assert_close(torch.from_numpy(state["roi_heads.box_predictor.cls_score.weight"]),
                                   torch.cat([cls[1:], cls[:1]]), rtol=0, atol=0)
        assert state["roi_heads.box_predictor.bbox_pred.weight"].shape[0] == 4 * 3
        assert "class layout: cls_score_w: detectron2 -> detectron" in "\n".join(lines)


def test_strict_loading_names_the_file_and_every_leftover_key(tmp_path):
    cfg, model = _model(MASK_GN_CFG)
    state, _ = detectron2_state(model)
    state["roi_heads.box_head.unknown.weight"] = np.zeros(2, np.float32)
    del state["roi_heads.mask_head.deconv.bias"]
    path = tmp_path / "model_final.pth"
    torch.save({"model": {k: torch.from_numpy(v) for k, v in state.items()}}, path)
    with pytest.raises(WeightMismatchError) as err:
        load_pretrained(model, path, cfg, training=False, print_fn=lambda _: None)
    text = str(err.value)
    assert str(path) in text and "roi_heads.box_head.unknown.weight" in text
    assert "roi_heads.mask_head.deconv.bias" in text  # the missing one, in the file's own names
    report = load_pretrained(model, path, cfg, training=True, print_fn=lambda _: None)  # fine-tuning: said
    assert report.missing == ["conv5_mask_b"]


def test_frozen_bn_folds_into_affine_channel_exactly(tmp_path):
    cfg, model = _model(KEYPOINT_CFG, ["RESNETS.USE_GN", "False", "FPN.USE_GN", "False",
                                        "FAST_RCNN.ROI_BOX_HEAD", "fast_rcnn_heads.roi_2mlp_head"])
    state, _ = detectron2_state(model)
    rng = np.random.default_rng(0)
    key = "backbone.bottom_up.res3.1.conv2.norm"
    gamma, beta = state[f"{key}.weight"], state[f"{key}.bias"]
    mean, var = rng.normal(size=gamma.shape).astype(np.float32), rng.uniform(0.5, 2, gamma.shape).astype(np.float32)
    state[f"{key}.running_mean"], state[f"{key}.running_var"] = mean, var
    path = tmp_path / "model_final.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": state, "__author__": "Detectron2 Model Zoo"}, f)
    load_pretrained(model, path, cfg, training=False, print_fn=lambda _: None)
    scale = gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + 1e-5)
    norm = model.body.body.res3[1].branch2b.norm
    np.testing.assert_array_equal(norm.weight.detach().numpy(), scale.astype(np.float32))
    np.testing.assert_array_equal(norm.bias.detach().numpy(), (beta - mean * scale).astype(np.float32))


def test_convert_tool_writes_detectron2_names_and_reads_back(tmp_path):
    cfg, model = _model(MASK_GN_CFG)
    ours = tmp_path / "model_final_ours.pth"
    torch.save({"model": model.state_dict(), "cfg": cfg_to_yaml(cfg)}, ours)
    out = tmp_path / "d2.pkl"
    summary = convert(ours, out, "detectron2")
    assert str(out) in summary
    with open(out, "rb") as f:
        written = pickle.load(f)
    assert written["__author__"] == "pydetectron" and written["matching_heuristics"] is False
    assert "roi_heads.mask_head.predictor.weight" in written["model"]
    assert written["model"]["roi_heads.mask_head.predictor.weight"].shape[0] == 3  # no background channel
    assert read_weights(out).class_layout == "detectron2"
    _, fresh = _model(MASK_GN_CFG, seed=3)
    load_pretrained(fresh, out, cfg, training=False, print_fn=lambda _: None)
    _zero_background_rows(model)
    _assert_same_state(model, fresh)


def test_detectron_pkl_of_any_layout_is_written_background_first(tmp_path):
    cfg, model = _model(MASK_GN_CFG)
    model.box_outputs.class_layout = "detectron2"  # as a d2-mode predictor says of itself
    assert model_class_layouts(model, model_weight_mapping(model))["cls_score_w"] == "detectron2"
    path = tmp_path / "model.pkl"
    blobs = save_detectron_weights(model, path)
    mine = detectron_blobs(model)
    np.testing.assert_array_equal(blobs["cls_score_w"], np.concatenate([mine["cls_score_w"][-1:],
                                                                        mine["cls_score_w"][:-1]]))
    assert blobs["bbox_pred_w"].shape[0] == mine["bbox_pred_w"].shape[0] + 4


def test_detectron_pkl_into_detectron2_heads_is_detectron2s_conversion(tmp_path):
    """A Detectron-convention model written as a Detectron .pkl, read into detectron2-convention heads: the
    background row moved last and the background box rows / mask channel dropped (detectron2's own rule)."""
    cfg, detectron_model = _model(MASK_GN_CFG)
    path = tmp_path / "model_final.pkl"
    blobs = save_detectron_weights(detectron_model, path, cfg_yaml=cfg_to_yaml(cfg))
    d2_cfg, d2_model = _model(MASK_GN_CFG, D2_MASK, seed=4)
    load_pretrained(d2_model, path, d2_cfg, training=True, print_fn=lambda _: None)  # other head layouts: skipped
    want = {"cls_score_w": np.concatenate([blobs["cls_score_w"][1:], blobs["cls_score_w"][:1]]),
            "bbox_pred_b": blobs["bbox_pred_b"][4:], "mask_fcn_logits_w": blobs["mask_fcn_logits_w"][1:]}
    for blob, value in want.items():
        np.testing.assert_array_equal(detectron_blobs(d2_model)[blob], value, err_msg=blob)


def test_written_names_put_the_body_where_detectron2_does():
    """Below an FPN the ResNet is backbone.bottom_up; a C4 detector's res5 is roi_heads.res5; a DC5 / C5 one
    (no FPN, res5 in the body) keeps res5 under backbone."""
    blobs = ["res5_0_branch2a_w", "conv_rpn_w"]
    assert blob_to_detector_key(blobs[0], detector_names_of_blobs(blobs, res5_in_head=True)) == \
        "roi_heads.res5.0.conv1.weight"
    assert blob_to_detector_key(blobs[0], detector_names_of_blobs(blobs, res5_in_head=False)) == \
        "backbone.res5.0.conv1.weight"
    fpn = blobs + ["fpn_res5_2_sum_w"]
    assert blob_to_detector_key(blobs[0], detector_names_of_blobs(fpn, res5_in_head=False)) == \
        "backbone.bottom_up.res5.0.conv1.weight"


def test_class_count_of_a_detectron2_detector_file(tmp_path):
    """The inference tools read MODEL.NUM_CLASSES from the weights when the cfg leaves it unset."""
    from pydetectron.engine.inference_model import weights_num_classes

    _, model = _model(MASK_GN_CFG)
    state, _ = detectron2_state(model)
    path = tmp_path / "model_final.pth"
    torch.save({"model": {k: torch.from_numpy(v) for k, v in state.items()}}, path)
    assert weights_num_classes(str(path), None, str(tmp_path)) == 4  # NUM_CLASSES 4 in SMALL, background included
