"""What ``tools/convert_weights.py`` does: convert between formats, merge / split teacher and student, inspect.

A conversion loads the file into a model of its own architecture (the detector of its cfg when it carries
one, else a ResNet body shaped like its tensors) exactly as it is, and writes that model out. Values are
never recomputed, so ours -> Detectron / detectron2 names -> ours is bit-exact. Detectron files are BGR by
definition: writing one from a file whose channel order is unknown needs ``input_order``.
"""

from __future__ import annotations

import copy
import os
from dataclasses import asdict
from typing import Any, Dict, List, Mapping, Tuple

import numpy as np
import torch
from torch import nn

from pydetectron.config import get_cfg
from pydetectron.config.merge import ConfigError, load_yaml, merge_cfg_from_str
from pydetectron.modeling.backbones import ResNet
from pydetectron.modeling.layers import NormSpec
from pydetectron.weights.class_layout import blobs_in_layout
from pydetectron.weights.describe import BackboneFacts, architecture_lines, backbone_facts, input_lines
from pydetectron.weights.detectron2 import (
    FIXED_UPSAMPLE_BLOBS,
    blobs_to_detectron2,
    blobs_to_detectron2_detector,
    detector_names_of_blobs,
)
from pydetectron.weights.detectron_pkl import (
    check_color_order,
    detectron_blobs,
    model_weight_mapping,
    save_detectron_weights,
)
from pydetectron.weights.files import write_object
from pydetectron.weights.formats import MERGED_PARTS, METADATA_KEY, WeightFile, has_heads, merged_part, read_weights
from pydetectron.weights.pretrained import load_pretrained

TARGETS = ("pydetectron", "detectron", "detectron2")
PARTS = tuple(MERGED_PARTS)
_D2_BODY_PREFIX = "backbone.bottom_up."  # where MGD puts a bare detectron2 student backbone


def _model_section(text: Any) -> Mapping[str, Any]:
    """The MODEL section of a file's cfg YAML ({} when there is none or it is not plain YAML)."""
    if not isinstance(text, str):
        return {}
    try:
        model = load_yaml(text).get("MODEL")
    except ConfigError:  # e.g. Detectron's yaml.dump with Python object tags
        return {}
    return model if isinstance(model, Mapping) else {}


def _cfg_of(weights: WeightFile) -> str | None:
    """The cfg YAML a file carries when it describes a whole detector (MODEL.CONV_BODY set)."""
    text = weights.container.get("cfg")
    return text if _model_section(text).get("CONV_BODY") else None


def _body_from_facts(facts: BackboneFacts, path: str) -> ResNet:
    if facts.depth is None:
        raise ValueError(f"{path}: a ResNet with stage blocks {list(facts.stage_blocks)} matches no standard depth")
    return ResNet(facts.depth, num_stages=len(facts.stage_blocks) + 1, norm=NormSpec(facts.norm),
                  groups=facts.groups, width_per_group=facts.width_per_group)


def _body_facts_of_file(weights: WeightFile) -> BackboneFacts:
    """The body a file holds: as its metadata describes it (files this tool writes), else from its tensors."""
    meta = weights.container.get(METADATA_KEY) or {}
    if weights.format == "pydetectron" or "body" in meta:
        if "body" not in meta:
            raise ValueError(f"{weights.path}: a pydetectron state dict without a cfg or '{METADATA_KEY}' body "
                             "description; convert needs one of them to rebuild the network")
        body = dict(meta["body"])
        body["stage_blocks"] = tuple(body["stage_blocks"])
        return BackboneFacts(**body)
    facts = backbone_facts(weights.blobs_for())
    if facts is None:
        raise ValueError(f"{weights.path} ({weights.description}) holds no ResNet body to convert")
    return facts


def model_of_file(weights: WeightFile) -> Tuple[nn.Module, Any, BackboneFacts]:
    """(model holding the file exactly, its cfg, the body's facts): the detector of the file's cfg, or a body."""
    cfg = get_cfg()
    text = _cfg_of(weights)
    if text is not None:
        from pydetectron.modeling.detector import build_detector  # the detector only when the file has one

        merge_cfg_from_str(cfg, text, source=f"cfg in {weights.path}")
        model = build_detector(cfg)
    else:
        model = _body_from_facts(_body_facts_of_file(weights), weights.path)
    order = weights.color_order or "BGR"  # an unknown order is kept as it is (no reversal either way)
    if weights.format == "detectron":  # blobs are BGR; the model gets the order the file's cfg names
        order = _model_section(weights.container.get("cfg")).get("INPUT_COLOR_ORDER", "BGR")
    cfg.MODEL.INPUT_COLOR_ORDER = check_color_order(order)
    report = load_pretrained(model, weights.path, cfg, training=True, print_fn=lambda _: None)
    if report.missing or report.unused or report.skipped:
        raise ValueError(f"{weights.path}: converting would lose tensors: missing {report.missing[:5]}, "
                         f"unused {report.unused[:5]}; convert handles the ResNet body or a whole pydetectron model")
    facts = backbone_facts(detectron_blobs(model))
    return model, cfg, facts


