"""Roidb entries -> the minibatch dict the model consumes (ARCHITECTURE.md "Training inputs"), and the
test-time image blob. Detectron's ``roi_data/minibatch.py`` + ``utils/blob.py``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np
import torch

from pydetectron.data import detectron2_transforms as d2
from pydetectron.data.transforms import (
    crop_to_aspect,
    im_list_to_blob,
    normalize,
    padded_size,
    prep_im_for_blob,
    read_image,
    scale_targets,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BlobSettings:
    """Plain values that turn an image into network input. Means/stds are (3,) in the network's channel
    order (BGR unless ``to_rgb``). ``stride`` 0 = no padding beyond the largest image."""

    scales: Tuple[int, ...]
    max_size: int
    pixel_means: Tuple[float, float, float]
    pixel_stds: Tuple[float, float, float] = (1.0, 1.0, 1.0)
    to_rgb: bool = False
    stride: int = 0
    aspect_cropping: bool = False
    aspect_lo: float = 0.5
    aspect_hi: float = 2.0
    detectron2: bool = False  # detectron2's reading, resizing and targets (data/detectron2_transforms.py)
    scale_sampling: str = "choice"  # TRAIN.SCALE_SAMPLING: one of `scales`, or 'range' = an integer in [lo, hi]

    def __post_init__(self):
        if not self.scales or any(int(s) <= 0 for s in self.scales):
            raise ValueError(f"scales must be positive sizes, got {self.scales!r}")
        if self.max_size <= 0:
            raise ValueError(f"max_size must be positive, got {self.max_size!r}")
        if any(s <= 0 for s in self.pixel_stds):
            raise ValueError(f"pixel_stds must be positive, got {self.pixel_stds!r}")
        if self.scale_sampling not in ("choice", "range") or (
                self.scale_sampling == "range" and (len(self.scales) != 2 or self.scales[0] > self.scales[1])):
            raise ValueError(f"scale_sampling {self.scale_sampling!r} with scales {self.scales!r}: 'choice', or "
                             "'range' with (lo, hi)")
        if self.detectron2 and self.aspect_cropping:
            raise ValueError("TRAIN.ASPECT_CROPPING (Detectron.pytorch's) is not available in detectron2 mode "
                             "(MODEL.CONVENTIONS 'detectron2')")

    @property
    def means(self) -> np.ndarray:
        return np.asarray(self.pixel_means, dtype=np.float32).reshape(3)

    @property
    def stds(self) -> np.ndarray:
        return np.asarray(self.pixel_stds, dtype=np.float32).reshape(3)

    @classmethod
    def from_cfg(cls, cfg, train: bool) -> BlobSettings:
        """TRAIN.SCALES/MAX_SIZE (+ aspect cropping) or TEST.SCALE/MAX_SIZE, PIXEL_MEANS/STDS,
        MODEL.INPUT_COLOR_ORDER, FPN.COARSEST_STRIDE when FPN.FPN_ON (Detectron pads only then, detectron2's C4
        body has no size divisibility either) and MODEL.CONVENTIONS."""
        order = str(cfg.MODEL.INPUT_COLOR_ORDER).upper()
        if order not in ("BGR", "RGB"):
            raise ValueError(f"MODEL.INPUT_COLOR_ORDER must be 'BGR' or 'RGB', got {order!r}")
        common = dict(
            pixel_means=tuple(float(v) for v in np.asarray(cfg.PIXEL_MEANS).reshape(3)),
            pixel_stds=tuple(float(v) for v in np.asarray(cfg.PIXEL_STDS).reshape(3)),
            to_rgb=order == "RGB",
            stride=int(cfg.FPN.COARSEST_STRIDE) if cfg.FPN.FPN_ON else 0,
            detectron2=cfg.MODEL.CONVENTIONS == "detectron2",
        )
        if not train:
            return cls(scales=(int(cfg.TEST.SCALE),), max_size=int(cfg.TEST.MAX_SIZE), **common)
        return cls(
            scales=tuple(int(s) for s in cfg.TRAIN.SCALES),
            max_size=int(cfg.TRAIN.MAX_SIZE),
            aspect_cropping=bool(cfg.TRAIN.ASPECT_CROPPING),
            aspect_lo=float(cfg.TRAIN.ASPECT_LO),
            aspect_hi=float(cfg.TRAIN.ASPECT_HI),
            scale_sampling=str(cfg.TRAIN.SCALE_SAMPLING),
            **common,
        )


@dataclass
class Sample:
    """One processed training image: normalised (h, w, 3) float32 pixels, its scale, its scaled gt."""

    image: np.ndarray
    im_scale: float
    entry: dict


def prepare_sample(entry: dict, settings: BlobSettings, rng: np.random.Generator) -> Sample:
    """Read, flip (if the entry is flipped), normalise and scale one image to a random TRAIN.SCALES entry,
    with its gt moved to network-input coordinates (and aspect-cropped when enabled); in detectron2 mode as
    detectron2's DatasetMapper does (resize before normalising, flip after resizing)."""
    im = load_image(entry["image"], settings)
    if im.shape[:2] != (entry["height"], entry["width"]):
        raise ValueError(
            f"image file {entry['image']!r} is {im.shape[1]}x{im.shape[0]} but its annotation (image id "
            f"{entry['id']}) says {entry['width']}x{entry['height']}"
        )
    target = draw_scale(settings, rng)
    if settings.detectron2:
        resized, size_hw, im_scale = d2.prepare_image(im, target, settings.max_size, entry["flipped"])
        return Sample(normalize(resized, settings.means, settings.stds, settings.to_rgb), im_scale,
                      d2.scale_targets(entry, size_hw))
    if entry["flipped"]:
        im = im[:, ::-1]
    im, im_scale = prep_im_for_blob(im, settings.means, settings.stds, target, settings.max_size, settings.to_rgb)
    scaled = scale_targets(entry, im_scale, im.shape[:2])
    if settings.aspect_cropping:
        im, scaled = crop_to_aspect(im, scaled, settings.aspect_lo, settings.aspect_hi, rng)
    return Sample(im, im_scale, scaled)


