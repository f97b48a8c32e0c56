"""Pictures a person would rather see than read: detections (as Detectron's vis.py draws them) and curves.

Drawn with OpenCV only. Detections are drawn largest first so small objects stay visible; each instance
gets a colour from a fixed palette; masks are blended at 40 % with a white contour, boxes and labels are
green like Detectron's, keypoint skeletons use one colour per limb.
"""

from __future__ import annotations

import colorsys
from pathlib import Path
from typing import Mapping, Sequence

import cv2
import numpy as np
import torch

from pydetectron.engine.logger import sum_fpn_levels

Series = Mapping[str, Sequence[tuple[float, float]]]  # name -> (x, y) points

_GREEN = (18, 127, 15)  # BGR, Detectron's box / label colour
_WHITE = (255, 255, 255)
_TEXT = (218, 227, 218)


def palette(n: int) -> list[tuple[int, int, int]]:
    """`n` well-separated BGR colours (golden-ratio hue steps), the same on every call."""
    colours = []
    for i in range(n):
        r, g, b = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.75, 0.95)
        colours.append((int(b * 255), int(g * 255), int(r * 255)))
    return colours


def _numpy(value) -> np.ndarray | None:
    if value is None:
        return None
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def draw_mask(image: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int], alpha: float = 0.4) -> None:
    """Blend `colour` into `image` (in place) where `mask` is set, and outline it in white."""
    region = mask.astype(bool)
    image[region] = (image[region] * (1 - alpha) + np.array(colour) * alpha).astype(np.uint8)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(image, contours, -1, _WHITE, 1, cv2.LINE_AA)


def draw_label(image: np.ndarray, x: int, y: int, text: str, font_scale: float = 0.4) -> None:
    """Text on a filled green box whose lower-left corner is at (x, y), kept inside the image."""
    font = cv2.FONT_HERSHEY_SIMPLEX
    (w, h), _ = cv2.getTextSize(text, font, font_scale, 1)
    y = max(y, int(1.3 * h))
    cv2.rectangle(image, (x, y - int(1.3 * h)), (x + w, y), _GREEN, -1)
    cv2.putText(image, text, (x, y - int(0.3 * h)), font, font_scale, _TEXT, 1, cv2.LINE_AA)


def draw_keypoints(
    image: np.ndarray,
    keypoints: np.ndarray,
    skeleton: Sequence[Sequence[int]],
    kp_thresh: float,
    alpha: float = 0.7,
) -> None:
    """Skeleton lines and joints of one instance; `keypoints` is (K, 3) = (x, y, score), skeleton 1-based pairs
    (COCO's convention). Joints scoring below `kp_thresh` are left out."""
    overlay = image.copy()
    colours = palette(max(len(skeleton), 1))
    visible = keypoints[:, 2] > kp_thresh
    points = [(int(round(x)), int(round(y))) for x, y in keypoints[:, :2]]
    for colour, (a, b) in zip(colours, skeleton):
        a, b = a - 1, b - 1
        if visible[a] and visible[b]:
            cv2.line(overlay, points[a], points[b], colour, 2, cv2.LINE_AA)
    for k in np.flatnonzero(visible):
        cv2.circle(overlay, points[k], 3, colours[k % len(colours)], -1, cv2.LINE_AA)
    cv2.addWeighted(overlay, alpha, image, 1 - alpha, 0, dst=image)


def draw_detections(
    image: np.ndarray,
    detections: Mapping[str, object],
    class_names: Sequence[str],
    thresh: float = 0.7,
    kp_thresh: float = 2.0,
    skeleton: Sequence[Sequence[int]] = (),
) -> np.ndarray:
    """A copy of the BGR `image` with every detection scoring >= `thresh` drawn on it.

    `detections` is the detector's per-image output: boxes (D, 4) inclusive xyxy in image pixels, scores
    (D,), classes (D,) contiguous ids (index into `class_names`, 0 = background), optional masks (D, H, W)
    and keypoints (D, K, 3).
    """
    canvas = image.copy()
    boxes = _numpy(detections["boxes"]).reshape(-1, 4)
    scores = _numpy(detections["scores"])
    classes = _numpy(detections["classes"])
    masks = _numpy(detections.get("masks"))
    keypoints = _numpy(detections.get("keypoints"))
    areas = (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)
    shown = [i for i in np.argsort(-areas) if scores[i] >= thresh]
    colours = palette(max(len(shown), 1))
    for colour, i in zip(colours, shown):
        x1, y1, x2, y2 = (int(round(v)) for v in boxes[i])
        if masks is not None:
            draw_mask(canvas, masks[i], colour)
        cv2.rectangle(canvas, (x1, y1), (x2, y2), _GREEN, 1)
        name = class_names[classes[i]] if classes[i] < len(class_names) else f"class {classes[i]}"
        draw_label(canvas, x1, y1 - 2, f"{name} {scores[i]:.2f}")
        if keypoints is not None:
            draw_keypoints(canvas, keypoints[i], skeleton, kp_thresh)
    return canvas


