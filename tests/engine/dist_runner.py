"""Runs one worker of dist_workers.py as one 'machine' of a distributed run (what the failure tests start twice):

    python dist_runner.py WORKER OUT_DIR --num-machines 2 --machine-rank R --dist-url tcp://127.0.0.1:PORT
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dist_workers  # noqa: E402

from pydetectron.engine.launch import add_launch_args, launch, settings_from_args  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("worker")
    parser.add_argument("out_dir")
    parser.add_argument("--no_cuda", dest="cuda", action="store_false")
    add_launch_args(parser)
    args = parser.parse_args()
    launch(getattr(dist_workers, args.worker), settings_from_args(args), (args.out_dir,))
