"""tools/test_net.py with the GridDetector in place of the real model: the child the multi-process test launches."""

import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tools_stubs import GridDetector  # noqa: E402

import pydetectron.engine.inference_model as inference_model  # noqa: E402

inference_model.build_detector = lambda cfg: GridDetector(cfg.MODEL.NUM_CLASSES)
runpy.run_path(str(Path(__file__).resolve().parents[2] / "tools" / "test_net.py"), run_name="__main__")
