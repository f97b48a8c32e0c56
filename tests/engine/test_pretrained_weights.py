"""Training starts from the configured ImageNet weights: a torchvision .pth or a Detectron .pkl."""

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
    load_weights(model, cfg, TrainOptions(), lines.append)
    assert any("Loaded ImageNet weights" in line for line in lines)
    by_blob = {blob: key for key, blob in model_weight_mapping(model).items() if blob}
    ours = model.state_dict()[by_blob["res3_1_branch2a_w"]]  # torchvision layer2[1].conv1
    torch.testing.assert_close(ours, resnet.layer2[1].conv1.weight.detach())


def test_missing_pretrained_file_names_the_key(tmp_path):
    cfg = _cfg(str(tmp_path / "nope.pkl"))
    with pytest.raises(FileNotFoundError, match="RESNETS.IMAGENET_PRETRAINED_WEIGHTS"):
        load_weights(build_detector(cfg), cfg, TrainOptions(), print)
