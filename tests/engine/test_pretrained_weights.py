"""Training starts from the configured weights, any format, through `load_pretrained`."""

import pickle

import pytest
import torch
import torchvision

from pydetectron.config import assert_and_infer_cfg, get_cfg, merge_cfg_from_file, merge_cfg_from_list
from pydetectron.engine.training import TrainOptions, load_weights
from pydetectron.modeling.detector import build_detector
from pydetectron.weights.detectron_pkl import model_weight_mapping

CFG = "configs/getting_started/e2e_faster_rcnn_R-18-FPN_shapes.yaml"


def _cfg(weights: str):
    cfg = get_cfg()
    merge_cfg_from_file(cfg, CFG)
    merge_cfg_from_list(cfg, [
        "MODEL.NUM_CLASSES", 4, "RESNETS.USE_GN", False, "RESNETS.NORM", "AffineChannel", "FPN.USE_GN", False,
        "FAST_RCNN.ROI_BOX_HEAD", "fast_rcnn_heads.roi_2mlp_head", "MODEL.LOAD_IMAGENET_PRETRAINED_WEIGHTS", True,
        "RESNETS.IMAGENET_PRETRAINED_WEIGHTS", weights, "MODEL.INPUT_COLOR_ORDER", "RGB",
        "PIXEL_MEANS", [[[123.675, 116.28, 103.53]]], "PIXEL_STDS", [[[58.395, 57.12, 57.375]]],
    ])
    return assert_and_infer_cfg(cfg)


def test_torchvision_resnet_pth_initialises_the_body(tmp_path):
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(resnet.state_dict(), path)
    cfg = _cfg(str(path))
    model = build_detector(cfg)
    lines = []
    load_weights(model, cfg, TrainOptions(), lines.append, output_dir=tmp_path / "run")
    assert lines[0] == "Initial weights from RESNETS.IMAGENET_PRETRAINED_WEIGHTS:"
    assert lines[1].startswith(f"Loaded {path} (torchvision / timm ResNet state dict)")
    assert (tmp_path / "run" / "weights_report.txt").read_text().strip() == lines[1].strip()
    by_blob = {blob: key for key, blob in model_weight_mapping(model).items() if blob}
    ours = model.state_dict()[by_blob["res3_1_branch2a_w"]]  # torchvision layer2[1].conv1
    torch.testing.assert_close(ours, resnet.layer2[1].conv1.weight.detach())


def test_missing_pretrained_file_names_the_key(tmp_path):
    cfg = _cfg(str(tmp_path / "nope.pkl"))
    with pytest.raises(FileNotFoundError, match="RESNETS.IMAGENET_PRETRAINED_WEIGHTS"):
        load_weights(build_detector(cfg), cfg, TrainOptions(), print)


def test_train_weights_takes_a_detectron2_pkl(tmp_path):
    """The file that used to load 0 blobs and train from random weights after one summary line."""
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18()
    d2 = {}
    for key, value in resnet.state_dict().items():
        key = key if "layer" in key else "stem." + key
        for t in (1, 2, 3, 4):
            key = key.replace(f"layer{t}", f"res{t + 1}")
        for t in (1, 2, 3):
            key = key.replace(f"bn{t}", f"conv{t}.norm")
        d2[key.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")] = value.numpy()
    path = tmp_path / "r18.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": d2, "__author__": "torchvision", "matching_heuristics": True}, f)
    cfg = _cfg("")
    cfg.defrost()
    cfg.TRAIN.WEIGHTS = str(path)
    model = build_detector(cfg)
    lines = []
    load_weights(model, cfg, TrainOptions(), lines.append)
    assert "loaded 60 blobs" in lines[1] and "20 batch norms folded" in lines[1]
    assert "file and model both RGB" in lines[1]
    by_blob = {blob: key for key, blob in model_weight_mapping(model).items() if blob}
    torch.testing.assert_close(model.state_dict()[by_blob["res3_1_branch2a_w"]], resnet.layer2[1].conv1.weight,
                               rtol=0, atol=0)


def test_load_ckpt_skips_class_layers_of_another_size_with_a_message(tmp_path):
    cfg = _cfg("")
    cfg.defrost()
    cfg.MODEL.LOAD_IMAGENET_PRETRAINED_WEIGHTS = False
    source = build_detector(cfg)
    state = dict(source.state_dict())
    cls_key = next(k for k in state if k.endswith("cls_score.weight"))
    state[cls_key] = torch.zeros(9, state[cls_key].shape[1])
    path = tmp_path / "model_step10.pth"
    torch.save({"model": state, "step": 10}, path)
    target = build_detector(cfg)
    lines = []
    load_weights(target, cfg, TrainOptions(load_ckpt=str(path)), lines.append)
    assert any("skipped: cls_score_w: skipped, class-count layer" in line for line in lines)
    key = next(k for k in state if k.endswith("res3.0.branch2a.conv.weight"))
    torch.testing.assert_close(target.state_dict()[key], source.state_dict()[key], rtol=0, atol=0)
