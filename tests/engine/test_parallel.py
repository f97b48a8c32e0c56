"""The custom DataParallel: per-device sub-batches of different sizes, CPU keywords, gathered outputs."""

import pytest
import torch
from torch import nn

from pydetectron.parallel import DataParallel, gather_outputs


class _SumModel(nn.Module):
    """Returns a loss dict in training and a per-image list in inference, like the detector."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, data, roidb):
        assert all(isinstance(entry["boxes"], torch.Tensor) and entry["boxes"].device.type == "cpu"
                   for entry in roidb)
        if self.training:
            return {"loss": (self.scale * data).mean(), "count": torch.tensor(float(len(roidb)))}
        return [{"sum": (self.scale * image).sum()} for image in data]


def _sub_batches():
    # Two sub-batches with images of different sizes, as the loader's per-device split produces.
    data = [torch.ones(1, 3, 8, 12), torch.full((2, 3, 16, 4), 3.0)]
    roidb = [[{"boxes": torch.zeros(1, 4)}], [{"boxes": torch.zeros(2, 4)}] * 2]
    return data, roidb


def test_cpu_runs_sub_batches_in_turn_and_averages_losses():
    model = DataParallel(_SumModel(), device_ids=[])
    data, roidb = _sub_batches()
    losses = model(data=data, roidb=roidb)
    assert losses["loss"].item() == pytest.approx((2 * 1 + 2 * 3) / 2)
    assert losses["count"].item() == pytest.approx(1.5)
    losses["loss"].backward()
    assert model.module.scale.grad.item() == pytest.approx((1 + 3) / 2)


def test_inference_lists_are_concatenated_in_order():
    model = DataParallel(_SumModel(), device_ids=[]).eval()
    data, roidb = _sub_batches()
    results = model(data=data, roidb=roidb)
    assert [r["sum"].item() for r in results] == [2 * 3 * 8 * 12, 2 * 3 * 3 * 16 * 4, 2 * 3 * 3 * 16 * 4]


def test_single_sub_batch_is_a_plain_call():
    model = DataParallel(_SumModel(), device_ids=[])
    data, roidb = _sub_batches()
    assert model(data=data[:1], roidb=roidb[:1])["loss"].item() == pytest.approx(2.0)


def test_mismatched_sub_batch_counts_are_named():
    model = DataParallel(_SumModel(), device_ids=[])
    data, roidb = _sub_batches()
    with pytest.raises(ValueError, match="one entry per sub-batch"):
        model(data=data, roidb=roidb[:1])


def test_gather_rejects_unknown_types():
    with pytest.raises(TypeError, match="str"):
        gather_outputs(["a", "b"], torch.device("cpu"))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two visible GPUs")
def test_two_gpus_match_the_cpu_result():
    data, roidb = _sub_batches()
    expected = DataParallel(_SumModel(), device_ids=[])(data=data, roidb=roidb)["loss"]
    got = DataParallel(_SumModel().cuda(), device_ids=[0, 1])(data=data, roidb=roidb)["loss"]
    assert got.item() == pytest.approx(expected.item())