def draw_scale(settings: BlobSettings, rng: np.random.Generator) -> int:
    """One image's training size: one of TRAIN.SCALES, or an integer in [lo, hi] (TRAIN.SCALE_SAMPLING 'range',
    detectron2's ResizeShortestEdge sample_style 'range')."""
    if settings.scale_sampling == "range":
        return int(rng.integers(settings.scales[0], settings.scales[1] + 1))
    return settings.scales[int(rng.integers(len(settings.scales)))]


def collate_samples(samples: Sequence[Sample], stride: int) -> dict:
    """Samples -> {'data': Tensor[N, 3, H, W], 'im_info': Tensor[N, 3], 'roidb': list of N dicts}.

    ``data`` is zero-padded to the largest image rounded up to ``stride``; ``im_info`` rows are the unpadded
    (height, width, im_scale) of each image. The roidb arrays stay numpy here (cheap to send from a worker
    process); ``roidb_to_tensors`` makes them tensors.
    """
    if not samples:
        raise ValueError("cannot build a minibatch from zero images")
    in_worker = torch.utils.data.get_worker_info() is not None
    blob = im_list_to_blob([s.image for s in samples], stride, shared=in_worker)
    im_info = np.array([[s.image.shape[0], s.image.shape[1], s.im_scale] for s in samples], dtype=np.float32)
    return {"data": blob, "im_info": torch.from_numpy(im_info),
            "roidb": [s.entry for s in samples]}


