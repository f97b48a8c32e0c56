"""detectron2 as a peer to compare against: its models built, randomised reproducibly, saved and run.

detectron2 is never a dependency: everything here imports it on first use and fails with
:class:`Detectron2Missing` naming how to build it. Used by ``tools/compare_detectron2.py``,
``tools/benchmark_detectron2.py`` and ``tests/detectron2_peer/``.

Random weights lie (../shared/BENCHMARKING.md): a freshly initialised detector has frozen norms at identity and
a classifier that scores every proposal as background, so it detects nothing and its heads do no work.
:func:`random_d2_model` draws every tensor from a seeded generator (FrozenBN statistics included, so the
BN fold is exercised) and :func:`calibrate_d2_model` then sets each frozen norm's statistics to those of its
input on the given images, so that it standardises them before its (random) affine map (conv weights
untouched), and biases the box classifier towards the foreground so that detections exist.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence

import numpy as np
import torch
from torch import nn

BUILD_HINT = ("detectron2 is not importable: build it CPU-only from its source "
              "(FORCE_CUDA=0 pip install --no-build-isolation -e <detectron2 clone>; ~15 minutes on 2 cores)")


class Detectron2Missing(RuntimeError):
    """detectron2 is needed for this and is not installed."""


def require_detectron2() -> Any:
    """The ``detectron2`` module, or :class:`Detectron2Missing` saying how to get it."""
    try:
        import detectron2
    except ImportError as err:
        raise Detectron2Missing(f"{BUILD_HINT} ({err})") from None
    return detectron2


def d2_config_file(name: str) -> str:
    """A config path: `name` itself when it is a file, else a detectron2 model-zoo config name
    (``COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml``) found in detectron2's install or source tree."""
    if os.path.isfile(name):
        return name
    root = Path(require_detectron2().__file__).parent
    for base in (root / "model_zoo" / "configs", root.parent / "configs"):
        if (base / name).is_file():
            return str(base / name)
    raise FileNotFoundError(f"{name}: neither a file nor a detectron2 model-zoo config under {root}")


def d2_cfg(config_file: str, opts: Sequence[str] = ()) -> Any:
    """detectron2's frozen cfg of `config_file` with `opts` (d2 key names), on the CPU."""
    require_detectron2()
    from detectron2.config import get_cfg

    cfg = get_cfg()
    cfg.merge_from_file(d2_config_file(config_file))
    cfg.merge_from_list(list(opts))
    cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    return cfg


def build_d2_model(cfg: Any) -> nn.Module:
    """detectron2's model of `cfg`, in eval mode."""
    require_detectron2()
    from detectron2.modeling import build_model

    return build_model(cfg).eval()


