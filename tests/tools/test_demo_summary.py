"""tools/demo_summary.py: the wall time and AP lines `make demo` ends with."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[2] / "tools" / "demo_summary.py"


def _figures(ap: float) -> dict:
    return {"AP": ap, "AP50": 0.9, "AP75": 0.7, "APs": 0.5, "APm": 0.6, "APl": 0.7}


def _demo_dir(tmp_path: Path, seconds_ago: int, box_ap: float, mask_ap: float) -> Path:
    (tmp_path / "test").mkdir()
    (tmp_path / "started").write_text(f"{int(time.time()) - seconds_ago}\n")
    evaluation = {"shapes_val": {"bbox": _figures(box_ap), "segm": _figures(mask_ap)}}
    (tmp_path / "test" / "evaluation.json").write_text(json.dumps(evaluation))
    return tmp_path


def _run(demo_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), str(demo_dir)], capture_output=True, text=True, timeout=60)


def test_prints_the_wall_time_and_both_aps(tmp_path):
    result = _run(_demo_dir(tmp_path, 372, 0.6123, 0.5987))
    assert result.returncode == 0, result.stderr
    first, second = result.stdout.splitlines()
    assert first.startswith("make demo: ") and ("6 min 12 s" in first or "6 min 13 s" in first)
    assert second == "shapes_val: box AP 0.612, mask AP 0.599; promised: box >= 0.50, mask >= 0.45"
    assert "BELOW" not in second


def test_a_result_below_the_promise_is_said(tmp_path):
    result = _run(_demo_dir(tmp_path, 10, 0.55, 0.4449))
    assert result.returncode == 0, result.stderr
    assert "BELOW the demo's promise: mask AP 0.445 < 0.45" in result.stdout
    assert "box AP 0.550 <" not in result.stdout


@pytest.mark.parametrize("broken, message", [
    ("started", "started does not exist: make demo writes"),
    ("evaluation", "evaluation.json does not exist: tools/test_net.py writes it"),
    ("garbled", "expected the Unix time in seconds"),
    ("no_segm", "has no ['segm'] figures"),
])
def test_missing_or_malformed_inputs_are_named(tmp_path, broken, message):
    demo_dir = _demo_dir(tmp_path, 10, 0.6, 0.6)
    if broken == "started":
        (demo_dir / "started").unlink()
    elif broken == "evaluation":
        (demo_dir / "test" / "evaluation.json").unlink()
    elif broken == "garbled":
        (demo_dir / "started").write_text("yesterday")
    else:
        (demo_dir / "test" / "evaluation.json").write_text(json.dumps({"shapes_val": {"bbox": _figures(0.6)}}))
    result = _run(demo_dir)
    assert result.returncode != 0
    assert message in result.stderr