def roidb_to_tensors(batch: dict) -> dict:
    """The minibatch with each roidb entry's boxes / gt_classes / is_crowd / gt_keypoints / proposals as tensors."""
    roidb = []
    for entry in batch["roidb"]:
        out = dict(entry)
        out["boxes"] = torch.as_tensor(entry["boxes"], dtype=torch.float32)
        out["gt_classes"] = torch.as_tensor(entry["gt_classes"], dtype=torch.int64)
        out["is_crowd"] = torch.as_tensor(entry["is_crowd"], dtype=torch.bool)
        if entry["gt_keypoints"] is not None:
            out["gt_keypoints"] = torch.as_tensor(entry["gt_keypoints"], dtype=torch.float32)
        if entry.get("proposals") is not None:
            out["proposals"] = torch.as_tensor(entry["proposals"], dtype=torch.float32)
        roidb.append(out)
    return dict(batch, roidb=roidb)


def get_minibatch(entries: Sequence[dict], settings: BlobSettings, rng: np.random.Generator) -> dict:
    """The minibatch dict of ``entries`` (Detectron's get_minibatch), built in this process."""
    return roidb_to_tensors(collate_samples([prepare_sample(e, settings, rng) for e in entries], settings.stride))


def load_image(path: str, settings: BlobSettings) -> np.ndarray:
    """(H, W, 3) uint8 BGR image: cv2.imread (Detectron), or PIL with EXIF orientation (detectron2 mode)."""
    return d2.read_image_pil(path) if settings.detectron2 else read_image(path)


def prepare_test_image(im: np.ndarray, settings: BlobSettings) -> Tuple[torch.Tensor, float]:
    """A BGR uint8 (H, W, 3) image -> (Tensor[1, 3, H', W'] network input, im_scale) at TEST.SCALE.

    The unpadded scaled size, for im_info, is ``input_size(H, W, im_scale, settings)``.
    """
    if im.ndim != 3 or im.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) BGR image, got shape {tuple(im.shape)}")
    if settings.detectron2:
        resized, _, im_scale = d2.prepare_image(im, settings.scales[0], settings.max_size)
        processed = normalize(resized, settings.means, settings.stds, settings.to_rgb)
    else:
        processed, im_scale = prep_im_for_blob(
            im, settings.means, settings.stds, settings.scales[0], settings.max_size, settings.to_rgb
        )
    return im_list_to_blob([processed], settings.stride), im_scale


def scaled_size(height: int, width: int, im_scale: float) -> Tuple[int, int]:
    """The (height, width) cv2.resize produces for scale factor ``im_scale`` (rounded to nearest)."""
    return int(round(height * im_scale)), int(round(width * im_scale))


def input_size(height: int, width: int, im_scale: float, settings: BlobSettings) -> Tuple[int, int]:
    """The unpadded network-input (height, width) ``prepare_test_image`` made of an (height, width) image:
    detectron2's ResizeShortestEdge output size in detectron2 mode, else ``scaled_size``."""
    if settings.detectron2:
        return d2.resize_output_shape(height, width, settings.scales[0], settings.max_size)
    return scaled_size(height, width, im_scale)


def split_per_device(batch: dict, num_devices: int, stride: int) -> List[dict]:
    """One minibatch -> ``num_devices`` minibatches of consecutive images for a DataParallel.

    Each part's ``data`` is cut from the shared blob to its own largest image rounded up to ``stride`` (so
    images of different sizes on different devices do not carry each other's padding). Part sizes differ by at
    most one image.
    """
    n = batch["data"].shape[0]
    if not 1 <= num_devices <= n:
        raise ValueError(f"cannot split a minibatch of {n} images over {num_devices} devices")
    parts = []
    for idx in np.array_split(np.arange(n), num_devices):
        lo, hi = int(idx[0]), int(idx[-1]) + 1
        info = batch["im_info"][lo:hi]
        height, width = padded_size(int(info[:, 0].max()), int(info[:, 1].max()), stride)
        parts.append({
            "data": batch["data"][lo:hi, :, :height, :width].contiguous(),
            "im_info": info.clone(),
            "roidb": batch["roidb"][lo:hi],
        })
    return parts