def randomize_d2_model(model: nn.Module, seed: int) -> nn.Module:
    """Every floating tensor of `model` (FrozenBN buffers included) drawn from a generator seeded `seed`:
    weights keep their init's scale (std of the tensor, else 0.01), norm scales in [0.5, 1.5], running
    variances in [0.5, 2]."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if not value.dtype.is_floating_point or value.numel() == 0:
                continue
            if key.endswith("running_var"):
                new = torch.rand(value.shape, generator=gen) * 1.5 + 0.5
            elif value.dim() == 1 and key.endswith(".weight"):  # a norm's scale
                new = torch.rand(value.shape, generator=gen) + 0.5
            else:
                scale = float(value.std()) if value.numel() > 1 and float(value.std()) > 0 else 0.01
                new = torch.randn(value.shape, generator=gen) * scale
            value.copy_(new)
    return model


def random_d2_model(cfg: Any, seed: int) -> nn.Module:
    """detectron2's model of `cfg` randomised from `seed` (:func:`randomize_d2_model`), the same on every call:
    it is built under a CPU generator seeded `seed` too, since the randomised weights keep the scale of its
    initial draw (the caller's global generator is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_d2_model(cfg)
    return randomize_d2_model(model, seed)


def calibrate_frozen_norms(model: nn.Module, run: Callable[[], Any]) -> int:
    """Set the statistics of every frozen batch norm of `model` (detectron2's or torchvision's
    ``FrozenBatchNorm2d``: buffers ``running_mean`` / ``running_var``) to those of its input while `run()`
    passes the images through once: a pre-hook sets each norm just before it runs, so deeper norms see
    calibrated inputs. Affine weights untouched. Returns the number of norms calibrated."""
    norms = [m for m in model.modules() if type(m).__name__ == "FrozenBatchNorm2d"]
    done: set = set()

    def hook(norm, args):
        if id(norm) in done:
            return
        x = args[0].detach().transpose(0, 1).flatten(1).double()
        norm.running_mean.copy_(x.mean(1).float())
        norm.running_var.copy_(x.var(1).float().clamp_min(1e-3))
        done.add(id(norm))

    handles = [norm.register_forward_pre_hook(hook) for norm in norms]
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return len(done)


def d2_inputs(images: Sequence[np.ndarray]) -> List[Dict[str, Any]]:
    """detectron2's model inputs of BGR uint8 ``(H, W, 3)`` images at their own size."""
    return [{"image": torch.as_tensor(np.ascontiguousarray(im.transpose(2, 0, 1))).float(),
             "height": im.shape[0], "width": im.shape[1]} for im in images]


def calibrate_d2_model(model: nn.Module, images: Sequence[np.ndarray], foreground_bias: float = 4.0) -> int:
    """Make a randomised detectron2 detector behave like a trained one on `images` (BGR uint8 ``(H, W, 3)``):
    its backbone's frozen norms calibrated on them (:func:`calibrate_frozen_norms`), and `foreground_bias` added
    to the foreground logits of the box classifier (d2's background is its last class) so that proposals score
    as objects. Returns the number of norms calibrated."""
    require_detectron2()
    inputs = d2_inputs(images)
    count = calibrate_frozen_norms(model, lambda: model.backbone(model.preprocess_image(inputs).tensor))
    predictor = getattr(getattr(model, "roi_heads", None), "box_predictor", None)
    if predictor is not None:
        with torch.no_grad():
            predictor.cls_score.bias[:-1] += foreground_bias
    return count


def save_d2_checkpoint(model: nn.Module, folder: str | os.PathLike, name: str = "model_final") -> str:
    """`model` saved by detectron2's own DetectionCheckpointer (``<folder>/<name>.pth``: ``{'model': ...}``)."""
    require_detectron2()
    from detectron2.checkpoint import DetectionCheckpointer

    os.makedirs(folder, exist_ok=True)
    DetectionCheckpointer(model, save_dir=str(folder)).save(name)
    return os.path.join(str(folder), f"{name}.pth")


def load_d2_checkpoint(model: nn.Module, path: str | os.PathLike) -> Any:
    """Load `path` into `model` with detectron2's DetectionCheckpointer, as ``MODEL.WEIGHTS`` does; returns its
    incompatible keys (``missing_keys``, ``unexpected_keys``, ``incorrect_shapes``)."""
    require_detectron2()
    from detectron2.checkpoint import DetectionCheckpointer

    found: Dict[str, Any] = {}

    class Recording(DetectionCheckpointer):
        def _load_model(self, checkpoint):
            found["incompatible"] = super()._load_model(checkpoint)
            return found["incompatible"]

    Recording(model).load(str(path))
    return found["incompatible"]


def frozen_bn_affine(state: Dict[str, torch.Tensor], eps: float = 1e-5) -> Dict[str, torch.Tensor]:
    """A detectron2 state dict with every FrozenBN (``*.norm`` with running statistics) replaced by the affine
    map it computes (``<norm>.scale`` / ``<norm>.shift``), so two files holding the same function compare equal."""
    out = dict(state)
    for key in [k for k in state if k.endswith(".running_mean")]:
        norm = key[: -len(".running_mean")]
        scale = state[f"{norm}.weight"].double() / torch.sqrt(state[f"{norm}.running_var"].double() + eps)
        out[f"{norm}.scale"] = scale
        out[f"{norm}.shift"] = state[f"{norm}.bias"].double() - state[key].double() * scale
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            del out[f"{norm}.{leaf}"]
    return out


def instances_to_detections(instances: Any) -> Dict[str, np.ndarray]:
    """detectron2 ``Instances`` as our detections dict (ARCHITECTURE.md "Detector outputs"): ``classes`` are
    our contiguous ids (detectron2's + 1, since ours count the background as 0)."""
    instances = instances.to("cpu")
    out = {"boxes": instances.pred_boxes.tensor.numpy(), "scores": instances.scores.numpy(),
           "classes": instances.pred_classes.numpy() + 1}
    if instances.has("pred_masks"):
        out["masks"] = instances.pred_masks.numpy().astype(np.uint8)
    if instances.has("pred_keypoints"):
        out["keypoints"] = instances.pred_keypoints.numpy()
    if instances.has("pred_keypoint_heatmaps"):  # (D, K, S, S) logits: lets a comparison see tied maxima
        out["keypoint_heatmaps"] = instances.pred_keypoint_heatmaps.numpy()
    return out


def d2_predictions(cfg: Any, weights: str, images: Sequence[np.ndarray]) -> List[Dict[str, np.ndarray]]:
    """detectron2's DefaultPredictor (its test-time resize, input format, weights through DetectionCheckpointer)
    on each BGR uint8 image, as our detections dicts."""
    require_detectron2()
    from detectron2.engine import DefaultPredictor

    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.WEIGHTS = str(weights)
    cfg.freeze()
    predictor = DefaultPredictor(cfg)
    return [instances_to_detections(predictor(image)["instances"]) for image in images]


def generated_images(count: int, height: int, width: int, seed: int = 0) -> List[np.ndarray]:
    """`count` reproducible BGR uint8 test images: a smooth background with filled rectangles and ellipses of
    random colours, so that there are edges and objects at several sizes."""
    rng = np.random.default_rng(seed)
    images = []
    yy, xx = np.mgrid[0:height, 0:width]
    for _ in range(count):
        base = rng.uniform(40, 200, 3)
        image = base + 30 * np.sin(xx[..., None] / rng.uniform(20, 60) + rng.uniform(0, 6, 3))
        for _ in range(rng.integers(3, 8)):
            h, w = rng.uniform(0.1, 0.5) * height, rng.uniform(0.1, 0.5) * width
            cy, cx = rng.uniform(0, height), rng.uniform(0, width)
            inside = (np.abs(yy - cy) < h / 2) & (np.abs(xx - cx) < w / 2)
            if rng.random() < 0.5:
                inside = ((yy - cy) / (h / 2)) ** 2 + ((xx - cx) / (w / 2)) ** 2 < 1
            image[inside] = rng.uniform(0, 255, 3)
        images.append(np.clip(image + rng.normal(0, 4, image.shape), 0, 255).astype(np.uint8))
    return images
