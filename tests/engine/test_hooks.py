"""PreciseBN (detectron2's TEST.PRECISE_BN) and the EMA hook."""

import torch
from torch import nn

from pydetectron.engine.hooks import EMA, PreciseBN, update_bn_stats


def _batches(count: int):
    generator = torch.Generator().manual_seed(0)
    return [{"data": torch.randn(3, 2, 4, 4, generator=generator) * (i + 1) + i} for i in range(count)]


def test_precise_bn_sets_the_true_average_of_the_batch_statistics():
    model = nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)).train()
    batches = _batches(5)
    updated = update_bn_stats(model, iter(batches), lambda b: model(b["data"]), 5)
    assert updated == 1
    with torch.no_grad():  # reference: each batch's mean and unbiased variance after the conv, averaged
        outs = [model[0](b["data"]) for b in batches]
    means = torch.stack([o.mean(dim=(0, 2, 3)) for o in outs]).mean(0)
    variances = torch.stack([o.var(dim=(0, 2, 3), unbiased=True) for o in outs]).mean(0)
    torch.testing.assert_close(model[1].running_mean, means)
    torch.testing.assert_close(model[1].running_var, variances)
    assert model[1].momentum == 0.1  # restored


def test_precise_bn_hook_runs_before_evaluation_and_leaves_the_rng_alone():
    model = nn.Sequential(nn.BatchNorm2d(2))
    lines = []
    hook = PreciseBN(model, lambda step: iter(_batches(3)), lambda b: model(b["data"]), 3, lines.append)
    state = torch.get_rng_state()
    hook.before_evaluation(None, 10)
    assert torch.equal(state, torch.get_rng_state())
    assert lines == ["PreciseBN: statistics of 1 BatchNorm layers recomputed over 3 batches"]
    torch.testing.assert_close(model[0].running_mean,
                               torch.stack([b["data"].mean(dim=(0, 2, 3)) for b in _batches(3)]).mean(0))


def test_ema_averages_weights_and_is_evaluated_in_their_place():
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = EMA(model, decay=0.5)
    for value in (1.0, 2.0):
        with torch.no_grad():
            model.weight.fill_(value)
        ema.after_step(None, 0, {})
    expected = (0.0 * 0.5 + 1.0 * 0.5) * 0.5 + 2.0 * 0.5
    ema.before_evaluation(None, 2)
    assert model.weight.item() == expected
    ema.after_evaluation(None, 2, None)
    assert model.weight.item() == 2.0
    restored = EMA(model, decay=0.5)
    restored.load_state_dict(ema.state_dict())
    assert restored.average["weight"].item() == expected


def test_precise_bn_from_the_cfg_recomputes_a_detectors_batch_norms(tmp_path):
    """TEST.PRECISE_BN wires the hook to fresh training batches and a training-mode forward of the detector."""
    from pydetectron.config import assert_and_infer_cfg, get_cfg, merge_cfg_from_list
    from pydetectron.data.catalog import DatasetSpec
    from pydetectron.data.coco import CocoDataset
    from pydetectron.data.roidb import filter_for_training
    from pydetectron.data.shapes import generate_split
    from pydetectron.engine.training import _cfg_hooks
    from pydetectron.modeling.detector import build_detector

    paths = generate_split(tmp_path, "train", 4, seed=0)
    spec = DatasetSpec("pbn", str(tmp_path / "train"), str(paths["instances"]))
    roidb = filter_for_training(CocoDataset(spec, cache_dir=str(tmp_path / "cache")).get_roidb())
    cfg = get_cfg()
    merge_cfg_from_list(cfg, [
        "MODEL.CONV_BODY", "FPN.add_fpn_ResNet18_conv5_body", "MODEL.NUM_CLASSES", 4, "MODEL.FASTER_RCNN", True,
        "RESNETS.TRANS_FUNC", "basic_transformation", "RESNETS.NORM", "BN", "RESNETS.FREEZE_AT", 0,
        "FPN.FPN_ON", True, "FPN.MULTILEVEL_ROIS", True, "FPN.MULTILEVEL_RPN", True, "FPN.DIM", 16,
        "FAST_RCNN.ROI_BOX_HEAD", "fast_rcnn_heads.add_roi_2mlp_head", "FAST_RCNN.MLP_HEAD_DIM", 16,
        "FAST_RCNN.ROI_XFORM_METHOD", "RoIAlign", "TRAIN.SCALES", (64,), "TRAIN.MAX_SIZE", 96,
        "TRAIN.IMS_PER_BATCH", 1, "DATA_LOADER.NUM_THREADS", 0, "MODEL.LOAD_IMAGENET_PRETRAINED_WEIGHTS", False,
        "TEST.PRECISE_BN.ENABLED", True, "TEST.PRECISE_BN.NUM_ITER", 2])
    assert_and_infer_cfg(cfg)
    torch.manual_seed(0)
    model = build_detector(cfg)
    lines = []
    assert _cfg_hooks(cfg, model, roidb, torch.device("cpu"), None, lines.append) == []  # nothing to evaluate
    (hook,) = _cfg_hooks(cfg, model, roidb, torch.device("cpu"), lambda step: {}, lines.append)
    stem_bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    before = stem_bn.running_mean.clone()
    model.eval()
    hook.before_evaluation(None, 5)
    assert not model.training  # the evaluation's mode is left as it was
    assert lines and lines[-1].startswith("PreciseBN: statistics of") and "over 2 batches" in lines[-1]
    assert not torch.equal(stem_bn.running_mean, before)