def _file_order(weights: WeightFile, cfg, input_order: str | None) -> str | None:
    """The model's channel order after loading: the file's (as loaded), or the one the user states."""
    known = cfg.MODEL.INPUT_COLOR_ORDER if weights.color_order or weights.format == "detectron" else None
    if input_order is not None:
        check_color_order(input_order)
        if known is not None and known != input_order:
            raise ValueError(f"{weights.path} says its input is {known}; --input_order {input_order} contradicts it")
        return input_order
    return known


def _metadata(weights: WeightFile, order: str | None, facts: BackboneFacts) -> Dict[str, Any]:
    """What a written file says of itself: its input channel order (None = unknown), where it came from and
    its body (a detectron2 FrozenBatchNorm2d file can then become an AffineChannel body again)."""
    return {"input_color_order": order, "source_format": weights.format, "body": asdict(facts)}


def _res5_in_head(mapping: Mapping[str, str | None]) -> bool:
    """Whether res5 belongs to the RoI heads (a C4 detector), not to the module holding conv1 (the body)."""
    owner = {blob: key.split(".", 1)[0] for key, blob in mapping.items() if blob}
    return "res5_0_branch2a_w" in owner and owner["res5_0_branch2a_w"] != owner.get("conv1_w")


def detectron2_state(model: nn.Module) -> Tuple[Dict[str, Any], List[str]]:
    """(detectron2 state dict of `model`, lines saying what changed): a detector in detectron2's names and
    class layout (``class_layout.py``), in the model's own channel order; a bare ResNet in detectron2's body names.
    Detectron heads' fixed bilinear up-sampling kernels are not written (detectron2 interpolates); anything
    else without a detectron2 name is an error naming it."""
    mapping = model_weight_mapping(model)
    blobs = detectron_blobs(model)  # in the model's own channel order
    lines: List[str] = []
    if has_heads(model):
        blobs, lines = blobs_in_layout(model, mapping, blobs, "detectron2")
        fixed = sorted(b for b in blobs if FIXED_UPSAMPLE_BLOBS.match(b))
        if fixed:
            lines.append("not written (fixed bilinear kernels detectron2 computes by interpolation): "
                         + ", ".join(fixed))
        names = detector_names_of_blobs(blobs, _res5_in_head(mapping))
        state, left_out = blobs_to_detectron2_detector({b: v for b, v in blobs.items() if b not in fixed}, names)
    else:
        state, left_out = blobs_to_detectron2(blobs)
    if left_out:
        raise ValueError(f"{len(left_out)} tensors of the model have no detectron2 name (first: {left_out[:5]})")
    return state, lines


def _detectron2_file(model: nn.Module, dst: str | os.PathLike, metadata: Mapping[str, Any]) -> Tuple[Dict, List[str]]:
    """Write `model` for detectron2's DetectionCheckpointer: ``{'model', '__author__', 'matching_heuristics'}``,
    a pickle of numpy arrays (``.pkl``) or a torch.save file of tensors (``.pth``). A detector is written in
    full detectron2 names (loaded as they are); a bare body in backbone names, matched by detectron2's heuristics."""
    state, lines = detectron2_state(model)
    detector = has_heads(model)
    if str(dst).endswith((".pth", ".pt")):
        state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}
        serializer = "torch"
    else:
        serializer = "pickle"
    obj: Dict[str, Any] = {"model": state, "__author__": "pydetectron", "matching_heuristics": not detector,
                           METADATA_KEY: dict(metadata, class_layout="detectron2")}
    write_object(obj, dst, serializer)
    return state, lines


def convert(src: str | os.PathLike, dst: str | os.PathLike, to: str, input_order: str | None = None) -> str:
    """Write `src` as `to` ('pydetectron' | 'detectron' | 'detectron2') at `dst`; returns a summary line."""
    if to not in TARGETS:
        raise ValueError(f"--to must be one of {', '.join(TARGETS)}, got {to!r}")
    weights = read_weights(src)
    model, cfg, facts = model_of_file(weights)
    order = _file_order(weights, cfg, input_order)
    if to == "detectron":
        if order is None:
            raise ValueError(f"{weights.path} ({weights.description}) does not say its input channel order and "
                             "Detectron files are BGR: pass --input_order RGB or BGR (the source's)")
        yaml_text = _cfg_of(weights) or f"MODEL:\n  INPUT_COLOR_ORDER: {order}\n"
        written = save_detectron_weights(model, dst, cfg_yaml=yaml_text, input_order=order)
    elif to == "detectron2":
        written, notes = _detectron2_file(model, dst, _metadata(weights, order, facts))
    else:
        obj = {"model": model.state_dict(), METADATA_KEY: _metadata(weights, order, facts)}
        if _cfg_of(weights):
            obj["cfg"] = _cfg_of(weights)
        write_object(obj, dst, "torch")
        written = obj["model"]
    summary = f"{src} ({weights.description}, {facts}) -> {dst} ({to}, {len(written)} tensors)"
    if to == "detectron2" and notes:
        summary += "; " + "; ".join(notes)
    if weights.left_out:  # e.g. a detectron2 detector's heads, MoCo's key encoder: said, never dropped unnoticed
        summary += (f"; left out {len(weights.left_out)} entries that are not this network "
                    f"(first: {', '.join(weights.left_out[:5])})")
    return summary


