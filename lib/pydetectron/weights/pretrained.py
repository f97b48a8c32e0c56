"""`load_pretrained`: every weights file, any format, into a detector or a body, faithfully or not at all.

Semantics: a weights file is loaded as the network it is. The only transformations are
(a) the exact batch-norm fold ``s = gamma / sqrt(var + eps)``, ``b = beta - mean * s`` when the target layer is
    a frozen AffineChannel and the file has statistics (BN, SyncBN and GN targets receive the file's own
    statistics and affine parameters, unfolded, so a trainable norm starts from the pretrained function;
    a BN target fed from a folded Detectron file gets mean 0, variance ``1 - eps``: the same function), and
(b) reversing conv1's input channels when the file's channel order is known (Detectron ``.pkl``: BGR;
    detectron2 files from ``convert-torchvision-to-d2.py``: RGB; our own files: their cfg's) and differs
    from ``MODEL.INPUT_COLOR_ORDER``.
Nothing rescales conv1: ``PIXEL_MEANS``, ``PIXEL_STDS``, ``MODEL.INPUT_COLOR_ORDER`` and ``RESNETS.STRIDE_1X1``
describe the input the backbone was trained on, and the loaded body computes what the source network
computes on that input. torchvision-layout and most detectron2-layout files do not say their input
(torchvision's RGB models and Detectron.pytorch's BGR Caffe ``resnet50_caffe.pth`` share key names): they
load as they are and the cfg states the source's input (``tools/convert_weights.py inspect`` lists the lines).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from torch import nn

from pydetectron.weights.class_layout import adapt_to_model
from pydetectron.weights.describe import backbone_facts
from pydetectron.weights.detectron2 import FIXED_UPSAMPLE_BLOBS
from pydetectron.weights.detectron_pkl import (
    LoadReport,
    ShapeMismatchError,
    load_detectron_weights,
    model_weight_mapping,
)
from pydetectron.weights.formats import WeightFile, read_weights

REPORT_FILE = "weights_report.txt"
_BODY_BLOB = re.compile(r"^(conv1|res_conv1|res\d+_\d+)_")
_SHOWN = 5


class WeightMismatchError(ValueError):
    """The weights do not fit the model; the message names the file, its format and the offending names."""


def _first(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_SHOWN])
    return shown + (f", ... ({len(names)} in all)" if len(names) > _SHOWN else "")


def _listing(title: str, names: Sequence[str]) -> str:
    return f"  {title} ({len(names)}): " + ", ".join(names) if names else ""


def _class_hint(blobs, num_classes: int | None) -> str:
    value = blobs.get("cls_score_w")
    file_classes = int(np.shape(value)[0]) if value is not None else None
    if file_classes is None or num_classes is None or file_classes == num_classes:
        return ""
    return (f"the weights were trained for {file_classes} classes (with background) but MODEL.NUM_CLASSES is "
            f"{num_classes}: pass the matching --dataset or --set MODEL.NUM_CLASSES {file_classes}")


def _model_keys_of(model: nn.Module) -> dict:
    """``{blob: the model's first state_dict key loading it}``."""
    keys: dict = {}
    for key, blob in model_weight_mapping(model).items():
        if blob:
            keys.setdefault(blob, key)
    return keys


def _strict_failure(weights: WeightFile, report: LoadReport, model: nn.Module, shapes: Sequence[str],
                    hint: str) -> WeightMismatchError:
    """Inference-time mismatch: every missing, unused and mis-shaped name, in the file's names."""
    keys = _model_keys_of(model)
    missing = [weights.file_name(b, keys.get(b)) for b in report.missing]
    missing += [f"{k} (model tensor with no Detectron blob)" for k in report.unmapped]
    unused = [weights.file_name(b) for b in report.unused] + [f"{k} (names no tensor)" for k in weights.left_out]
    lines = [f"weights {weights.path} ({weights.description}) do not match the model built from the cfg:"]
    lines += [line for line in (_listing("missing in the weights", missing),
                                _listing("unexpected (not in the model)", unused),
                                _listing("shape differs", shapes)) if line]
    if hint:
        lines.append(f"  {hint}")
    return WeightMismatchError("\n".join(lines))


def _in_order(names: Sequence[str], order: Sequence[str]) -> list:
    """`names` in the order they have in `order` (the network's), so 'the first' is the shallowest."""
    rank = {name: i for i, name in enumerate(order)}
    return sorted(names, key=lambda name: rank.get(name, len(rank)))


def _training_failure(weights: WeightFile, report: LoadReport, model: nn.Module, blobs) -> WeightMismatchError | None:
    """Fine-tuning: the backbone must come whole from the file, and the file's backbone must fit it whole."""
    keys = _model_keys_of(model)
    missing_body = _in_order([b for b in report.missing if _BODY_BLOB.match(b)], list(keys))
    unused_body = _in_order([b for b in report.unused if _BODY_BLOB.match(b)], list(blobs))
    if report.loaded and not missing_body and not unused_body:
        return None
    what = "matches none of the model's tensors" if not report.loaded else "matches only part of the backbone"
    lines = [f"{weights.path} ({weights.description}) {what}; refusing to train from a partly random backbone."]
    if missing_body or not report.loaded:
        names = [weights.file_name(b, keys.get(b)) for b in (missing_body or report.missing)]
        lines.append(f"  missing from the file ({len(names)}): {_first(names)}")
    if unused_body or not report.loaded:
        names = [weights.file_name(b) for b in (unused_body or report.unused)]
        lines.append(f"  in the file but not in the model ({len(names)}): {_first(names)}")
    state = model.state_dict()
    file_facts, model_facts = backbone_facts(blobs), backbone_facts({b: state[k] for b, k in keys.items()})
    if file_facts is not None and model_facts is not None:
        lines.append(f"  the file holds a {file_facts}; the cfg builds a {model_facts} (check MODEL.CONV_BODY, "
                     "RESNETS.TRANS_FUNC / NUM_GROUPS / WIDTH_PER_GROUP / NORM)")
    elif file_facts is None:
        lines.append("  the file holds no ResNet body (no 'res<stage>_<block>_branch*' tensors)")
    return WeightMismatchError("\n".join(lines))


def describe_load(weights: WeightFile, report: LoadReport, input_order: str, notes: Sequence[str] = ()) -> str:
    """The report printed after loading and written to the run's output folder (`notes`: class-layout changes,
    kept fixed kernels)."""
    if weights.color_order is None:
        order = ("the file does not say its input colour order: conv1 is taken as it is (MODEL.INPUT_COLOR_ORDER, "
                 "PIXEL_MEANS and PIXEL_STDS must describe the source's input)")
    elif weights.color_order != input_order:
        order = f"conv1 input channels reversed: file {weights.color_order} -> model {input_order}"
    else:
        order = f"file and model both {input_order}"
    lines = [f"Loaded {weights.path} ({weights.description}): {report.summary()}", f"  colour order: {order}"]
    lines += [f"  {line}" for line in notes]
    if weights.left_out:
        lines.append(f"  left out (not this network: other networks or heads in the file) "
                     f"({len(weights.left_out)}): {_first(weights.left_out)}")
    for title, names in (("unused", [weights.file_name(b) for b in report.unused]),
                         ("not in the file, kept at their initialisation", report.missing),
                         ("unmapped model tensors", report.unmapped)):
        if names:
            lines.append(f"  {title} ({len(names)}): {_first(names)}")
    lines += [f"  skipped: {line}" for line in report.skipped]
    return "\n".join(lines)


def load_pretrained(
    model: nn.Module,
    path: str | os.PathLike,
    cfg,
    *,
    training: bool = True,
    output_dir: str | os.PathLike | None = None,
    print_fn: Callable[[str], None] = print,
    part: str | None = None,
) -> LoadReport:
    """Load the weights file at `path` (any format, recognised by content: see ``weights.formats``) into
    `model` (a detector, or a body from ``registry.build("body", ...)``) with the module docstring's semantics.

    `training`: a fine-tuning start. The backbone must come whole from the file and the file's backbone must
    fit it (else :class:`WeightMismatchError` naming the file, its format and the first missing and unused
    names); heads the file lacks keep their initialisation, class-count layers of another size are skipped
    with a message. Otherwise (testing) every tensor must load and every entry be used, with the same shapes.
    A shape mismatch names the blob. The file's class layout (background first or last, background box / mask
    rows) is changed to each head's own (``weights.class_layout``). The report is printed and, with
    `output_dir`, appended to ``<output_dir>/weights_report.txt``. Reads ``MODEL.INPUT_COLOR_ORDER`` and
    ``MODEL.NUM_CLASSES``. `part` ('teacher' | 'student') loads that part of a merged teacher + student file (a
    distillation run); then nothing of the part may be left unused, in training too.
    """
    weights = read_weights(path, part)
    blobs, notes = adapt_to_model(model, model_weight_mapping(model), weights.blobs_for(model), weights.class_layout)
    notes = [f"class layout: {line}" for line in notes]
    input_order = cfg.MODEL.INPUT_COLOR_ORDER
    num_classes = int(cfg.MODEL.NUM_CLASSES)
    hint = _class_hint(blobs, num_classes)
    try:
        report = load_detectron_weights(model, blobs, allow_skip_class_layers=training, num_classes=num_classes,
                                        input_order=input_order, file_order=weights.color_order)
    except ShapeMismatchError as err:
        if training:
            raise WeightMismatchError(f"{weights.path} ({weights.description}): {err}") from None
        raise _strict_failure(weights, err.report, model, err.mismatches, hint) from None
    if weights.format == "detectron2":  # Detectron heads' fixed up-sampling kernels: detectron2 interpolates
        fixed = [b for b in report.missing if FIXED_UPSAMPLE_BLOBS.match(b)]
        report.missing = [b for b in report.missing if b not in fixed]
        notes += [f"{b}: a fixed bilinear kernel detectron2 files do not hold, kept as built" for b in fixed]
    if training:
        failure = _training_failure(weights, report, model, blobs)
        if failure is None and part is not None and report.unused:
            failure = WeightMismatchError(
                f"{weights.path} ({weights.description}) has tensors the {part} model does not use ("
                f"{len(report.unused)}): {_first([weights.file_name(b) for b in report.unused])}; the {part} "
                "cfg does not build the network this part was merged from")
    elif report.missing or report.unused or report.unmapped or weights.left_out:
        failure = _strict_failure(weights, report, model, [], hint)
    else:
        failure = None
    if failure is not None:
        raise failure
    text = describe_load(weights, report, input_order, notes)
    print_fn(text)
    if output_dir is not None:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        with open(Path(output_dir) / REPORT_FILE, "a") as f:
            f.write(text + "\n")
    return report

