"""GeneralizedRCNN wiring: losses, cascaded inference in original coordinates, batches of differently sized
images, SHARE_RES5, RPN-only / precomputed-proposal models and Detectron model-zoo weights."""

import dataclasses
import os

import numpy as np
import pytest
import torch

from pydetectron.config import assert_and_infer_cfg, get_cfg, merge_cfg_from_file, merge_cfg_from_list
from pydetectron.modeling import roi_heads as roi_heads_module
from pydetectron.modeling.detector import build_detector, total_loss
from pydetectron.modeling.keypoint_head import nms_oks

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")

# Small enough for a CPU step in seconds; heads keep their Detectron structure.
SHRINK = [
    "MODEL.NUM_CLASSES", "4",
    "FPN.DIM", "64",
    "TRAIN.BATCH_SIZE_PER_IM", "16",
    "TRAIN.RPN_BATCH_SIZE_PER_IM", "32",
    "TRAIN.RPN_PRE_NMS_TOP_N", "300",
    "TRAIN.RPN_POST_NMS_TOP_N", "64",
    "TEST.RPN_PRE_NMS_TOP_N", "300",
    "TEST.RPN_POST_NMS_TOP_N", "24",
    "FAST_RCNN.MLP_HEAD_DIM", "64",
    "FAST_RCNN.CONV_HEAD_DIM", "32",
    "MRCNN.DIM_REDUCED", "32",
    "KRCNN.CONV_HEAD_DIM", "32",
    "KRCNN.NUM_STACKED_CONVS", "2",
    "TEST.DETECTIONS_PER_IM", "12",
    "TEST.SCORE_THRESH", "0.0",
]


def load_cfg(relpath, extra=()):
    cfg = get_cfg()
    merge_cfg_from_file(cfg, os.path.join(CONFIGS, relpath))
    merge_cfg_from_list(cfg, SHRINK + list(extra))
    if cfg.MODEL.KEYPOINTS_ON:
        merge_cfg_from_list(cfg, ["KRCNN.NUM_KEYPOINTS", "3"])
    assert_and_infer_cfg(cfg)
    return cfg


