"""Training logger: what the console line, metrics.json and tensorboard receive."""

import pytest

from pydetectron.engine.logger import SmoothedValue, TrainingLogger, read_metrics


def test_smoothed_value_window_median_and_global_average():
    value = SmoothedValue(window=3)
    for v in (10.0, 1.0, 2.0, 3.0):
        value.add(v)
    assert value.median == 2.0  # window holds 1, 2, 3
    assert value.global_avg == pytest.approx(4.0)


def test_reports_every_interval_and_at_the_last_step(tmp_path):
    lines = []
    logger = TrainingLogger(tmp_path, max_iter=5, disp_interval=2, use_tfboard=True, print_fn=lines.append)
    for step in range(5):
        losses = {"loss": 1.0 + step, "loss_cls": 0.5, "loss_bbox": 0.25 * step}
        logger.log_step(step, losses, lr=0.01, iter_time=2.0, data_time=0.5)
    logger.log_eval(5, {"bbox/AP": 0.5})
    logger.close()

    assert [line.split("]")[0] for line in lines] == ["[step 2/5", "[step 4/5", "[step 5/5", "[step 5"]
    assert "loss 1.5000" in lines[0] and "loss_bbox 0.1250" in lines[0]  # medians of the window
    assert "lr 0.010000" in lines[0] and "2.000s/it (data 0.500s)" in lines[0]
    assert "eta 0:00:06" in lines[0]  # 3 steps left x 2 s
    records = read_metrics(tmp_path / "metrics.json")
    assert [r["step"] for r in records] == [2, 4, 5, 5]
    assert records[1]["loss_cls"] == 0.5 and records[1]["eta_seconds"] == 2.0
    assert records[-1] == {"step": 5, "eval/bbox/AP": 0.5}
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_console_sums_fpn_levels_but_metrics_keep_them(tmp_path):
    lines = []
    logger = TrainingLogger(tmp_path, max_iter=1, disp_interval=1, print_fn=lines.append)
    logger.log_step(0, {"loss": 1.0, "loss_rpn_cls_fpn2": 0.25, "loss_rpn_cls_fpn3": 0.5, "loss_cls": 0.25},
                    lr=0.1, iter_time=1.0, data_time=0.0)
    assert "loss_rpn_cls 0.7500" in lines[0] and "fpn2" not in lines[0]
    assert read_metrics(tmp_path / "metrics.json")[0]["loss_rpn_cls_fpn2"] == 0.25
