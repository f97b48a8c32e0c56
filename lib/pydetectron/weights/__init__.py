"""Weights in and out: Detectron ``.pkl`` files by Caffe2 blob name, torchvision ResNet ``.pth`` files."""

from pydetectron.weights.detectron_pkl import (
    LoadReport,
    detectron_blobs,
    load_detectron_weights,
    model_weight_mapping,
    read_detectron_pickle,
    save_detectron_weights,
)
from pydetectron.weights.torchvision import load_torchvision_resnet, torchvision_resnet_to_blobs

__all__ = [
    "LoadReport",
    "detectron_blobs",
    "load_detectron_weights",
    "load_torchvision_resnet",
    "model_weight_mapping",
    "read_detectron_pickle",
    "save_detectron_weights",
    "torchvision_resnet_to_blobs",
]