def synthetic_batch(sizes=((96, 128), (64, 96)), scales=(1.0, 1.0), num_classes=4, num_keypoints=0,
                    stride=32, seed=0, proposals=False):
    """A minibatch as the data room builds it (ARCHITECTURE.md): padded images, im_info, roidb in
    network-input coordinates with polygons (and keypoints)."""
    rng = np.random.RandomState(seed)
    pad_h = max(-(-h // stride) * stride for h, _ in sizes)
    pad_w = max(-(-w // stride) * stride for _, w in sizes)
    data = torch.zeros(len(sizes), 3, pad_h, pad_w)
    roidb = []
    for i, ((h, w), scale) in enumerate(zip(sizes, scales)):
        data[i, :, :h, :w] = torch.from_numpy(rng.randn(3, h, w).astype(np.float32)) * 20
        boxes, segms, kps = [], [], []
        for _ in range(3):
            bw, bh = rng.uniform(0.3, 0.6) * w, rng.uniform(0.3, 0.6) * h
            x1, y1 = rng.uniform(0, w - bw - 1), rng.uniform(0, h - bh - 1)
            x2, y2 = x1 + bw, y1 + bh
            boxes.append([x1, y1, x2, y2])
            segms.append([np.array([x1, y1, x2, y1, (x1 + x2) / 2, y2], dtype=np.float32)])
            kps.append([[x1 + (x2 - x1) * f, y1 + (y2 - y1) * f, 2] for f in np.linspace(0.2, 0.8, num_keypoints)])
        entry = {
            "boxes": torch.tensor(boxes, dtype=torch.float32),
            "gt_classes": torch.from_numpy(rng.randint(1, num_classes, size=3)).long(),
            "is_crowd": torch.zeros(3, dtype=torch.bool),
            "segms": segms,
            "gt_keypoints": torch.tensor(kps, dtype=torch.float32).reshape(3, num_keypoints, 3)
            if num_keypoints else None,
            "image_id": i,
            "flipped": False,
            "height": int(round(h / scale)),
            "width": int(round(w / scale)),
        }
        if proposals:
            jitter = torch.from_numpy(rng.uniform(-6, 6, size=(40, 4)).astype(np.float32))
            props = entry["boxes"].repeat(14, 1)[:40] + jitter
            props[:, 2:] = torch.maximum(props[:, 2:], props[:, :2] + 2)
            entry["proposals"] = props.clamp(min=0)
        roidb.append(entry)
    im_info = torch.tensor([[h, w, s] for (h, w), s in zip(sizes, scales)], dtype=torch.float32)
    return data, im_info, roidb


def train_step(model, batch, seed=0):
    """One forward/backward; returns the float losses."""
    torch.manual_seed(seed)
    model.train()
    model.zero_grad()
    losses = model(*batch)
    total_loss(losses).backward()
    return {k: v.item() for k, v in losses.items() if k.startswith("loss")}


def check_detections(results, roidb, num_classes, masks=False, num_keypoints=0):
    for det, entry in zip(results, roidb):
        boxes, h, w = det["boxes"], entry["height"], entry["width"]
        num = boxes.shape[0]
        assert num > 0
        assert det["scores"].shape == (num,) and det["classes"].shape == (num,)
        assert det["classes"].dtype == torch.int64
        assert ((det["classes"] >= 1) & (det["classes"] < num_classes)).all()
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= w - 1).all()
        assert (boxes[:, 1] >= 0).all() and (boxes[:, 3] <= h - 1).all()
        if masks:
            assert det["masks"].shape == (num, h, w) and det["masks"].dtype == torch.uint8
        if num_keypoints:
            assert det["keypoints"].shape == (num, num_keypoints, 3)


@pytest.fixture(scope="module")
def fpn_mask_model():
    torch.manual_seed(0)
    return build_detector(load_cfg("baselines/e2e_mask_rcnn_R-50-FPN_1x.yaml"))


def test_fpn_mask_rcnn_losses_on_a_batch_of_two_sizes(fpn_mask_model):
    model = fpn_mask_model
    losses = train_step(model, synthetic_batch())
    expected = {"loss_cls", "loss_bbox", "loss_mask"}
    expected |= {f"loss_rpn_{kind}_fpn{lvl}" for kind in ("cls", "bbox") for lvl in range(2, 7)}
    assert set(losses) == expected
    assert all(np.isfinite(v) for v in losses.values())
    model.train()
    outputs = model(*synthetic_batch())
    assert 0.0 <= outputs["accuracy_cls"].item() <= 1.0 and not outputs["accuracy_cls"].requires_grad
    torch.testing.assert_close(total_loss(outputs), sum(v for k, v in outputs.items() if k != "accuracy_cls"))
    for module in (model.box_outputs, model.box_head, model.mask_head, model.rpn):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
    # The RoI heads pool from P2..P5 only (FPN.ROI_MIN/MAX_LEVEL), the RPN from P2..P6.
    assert [model.body.levels[i] for i in model.roi_indices] == [2, 3, 4, 5]


def test_inference_in_original_coordinates_with_masks(fpn_mask_model, monkeypatch):
    model = fpn_mask_model.eval()
    data, im_info, roidb = synthetic_batch(scales=(2.0, 1.5), seed=1)
    seen = {}
    forward = model.mask_head.forward

    def spy(features, rois):
        seen["rois"] = rois.clone()
        return forward(features, rois)

    monkeypatch.setattr(model.mask_head, "forward", spy)
    results = model(data, im_info, roidb)
    check_detections(results, roidb, 4, masks=True)
    # The mask head pools the final detections scaled back to the network input (boxes * im_scale).
    expected = torch.cat([torch.cat([torch.full((len(d["boxes"]), 1), float(i)), d["boxes"] * im_info[i, 2]], 1)
                          for i, d in enumerate(results)])
    assert torch.allclose(seen["rois"], expected)
    assert all(len(d["boxes"]) <= 12 for d in results)


def test_image_size_without_roidb_comes_from_im_info(fpn_mask_model):
    model = fpn_mask_model.eval()
    data, im_info, roidb = synthetic_batch(sizes=((96, 128),), scales=(2.0,), seed=2)
    results = model(data, im_info)
    assert results[0]["masks"].shape[1:] == (48, 64)


def test_training_needs_roidb_and_bad_inputs_are_named(fpn_mask_model):
    model = fpn_mask_model.train()
    data, im_info, roidb = synthetic_batch()
    with pytest.raises(ValueError, match="roidb"):
        model(data, im_info)
    with pytest.raises(ValueError, match="im_info"):
        model(data, im_info[:1], roidb)


def test_model_type_and_freeze_conv_body():
    with pytest.raises(ValueError, match="MODEL.TYPE"):
        build_detector(load_cfg("baselines/rpn_R-50-C4_1x.yaml", ["MODEL.TYPE", "rfcn"]))
    torch.manual_seed(0)
    model = build_detector(load_cfg("baselines/rpn_R-50-C4_1x.yaml", ["TRAIN.FREEZE_CONV_BODY", "True"]))
    train_step(model, synthetic_batch(seed=9))
    assert all(p.grad is None for p in model.body.parameters())
    assert all(p.grad is not None for p in model.rpn.parameters())


def test_c4_share_res5_mask_head_reuses_box_head_res5_in_training(monkeypatch):
    torch.manual_seed(0)
    cfg = load_cfg("baselines/e2e_mask_rcnn_R-50-C4_1x.yaml")
    model = build_detector(cfg)
    assert model.roi_indices == [0] and model.mask_head.shares_res5
    record = {}
    real_targets = roi_heads_module.mask_rcnn_targets
    monkeypatch.setattr(roi_heads_module, "mask_rcnn_targets",
                        lambda *a, **k: record.setdefault("mt", real_targets(*a, **k)))
    model.box_head.res5.register_forward_hook(lambda m, i, o: record.setdefault("res5", o.detach()))
    predict = model.mask_head.predict
    monkeypatch.setattr(model.mask_head, "predict", lambda x: (record.setdefault("mask_in", x.detach()), predict(x))[1])
    monkeypatch.setattr(model.mask_head, "forward", lambda *a: pytest.fail("training must not re-pool for masks"))
    losses = train_step(model, synthetic_batch(seed=3))
    assert {"loss_cls", "loss_bbox", "loss_mask", "loss_rpn_cls", "loss_rpn_bbox"} == set(losses)
    assert torch.equal(record["mask_in"], record["res5"][record["mt"].roi_has_mask])


def test_c4_batch_inference_matches_single_images():
    torch.manual_seed(0)
    model = build_detector(load_cfg("baselines/e2e_faster_rcnn_R-50-C4_1x.yaml")).eval()
    data, im_info, roidb = synthetic_batch(scales=(1.0, 0.75), seed=4)
    both = model(data, im_info, roidb)
    check_detections(both, roidb, 4)
    first = model(data[:1], im_info[:1], roidb[:1])[0]

    def same(a, b):
        assert torch.equal(a["classes"], b["classes"])
        assert torch.allclose(a["scores"], b["scores"], atol=1e-4)
        assert torch.allclose(a["boxes"], b["boxes"], rtol=1e-3, atol=1e-2)  # convs batch differently

    same(both[0], first)
    # The smaller image, alone but padded as in the batch, gets its own im_info's clipping and scale.
    same(both[1], model(data[1:], im_info[1:], roidb[1:])[0])


def test_keypoint_rcnn_trains_and_predicts_keypoints():
    torch.manual_seed(0)
    extra = ["MODEL.NUM_CLASSES", "2", "TEST.RPN_POST_NMS_TOP_N", "200"]
    cfg = load_cfg("baselines/e2e_keypoint_rcnn_R-50-FPN_1x.yaml", extra)
    model = build_detector(cfg)
    batch = synthetic_batch(num_classes=2, num_keypoints=3, seed=5)
    losses = train_step(model, batch)
    assert "loss_kps" in losses and np.isfinite(losses["loss_kps"]) and losses["loss_kps"] > 0
    results = model.eval()(*batch)
    check_detections(results, batch[2], 2, num_keypoints=3)


def test_keypoint_nms_oks_drops_and_orders_detections_as_detectron():
    torch.manual_seed(0)
    extra = ["MODEL.NUM_CLASSES", "2", "KRCNN.NMS_OKS", "True", "KRCNN.OKS_SIGMAS", "(0.5, 0.5, 0.5)"]
    model = build_detector(load_cfg("baselines/e2e_keypoint_rcnn_R-50-FPN_1x.yaml", extra)).eval()
    data, im_info, roidb = synthetic_batch(sizes=((96, 128),), scales=(1.0,), num_classes=2, num_keypoints=3, seed=5)
    suppressed = model(data, im_info, roidb)[0]
    model.roi_heads.keypoint_settings = dataclasses.replace(model.roi_heads.keypoint_settings, nms_oks_sigmas=())
    everything = model(data, im_info, roidb)[0]
    keep = nms_oks(everything["keypoints"], everything["boxes"], 0.3, (0.5, 0.5, 0.5))
    assert 0 < len(keep) < len(everything["boxes"])  # wide sigmas: overlapping random poses do get suppressed
    for key in ("boxes", "scores", "classes", "keypoints"):
        torch.testing.assert_close(suppressed[key], everything[key][keep])
    with pytest.raises(ValueError, match="KRCNN.NMS_OKS needs KRCNN.OKS_SIGMAS for a 3-keypoint model"):
        build_detector(load_cfg("baselines/e2e_keypoint_rcnn_R-50-FPN_1x.yaml", extra[:4]))


def test_rpn_only_model():
    torch.manual_seed(0)
    model = build_detector(load_cfg("baselines/rpn_R-50-FPN_1x.yaml"))
    assert model.roi_heads is None
    data, im_info, roidb = synthetic_batch(scales=(2.0, 1.0), seed=6)
    losses = train_step(model, (data, im_info, roidb))
    assert set(losses) == {f"loss_rpn_{kind}_fpn{lvl}" for kind in ("cls", "bbox") for lvl in range(2, 7)}
    results = model.eval()(data, im_info, roidb)
    assert set(results[0]) == {"boxes", "scores"}
    assert results[0]["boxes"].max() <= 64  # the 128-pixel input at scale 2 is a 64-pixel image


def test_fast_rcnn_trains_on_roidb_proposals_with_class_agnostic_regression():
    torch.manual_seed(0)
    model = build_detector(load_cfg("baselines/fast_rcnn_R-50-FPN_1x.yaml", ["MODEL.CLS_AGNOSTIC_BBOX_REG", "True"]))
    assert model.rpn is None and model.box_outputs.bbox_pred.out_features == 8
    batch = synthetic_batch(proposals=True, seed=7)
    assert set(train_step(model, batch)) == {"loss_cls", "loss_bbox"}
    check_detections(model.eval()(*batch), batch[2], 4)
    data, im_info, roidb = synthetic_batch(seed=7)
    with pytest.raises(KeyError, match="proposals"):
        model.train()(data, im_info, roidb)


def _detectron_dedup_representatives(rois: np.ndarray, scale: float) -> np.ndarray:
    """Detectron's im_detect_bbox DEDUP_BOXES on (N, 5) [batch, x1, y1, x2, y2] rois, written out: each roi
    replaced by the first roi with the same hash of round(roi * scale)."""
    hashes = np.round(rois * scale).dot(np.array([1, 1e3, 1e6, 1e9, 1e12]))
    _, index, inverse = np.unique(hashes, return_index=True, return_inverse=True)
    return rois[index][inverse]


def test_fast_rcnn_inference_dedups_proposals_as_detectron():
    torch.manual_seed(0)
    model = build_detector(load_cfg("baselines/fast_rcnn_R-50-FPN_1x.yaml")).eval()
    assert model.roi_heads.dedup_scale == pytest.approx(1 / 16)
    data, im_info, roidb = synthetic_batch(sizes=((96, 128),), scales=(1.0,), proposals=True, seed=3)
    props = roidb[0]["proposals"]
    assert props.shape[0] == 40
    deduped = model(data, im_info, roidb)[0]
    rois = torch.cat([torch.zeros(len(props), 1), props], dim=1).numpy().astype(np.float64)
    representatives = _detectron_dedup_representatives(rois, 1 / 16)
    assert len(np.unique(representatives, axis=0)) < len(props)  # the jittered copies do collide
    model.roi_heads.dedup_scale = 0.0
    reference = model(data, im_info, [dict(roidb[0], proposals=torch.from_numpy(representatives[:, 1:]).float())])[0]
    for key in ("boxes", "scores", "classes"):
        torch.testing.assert_close(deduped[key], reference[key])
    empty = model(data, im_info, [dict(roidb[0], proposals=torch.zeros(0, 4))])[0]
    assert empty["boxes"].shape == (0, 4) and empty["scores"].shape == (0,)


@pytest.mark.parametrize("config, blob_list, num_classes, output", [
    ("baselines/e2e_mask_rcnn_R-50-FPN_1x.yaml", "mask_rcnn_r50_fpn_1x_blobs", 81, "masks"),
    ("baselines/e2e_keypoint_rcnn_R-50-FPN_1x.yaml", "keypoint_rcnn_r50_fpn_1x_blobs", 2, "keypoints"),
])
def test_detectron_model_zoo_pickle_loads_completely_and_runs(config, blob_list, num_classes, output):
    import detectron_names

    from pydetectron.weights.detectron_pkl import load_detectron_weights

    cfg = get_cfg()
    merge_cfg_from_file(cfg, os.path.join(CONFIGS, config))
    merge_cfg_from_list(cfg, ["TEST.RPN_PRE_NMS_TOP_N", "200", "TEST.RPN_POST_NMS_TOP_N", "30"])
    assert_and_infer_cfg(cfg)
    model = build_detector(cfg)
    rng = np.random.RandomState(0)
    blobs = {name: (rng.randn(*shape) * 0.01).astype(np.float32)
             for name, shape in getattr(detectron_names, blob_list)().items()}
    # The ImageNet conv biases a model-zoo file carries along are zeros (Caffe1 -> Caffe2 conversion).
    for name in set(detectron_names.imagenet_r50_blobs()) - set(model.detectron_weight_mapping().values()):
        if name.endswith("_b") and name in blobs:
            blobs[name][...] = 0
    report = load_detectron_weights(model, {"blobs": blobs})
    assert report.missing == [] and report.unused == [] and report.unmapped == [] and report.skipped == []
    assert not any(name.endswith("_momentum") for name in report.loaded)
    assert torch.equal(model.box_outputs.cls_score.weight, torch.from_numpy(blobs["cls_score_w"]))
    assert torch.equal(model.box_outputs.bbox_pred.bias, torch.from_numpy(blobs["bbox_pred_b"]))
    assert torch.equal(model.box_head.fc6.bias, torch.from_numpy(blobs["fc6_b"]))
    data, im_info, roidb = synthetic_batch(sizes=((96, 128),), num_classes=num_classes, seed=8)
    results = model.eval()(data, im_info, roidb)
    assert set(results[0]) == {"boxes", "scores", "classes", output}


def test_short_mask_rcnn_run_lowers_its_loss():
    """End to end on one fixed 64 x 64 image, from scratch (ResNet frozen to keep it cheap: FPN, RPN and the
    box and mask heads train): ten AdamW steps cut the total loss, and the class and mask losses each fall."""
    torch.manual_seed(0)
    model = build_detector(load_cfg("getting_started/e2e_mask_rcnn_R-18-FPN_shapes.yaml",
                                    ["TRAIN.BATCH_SIZE_PER_IM", "32", "RESNETS.FREEZE_AT", "5"])).train()
    batch = synthetic_batch(sizes=((64, 64),), seed=3)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    history = []
    for _ in range(10):
        losses = model(*batch)
        total = total_loss(losses)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        history.append({"total": total.item(), **{k: v.item() for k, v in losses.items()}})
    totals = [h["total"] for h in history]
    assert np.mean(totals[-3:]) < 0.75 * totals[0], totals
    for name in ("loss_cls", "loss_mask"):
        assert np.mean([h[name] for h in history[-3:]]) < 0.75 * history[0][name], (name, history)


def test_soft_nms_setting_reaches_the_detections():
    """TEST.SOFT_NMS.ENABLED: the boxes a hard NMS drops come back with decayed scores; each class's best
    detection is the same either way; TEST.SOFT_NMS.METHOD changes the decay."""
    batch = synthetic_batch(sizes=((96, 128),), seed=5)
    results = {}
    for enabled, method in ((False, "linear"), (True, "linear"), (True, "gaussian")):
        torch.manual_seed(0)
        cfg = load_cfg("getting_started/e2e_faster_rcnn_R-18-FPN_shapes.yaml",
                       ["TEST.SOFT_NMS.ENABLED", str(enabled), "TEST.SOFT_NMS.METHOD", method,
                        "TEST.DETECTIONS_PER_IM", "0"])
        with torch.no_grad():
            results[enabled, method] = build_detector(cfg).eval()(*batch)[0]
    hard, soft = results[False, "linear"], results[True, "linear"]
    assert soft["scores"].numel() > hard["scores"].numel() > 0
    for cls in hard["classes"].unique():
        best = [int(torch.argmax(torch.where(r["classes"] == cls, r["scores"], -1.0))) for r in (hard, soft)]
        torch.testing.assert_close(soft["boxes"][best[1]], hard["boxes"][best[0]])
        torch.testing.assert_close(soft["scores"][best[1]], hard["scores"][best[0]])
    gaussian = results[True, "gaussian"]["scores"]
    assert gaussian.shape != soft["scores"].shape or not torch.allclose(gaussian, soft["scores"])
