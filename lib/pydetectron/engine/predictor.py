"""One image in, detections out: the Python face of ``tools/infer_simple.py`` (as detectron2's DefaultPredictor).

    from pydetectron import Predictor
    predictor = Predictor("configs/baselines/e2e_mask_rcnn_R-50-FPN_1x.yaml", "model_final.pkl")
    detections = predictor(cv2.imread("image.jpg"))  # boxes, scores, classes, masks, keypoints

The cfg is prepared as the inference tools prepare it (:func:`prepare_inference_cfg`: class names and counts
from --dataset, or from the cfg and the weights) and the weights load strictly through
``engine.inference_model.build_inference_model``; TEST.* settings (scale, thresholds, test-time augmentation)
apply as in ``tools/test_net.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

import numpy as np
import torch

from pydetectron.config import CfgNode, assert_and_infer_cfg, get_cfg, merge_cfg_from_file
from pydetectron.data.coco import DatasetMeta
from pydetectron.data.minibatch import BlobSettings
from pydetectron.engine.dataset_cfg import check_num_classes, dataset_meta, model_meta
from pydetectron.engine.inference_model import build_inference_model, weights_num_classes
from pydetectron.evaluation.bbox_aug import detection_function
from pydetectron.evaluation.inference import detect_image


def prepare_inference_cfg(cfg: CfgNode, load_ckpt: str | None, load_detectron: str | None,
                          dataset: str | None = None, print_fn: Callable[[str], None] = print) -> DatasetMeta:
    """Fill MODEL.NUM_CLASSES and KRCNN.NUM_KEYPOINTS, freeze `cfg`, and return the class / keypoint names.

    With `dataset` (a --dataset value) the names are that dataset's, and a cfg class count that differs is a
    ``DatasetMismatchError`` (engine.dataset_cfg). Without it, an unset MODEL.NUM_CLASSES is read from the
    weights' box classifier (COCO's 81 when they have none, as Detectron's infer_simple assumes), and the names
    follow ``engine.dataset_cfg.model_meta`` (the cfg's datasets, else COCO's names by count)."""
    if dataset:
        meta = dataset_meta(dataset)
        if cfg.MODEL.NUM_CLASSES <= 0:
            cfg.MODEL.NUM_CLASSES = meta.num_classes
        check_num_classes(cfg, meta, f"--dataset {dataset!r}")
    else:
        if cfg.MODEL.NUM_CLASSES <= 0:
            found = weights_num_classes(load_ckpt, load_detectron, cfg.DOWNLOAD_CACHE)
            cfg.MODEL.NUM_CLASSES = found or 81
            print_fn(f"MODEL.NUM_CLASSES = {cfg.MODEL.NUM_CLASSES} "
                     + ("from the weights' box classifier" if found else "(COCO's; the weights do not say)"))
        meta = model_meta(cfg, cfg.MODEL.NUM_CLASSES)
    if cfg.MODEL.KEYPOINTS_ON and cfg.KRCNN.NUM_KEYPOINTS <= 0:
        cfg.KRCNN.NUM_KEYPOINTS = meta.num_keypoints
    assert_and_infer_cfg(cfg)
    return meta


def weights_flags(weights: str) -> tuple[str | None, str | None]:
    """(load_ckpt, load_detectron) for a weights path or URL, as the tools' flags would name it: a ``.pkl`` as
    --load_detectron, anything else as --load_ckpt. The flag only names the source in messages: the loader
    (``weights.load_pretrained``) recognises every format by content, whatever the extension."""
    if Path(urlsplit(weights).path).suffix.lower() == ".pkl":
        return None, weights
    return weights, None


class Predictor:
    """A detector ready for single BGR images: ``Predictor(cfg, weights)(image) -> detections``.

    Args:
        cfg: a config YAML path, or a CfgNode (copied, never modified).
        weights: any weights file the loader reads (Detectron ``.pkl``, pydetectron checkpoint, ...), a path
            or an http(s) URL (downloaded once into cfg.DOWNLOAD_CACHE).
        device: where the model runs (default: the first GPU if any, else the CPU).
        dataset: optional --dataset for the class names (see :func:`prepare_inference_cfg`).

    Attributes: ``cfg`` (frozen), ``model``, ``class_names`` ('__background__' first), ``meta``.
    """

    def __init__(self, cfg: str | Path | CfgNode, weights: str, device: torch.device | str | None = None,
                 dataset: str | None = None, print_fn: Callable[[str], None] = print) -> None:
        if isinstance(cfg, CfgNode):
            cfg = cfg.clone()
            cfg.defrost()
        else:
            path, cfg = str(cfg), get_cfg()
            merge_cfg_from_file(cfg, path)
        self._build(cfg, *weights_flags(weights), device, dataset, print_fn)

    @classmethod
    def from_flags(cls, cfg: CfgNode, load_ckpt: str | None, load_detectron: str | None,
                   device: torch.device | str | None = None, dataset: str | None = None,
                   print_fn: Callable[[str], None] = print) -> Predictor:
        """As the inference tools build it: the weights' kind given by --load_ckpt / --load_detectron, and the
        tool's unfrozen `cfg` prepared (and frozen) in place."""
        predictor = cls.__new__(cls)
        predictor._build(cfg, load_ckpt, load_detectron, device, dataset, print_fn)
        return predictor

    def _build(self, cfg: CfgNode, load_ckpt: str | None, load_detectron: str | None,
               device: torch.device | str | None, dataset: str | None, print_fn: Callable[[str], None]) -> None:
        self.cfg = cfg
        self.meta = prepare_inference_cfg(cfg, load_ckpt, load_detectron, dataset, print_fn)
        self.device = torch.device(device) if device is not None else (
            torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
        self.model = build_inference_model(cfg, load_ckpt, load_detectron, self.device)
        self.settings = BlobSettings.from_cfg(cfg, train=False)
        self._detect = detection_function(cfg, self.meta.keypoint_flip_permutation()) or detect_image

    @property
    def class_names(self) -> list[str]:
        return self.meta.classes

    def __call__(self, image_bgr: np.ndarray) -> dict[str, torch.Tensor]:
        """Detections of one ``(H, W, 3)`` uint8 BGR image (as ``cv2.imread`` gives), in its own pixels, on CPU:
        ``boxes`` (D, 4) inclusive x1, y1, x2, y2; ``scores`` (D,); ``classes`` (D,) indices into
        ``class_names``; ``masks`` (D, H, W) uint8 with MODEL.MASK_ON; ``keypoints`` (D, K, 3) = (x, y, logit)
        with MODEL.KEYPOINTS_ON. An RPN-only model gives ``boxes`` and ``scores``."""
        if not (isinstance(image_bgr, np.ndarray) and image_bgr.dtype == np.uint8 and image_bgr.ndim == 3
                and image_bgr.shape[2] == 3 and image_bgr.shape[0] > 0 and image_bgr.shape[1] > 0):
            described = (f"{image_bgr.dtype} array of shape {image_bgr.shape}" if isinstance(image_bgr, np.ndarray)
                         else type(image_bgr).__name__)
            raise ValueError(f"Predictor takes a BGR uint8 image of shape (H, W, 3), got a {described}")
        return self._detect(self.model, image_bgr, self.settings, self.device)
