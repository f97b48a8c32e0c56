"""The ROI-heads layer: GeneralizedRCNN reaches the box / mask / keypoint cascade only through the registry
(``MODEL.ROI_HEADS_NAME``), the heads' modules keep their state_dict keys at the detector's top level, and a
DataParallel replica of the detector runs its own copies of them."""

import copy

import pytest
import torch
from test_detector import load_cfg, synthetic_batch, train_step

from pydetectron.modeling import registry
from pydetectron.modeling.detector import build_detector
from pydetectron.modeling.roi_heads import DEFAULT_ROI_HEADS, DetectronROIHeads, build_detectron_roi_heads

CONFIG = "getting_started/e2e_mask_rcnn_R-18-FPN_shapes.yaml"
HEAD_NAMES = ("box_head", "box_outputs", "mask_head", "keypoint_head")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_detector(load_cfg(CONFIG)).eval()


def test_default_cascade_is_detectrons_and_an_unknown_name_lists_the_valid_ones():
    registry.import_builtin_modules()
    assert load_cfg(CONFIG).MODEL.ROI_HEADS_NAME == DEFAULT_ROI_HEADS
    assert registry.lookup("roi_heads", DEFAULT_ROI_HEADS) is build_detectron_roi_heads
    with pytest.raises(registry.RegistryError, match="unknown roi_heads 'StandardROIHead'.*DetectronROIHeads"):
        build_detector(load_cfg(CONFIG, ["MODEL.ROI_HEADS_NAME", "StandardROIHead"]))


def test_head_modules_are_the_detectors_own_and_registered_once(model):
    heads = model.roi_heads
    assert isinstance(heads, DetectronROIHeads) and heads.mask_on and not heads.keypoints_on
    assert [name for name, m in heads.head_modules().items() if m is not None] == ["box_head", "box_outputs",
                                                                                   "mask_head"]
    for name, module in heads.head_modules().items():
        assert getattr(model, name) is module
    keys = list(model.state_dict())
    params = [name for name, _ in model.named_parameters()]
    assert len(set(keys)) == len(keys) and set(params) <= set(keys)
    assert sum(p.numel() for p in model.parameters()) == sum(
        v.numel() for k, v in model.state_dict().items() if k in set(params))
    assert not any(k.startswith("roi_heads") for k in keys)
    assert {k.split(".")[0] for k in keys} == {"body", "rpn", "box_head", "box_outputs", "mask_head"}
    mapping = model.detectron_weight_mapping()
    assert mapping["box_head.fc6.weight"] == "fc6_w" and mapping["box_outputs.cls_score.bias"] == "cls_score_b"


class _RecordingHeads(DetectronROIHeads):
    calls: list = []

    def forward_train(self, features, proposals, im_info, roidb):
        self.calls.append(("train", len(features), proposals.shape[1]))
        return super().forward_train(features, proposals, im_info, roidb)

    def forward_inference(self, features, proposals, im_info, sizes, precomputed):
        self.calls.append(("inference", len(features), precomputed))
        return super().forward_inference(features, proposals, im_info, sizes, precomputed)


def _recording_heads(cfg, dim_in, spatial_scales):
    heads = build_detectron_roi_heads(cfg, dim_in, spatial_scales)
    return _RecordingHeads(cfg, heads.box_head, heads.box_outputs, heads.mask_head, heads.keypoint_head)


def test_detector_runs_whatever_cascade_the_config_names(model, monkeypatch):
    registry.import_builtin_modules()
    monkeypatch.setitem(registry._REGISTRY["roi_heads"], "RecordingROIHeads", _recording_heads)
    torch.manual_seed(0)
    recorded = build_detector(load_cfg(CONFIG, ["MODEL.ROI_HEADS_NAME", "RecordingROIHeads"])).eval()
    assert isinstance(recorded.roi_heads, _RecordingHeads)
    data, im_info, roidb = synthetic_batch(sizes=((64, 96),), seed=2)
    _RecordingHeads.calls.clear()
    got, expected = recorded(data, im_info, roidb), model(data, im_info, roidb)
    for key in ("boxes", "scores", "classes", "masks"):  # same seed, same weights: the very same cascade
        assert torch.equal(got[0][key], expected[0][key])
    train_step(recorded, (data, im_info, roidb))
    # P2..P5 (FPN.ROI_MIN/MAX_LEVEL) reach the heads; RPN proposals, so no DEDUP_BOXES at inference.
    assert _RecordingHeads.calls == [("inference", 4, False), ("train", 4, 5)]


def _shallow_replica(model):
    """What torch's ``replicate`` makes of `model`: a shallow copy whose children are then replaced by copies."""
    replica = model._replicate_for_data_parallel()
    for name, child in model.named_children():
        setattr(replica, name, copy.deepcopy(child))
    return replica


def test_a_data_parallel_replica_runs_its_own_head_modules(model):
    replica = _shallow_replica(model)
    heads = replica.roi_heads
    assert heads is not model.roi_heads and replica.roi_heads is heads  # bound once, then kept
    for name in HEAD_NAMES:
        assert getattr(heads, name) is getattr(replica, name)
        assert getattr(model.roi_heads, name) is getattr(model, name)
    assert heads.mask_settings is model.roi_heads.mask_settings
    fired = []
    replica.mask_head.register_forward_hook(lambda *a: fired.append("replica"))
    handle = model.mask_head.register_forward_hook(lambda *a: fired.append("original"))
    try:
        data, im_info, roidb = synthetic_batch(sizes=((64, 96),), seed=2)
        replica(data, im_info, roidb)
    finally:
        handle.remove()
    assert fired == ["replica"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch.nn.parallel.replicate needs a GPU")
def test_torch_replicate_binds_the_cascade_to_the_replicas_modules():
    torch.manual_seed(0)
    original = build_detector(load_cfg(CONFIG)).cuda().eval()
    (replica,) = torch.nn.parallel.replicate(original, [0], detach=True)
    for name in HEAD_NAMES:
        assert getattr(replica.roi_heads, name) is getattr(replica, name)
    data, im_info, roidb = synthetic_batch(sizes=((64, 96),), seed=2)
    with torch.no_grad():
        got, expected = replica(data.cuda(), im_info, roidb), original(data.cuda(), im_info, roidb)
    assert torch.equal(got[0]["boxes"], expected[0]["boxes"])
