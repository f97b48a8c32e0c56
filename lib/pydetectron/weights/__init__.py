"""Weights in and out: every pretrained format through one entry point, :func:`load_pretrained`
(``pretrained.py``), on top of the Caffe2-blob-name loader (``detectron_pkl.py``) and the format readers
(``formats.py``, ``torchvision.py``, ``detectron2.py``)."""

from pydetectron.weights.detectron_pkl import (
    LoadReport,
    detectron_blobs,
    load_detectron_weights,
    model_weight_mapping,
    read_detectron_pickle,
    save_detectron_weights,
)
from pydetectron.weights.formats import WeightFile, read_weights
from pydetectron.weights.pretrained import WeightMismatchError, load_pretrained

__all__ = [
    "LoadReport",
    "WeightFile",
    "WeightMismatchError",
    "detectron_blobs",
    "load_detectron_weights",
    "load_pretrained",
    "model_weight_mapping",
    "read_detectron_pickle",
    "read_weights",
    "save_detectron_weights",
]