def _tensor_entries(weights: Mapping[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in weights.items() if isinstance(k, str) and hasattr(v, "shape")}


def _skeleton(weights: WeightFile) -> Tuple[Any, Tuple[str, ...]]:
    """The file's container with the network's tensors taken out (kept: everything else, e.g. 'cfg')."""
    skeleton = copy.copy(weights.container)
    node = skeleton
    for key in weights.location:
        node[key] = copy.copy(node[key])
        node = node[key]
    for key in _tensor_entries(node):
        del node[key]
    return skeleton, weights.location


def _dict_at(weights: WeightFile) -> Mapping[str, Any]:
    node = weights.container
    for key in weights.location:
        node = node[key]
    return node


def merge(teacher: str | os.PathLike, student: str | os.PathLike, out: str | os.PathLike) -> str:
    """Teacher and student in one file, as MGD's ``merge-models-into-one.py`` writes them for detectron2:
    ``{'model': {'t_net.<teacher key>': ..., 's_net.<student key>': ...}}`` (a bare detectron2 student backbone
    goes under ``s_net.backbone.bottom_up.``). Each part's own container (cfg, metadata) is kept so that
    ``split`` gives back its file bit for bit."""
    model: Dict[str, Any] = {}
    parts = {}
    for part, path in (("teacher", teacher), ("student", student)):
        weights = read_weights(path)
        if weights.format == "merged":
            raise ValueError(f"{path} is already a merged file")
        prefix = MERGED_PARTS[part]
        if part == "student" and weights.format == "detectron2" and not weights.prefix:
            prefix += _D2_BODY_PREFIX
        skeleton, location = _skeleton(weights)
        parts[part] = {"prefix": prefix, "container": skeleton, "location": list(location),
                       "serializer": weights.serializer, "format": weights.format}
        model.update({prefix + k: v for k, v in _tensor_entries(_dict_at(weights)).items()})
    write_object({"model": model, "__author__": "pydetectron", "matching_heuristics": True, "parts": parts}, out)
    return f"{teacher} + {student} -> {out} ({len(model)} tensors)"


DISTILLATION_HOOK = "Distillation"  # engine/distillation.py's hook name, the key of its state in a checkpoint


def _distilled_student(weights: WeightFile, part: str) -> Tuple[Any, str, int]:
    """The student of a distillation run's checkpoint (it holds no teacher): its model and cfg, without the
    optimizer, random and method states."""
    if part != "student":
        raise ValueError(f"{weights.path} is a distillation checkpoint: it holds the student only (the teacher is "
                         "rebuilt from DISTILL.TEACHER_CFG and its weights); take --part student")
    container = weights.container
    obj = {key: container[key] for key in ("model", "cfg", METADATA_KEY) if key in container}
    return obj, weights.serializer, len(_tensor_entries(container["model"]))


def split(merged: str | os.PathLike, out: str | os.PathLike, part: str) -> str:
    """One part of a merged file back out, in its original container and serializer; or the student of a
    distillation run's checkpoint (MGD's ``convert-output-to-d2.py`` step), ready for ``tools/test_net.py``."""
    weights = read_weights(merged)
    if weights.format == "pydetectron" and DISTILLATION_HOOK in (weights.container.get("hooks") or {}):
        obj, serializer, count = _distilled_student(weights, part)
    else:
        obj, serializer, count = merged_part(weights, part)
    write_object(obj, out, serializer)
    return f"{merged} --part {part} -> {out} ({count} tensors)"


def inspect(path: str | os.PathLike) -> List[str]:
    """Lines describing the file: format, tensor count, backbone, and the cfg settings it needs."""
    weights = read_weights(path)
    lines = [f"file:    {path}", f"format:  {weights.description}"]
    if weights.format == "merged":
        parts = weights.container.get("parts", {})
        for part, prefix in MERGED_PARTS.items():
            count = sum(k.startswith(prefix) for k in weights.weights)
            source = parts.get(part, {}).get("format", "unknown")
            lines.append(f"{part}: {count} tensors under '{prefix}' (from a {source} file); split it out to inspect")
        return lines
    model, cfg, facts = model_of_file(weights)
    lines.append(f"tensors: {len(_tensor_entries(weights.weights))} in the network"
                 + (f", {len(weights.left_out)} other entries left out" if weights.left_out else ""))
    lines.append(f"backbone: {facts}")
    order = weights.color_order or (cfg.MODEL.INPUT_COLOR_ORDER if weights.format == "detectron" else None)
    lines.append(f"input channel order: {order or 'not stated by the file'}")
    lines.append("cfg settings it needs:")
    lines += [f"  {line}" for line in architecture_lines(facts)]
    lines += [f"  {line}" for line in input_lines(weights.format, order, facts, weights.container.get("cfg"))]
    if isinstance(model, ResNet) and weights.format == "pydetectron":
        lines.append(f"  (a converted backbone, from a {weights.container[METADATA_KEY].get('source_format')} file)")
    return lines

