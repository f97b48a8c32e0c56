"""Both detectors check their inputs and recover original sizes in one shared place (detector_inputs.py)."""

import pytest
import torch
from test_detector import load_cfg, synthetic_batch

from pydetectron.modeling.detector import build_detector
from pydetectron.modeling.detector_inputs import checked_im_info, original_sizes

CONFIGS = ("getting_started/e2e_mask_rcnn_R-18-FPN_shapes.yaml", "getting_started/retinanet_R-18-FPN_shapes.yaml")


def test_original_sizes_prefer_the_roidb_and_else_round_the_unscaled_size():
    im_info = torch.tensor([[150.0, 200.0, 1.5], [99.0, 61.0, 0.6]])
    # 200 / 1.5 = 133.3 -> 133; 99 / 0.6 = 165; 61 / 0.6 = 101.7 -> 102
    assert original_sizes(im_info, None) == [(100, 133), (165, 102)]
    assert original_sizes(im_info, [{"height": 101, "width": 134}, {"height": 7}]) == [(101, 134), (165, 102)]


def test_checked_im_info_names_what_came():
    data = torch.zeros(2, 3, 32, 32)
    im_info = torch.tensor([[32, 32, 1.0], [30, 20, 1.0]], dtype=torch.float64)
    out = checked_im_info("M", data, im_info, None, training=False)
    assert out.dtype == torch.float32 and torch.equal(out, im_info.float())
    with pytest.raises(ValueError, match=r"im_info \(N, 3\); got \(2, 3, 32, 32\) and \(1, 3\)"):
        checked_im_info("M", data, im_info[:1], None, training=False)
    with pytest.raises(ValueError, match="data must be"):
        checked_im_info("M", data[0], im_info, None, training=False)
    with pytest.raises(ValueError, match="3 roidb entries for 2 images"):
        checked_im_info("M", data, im_info, [{}, {}, {}], training=False)
    with pytest.raises(ValueError, match="M needs the minibatch roidb in training mode"):
        checked_im_info("M", data, im_info, None, training=True)


@pytest.mark.parametrize("config", CONFIGS)
def test_both_detectors_refuse_a_roidb_of_the_wrong_length(config):
    model = build_detector(load_cfg(config))
    data, im_info, roidb = synthetic_batch(stride=128)
    for mode in (model.train, model.eval):
        mode()
        with pytest.raises(ValueError, match="1 roidb entries for 2 images"):
            model(data, im_info, roidb[:1])