def save_image(image: np.ndarray, path: str | Path) -> None:
    """Write a BGR image as jpg/png (OpenCV) or pdf (Pillow), chosen by the suffix."""
    path = Path(path)
    if path.suffix.lower() == ".pdf":
        from PIL import Image

        Image.fromarray(cv2.cvtColor(image, cv2.COLOR_BGR2RGB)).save(path, "PDF", resolution=100.0)
    elif not cv2.imwrite(str(path), image):
        raise OSError(f"could not write image {path}")


def draw_curves(
    series: Series,
    title: str,
    size: tuple[int, int] = (900, 500),
    max_marked: int = 30,
) -> np.ndarray:
    """A line chart (BGR image) of named (x, y) series, e.g. each loss against the step; a series of at most
    `max_marked` points also gets a dot at each point and its last value in the legend."""
    width, height = size
    left, right, top, bottom = 70, 170, 40, 40
    canvas = np.full((height, width, 3), 255, np.uint8)
    points = [p for values in series.values() for p in values]
    if not points:
        draw_label(canvas, left, top, f"{title}: nothing to plot")
        return canvas
    xs, ys = np.array([p[0] for p in points], float), np.array([p[1] for p in points], float)
    x_lo, x_hi = xs.min(), xs.max()
    if x_hi == x_lo:  # one step (e.g. a single evaluation): centre it in a range with distinct whole ticks
        pad = 2 * max(round(abs(x_lo) * 0.025), 1)
        x_lo, x_hi = x_lo - pad, x_hi + pad
    y_lo, y_hi = min(ys.min(), 0.0), max(ys.max(), 0.0)
    if y_hi == y_lo:  # all zero (an untrained model's AP): a unit range rather than a sliver
        y_hi = y_lo + 1.0

    def to_pixel(x: float, y: float) -> tuple[int, int]:
        px = left + (x - x_lo) / (x_hi - x_lo) * (width - left - right)
        py = height - bottom - (y - y_lo) / (y_hi - y_lo) * (height - top - bottom)
        return int(px), int(py)

    cv2.rectangle(canvas, (left, top), (width - right, height - bottom), (0, 0, 0), 1)
    font = cv2.FONT_HERSHEY_SIMPLEX
    for frac in np.linspace(0, 1, 5):
        y_value = y_lo + frac * (y_hi - y_lo)
        _, py = to_pixel(x_lo, y_value)
        cv2.line(canvas, (left, py), (width - right, py), (225, 225, 225), 1)
        cv2.putText(canvas, f"{y_value:.3g}", (5, py + 4), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
        x_value = x_lo + frac * (x_hi - x_lo)
        px, _ = to_pixel(x_value, y_lo)
        cv2.putText(canvas, f"{x_value:.6g}", (px - 10, height - bottom + 18), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(canvas, title, (left, top - 12), font, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
    for k, (colour, (name, values)) in enumerate(zip(palette(len(series)), series.items())):
        line = np.array([to_pixel(x, y) for x, y in values], np.int32).reshape(-1, 2)
        cv2.polylines(canvas, [line], False, colour, 2, cv2.LINE_AA)
        label = name
        if 0 < len(values) <= max_marked:  # sparse series (evaluations) show each point, even a lone one
            for point in line:
                cv2.circle(canvas, tuple(int(v) for v in point), 4, colour, -1, cv2.LINE_AA)
            label = f"{name} {values[-1][1]:.3g}"
        legend_y = top + 18 * (k + 1)
        cv2.line(canvas, (width - right + 10, legend_y - 4), (width - right + 30, legend_y - 4), colour, 2)
        cv2.putText(canvas, label, (width - right + 35, legend_y), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    return canvas


def training_curve_panels(records: Sequence[Mapping[str, float]]) -> list[tuple[str, Series]]:
    """(title, series) of each panel for metrics.json records: losses, training accuracy (when logged), the
    learning rate and evaluation figures (when any). Per-FPN-level losses (loss_rpn_cls_fpn2..6) are summed, as
    the console line shows them; metrics.json keeps the levels."""
    steps = [r for r in records if "lr" in r]

    def series(prefix: str) -> dict:
        summed = [(r["step"], sum_fpn_levels({k: v for k, v in r.items() if k.startswith(prefix)})) for r in steps]
        names = list(summed[0][1]) if summed else []
        return {name: [(step, values[name]) for step, values in summed if name in values] for name in names}

    evals = {k: [(r["step"], r[k]) for r in records if k in r]
             for k in sorted({k for r in records for k in r if k.startswith("eval/")})}
    panels = [("training losses", series("loss")), ("training accuracy", series("accuracy")),
              ("learning rate", {"lr": [(r["step"], r["lr"]) for r in steps]}), ("evaluation", evals)]
    return [(title, values) for title, values in panels if values or title in ("training losses", "learning rate")]


def draw_training_curves(records: Sequence[Mapping[str, float]], path: str | Path) -> None:
    """The panels of `training_curve_panels`, stacked into one image at `path`."""
    save_image(np.vstack([draw_curves(series, title) for title, series in training_curve_panels(records)]), path)
