"""Caffe2 blob names and shapes of real Detectron weight files, rebuilt from Detectron's model code.

Written independently of pydetectron (this file imports nothing from it) so tests can check our name
mappings against Detectron rather than against themselves. Each function returns ``{blob: shape}`` in
Detectron's layouts: conv ``(out, in/groups, k, k)``, ConvTranspose ``(in, out, k, k)``, FC ``(out, in)``.

Sources (facebookresearch/Detectron, master):
- ResNet body: ``detectron/modeling/ResNet.py`` (``add_ResNet_convX_body``, ``add_stage``,
  ``add_residual_block``, ``basic_bn_stem``/``basic_gn_stem``, ``basic_bn_shortcut``/``basic_gn_shortcut``,
  ``bottleneck_transformation``/``bottleneck_gn_transformation``) and ``detectron/modeling/detector.py``
  (``ConvAffine`` -> ``<prefix>_w`` + ``<prefix>_bn_s/_b``; ``ConvGN`` -> ``<prefix>_w`` (no bias) +
  ``<prefix>_gn_s/_b``).
- ImageNet ``R-50.pkl`` / ``R-101.pkl`` (converted from MSRA's Caffe models): ``tools/pickle_caffe_blobs.py``
  adds a zero ``_b`` to every bias-less conv, folds BatchNorm+Scale into ``res<..>_bn_s/_b`` (so the stem's
  ``bn_conv1`` becomes ``res_conv1_bn``), renames ``res2a_branch1`` -> ``res2_0_branch1`` and keeps the
  ``fc1000`` classifier. (Detectron issue #86 shows ``fc1000_w`` and ``res*_branch*_b`` reported unused.)
- ``R-50-GN.pkl`` and ``X-101-32x8d.pkl`` were trained in Caffe2 with the blocks above; their names are
  those the model code creates (bias-less convs, ``_gn`` / ``_bn`` norms) plus ``fc1000``. The exact
  extra content of those two files (e.g. whether conv biases were stored) is not documented; the lists
  here hold what the model code implies.
- Model-zoo detectors: ``detectron/modeling/FPN.py`` (``add_fpn``, ``add_topdown_lateral_module``,
  ``add_fpn_rpn_outputs``: RPN weights created once at the lowest level, ``..._fpn2``),
  ``fast_rcnn_heads.py`` (``roi_2mlp_head``: fc6/fc7; ``add_fast_rcnn_outputs``), ``mask_rcnn_heads.py``
  (``mask_rcnn_fcn_head_v1upXconvs``: ``_[mask]_fcn<i>``, ``conv5_mask`` ConvTranspose,
  ``mask_fcn_logits``), ``keypoint_rcnn_heads.py`` (``add_roi_pose_head_v1convX``: ``conv_fcn<i>``;
  ``add_keypoint_outputs``: ``kps_score_lowres`` ConvTranspose + fixed bilinear ``kps_score``), and
  ``utils/net.py`` ``save_model_to_weights_file``: every param, a ``_momentum`` twin for each trainable
  one (not the AffineChannel params, not conv1/res2 under FREEZE_AT=2, not the fixed bilinear kernel),
  and the ImageNet blobs the model never used (``fc1000_*``, conv ``_b``) preserved from initialisation.
  Configs: ``configs/12_2017_baselines/e2e_mask_rcnn_R-50-FPN_1x.yaml``,
  ``e2e_keypoint_rcnn_R-50-FPN_1x.yaml``.
"""

from __future__ import annotations

from typing import Dict, Tuple

Shape = Tuple[int, ...]

R50_BLOCKS = (3, 4, 6, 3)
R101_BLOCKS = (3, 4, 23, 3)


def _conv(blobs: Dict[str, Shape], prefix: str, dim_in: int, dim_out: int, k: int, *, groups: int = 1,
          bias: bool, norm: str | None) -> None:
    blobs[f"{prefix}_w"] = (dim_out, dim_in // groups, k, k)
    if bias:
        blobs[f"{prefix}_b"] = (dim_out,)
    if norm:
        blobs[f"{prefix}_{norm}_s"] = (dim_out,)
        blobs[f"{prefix}_{norm}_b"] = (dim_out,)


def resnet_body_blobs(block_counts=R50_BLOCKS, *, groups: int = 1, width_per_group: int = 64, norm: str = "bn",
                      conv_bias: bool = False, prefix: str = "") -> Dict[str, Shape]:
    """Stem + res2..res<1+len(block_counts)> of a bottleneck ResNet (Detectron's add_ResNet_convX_body)."""
    blobs: Dict[str, Shape] = {}
    blobs["conv1_w"] = (64, 3, 7, 7)
    if conv_bias:
        blobs["conv1_b"] = (64,)
    stem_norm = "conv1_gn" if norm == "gn" else "res_conv1_bn"
    blobs[f"{stem_norm}_s"] = (64,)
    blobs[f"{stem_norm}_b"] = (64,)
    dim_in = 64
    for stage, count in enumerate(block_counts, start=2):
        dim_out = 256 * 2 ** (stage - 2)
        inner = groups * width_per_group * 2 ** (stage - 2)
        for i in range(count):
            name = f"{prefix}res{stage}_{i}"
            _conv(blobs, f"{name}_branch2a", dim_in, inner, 1, bias=conv_bias, norm=norm)
            _conv(blobs, f"{name}_branch2b", inner, inner, 3, groups=groups, bias=conv_bias, norm=norm)
            _conv(blobs, f"{name}_branch2c", inner, dim_out, 1, bias=conv_bias, norm=norm)
            if dim_in != dim_out:
                _conv(blobs, f"{name}_branch1", dim_in, dim_out, 1, bias=conv_bias, norm=norm)
            dim_in = dim_out
    return blobs


def _imagenet_classifier(blobs: Dict[str, Shape]) -> Dict[str, Shape]:
    blobs["fc1000_w"] = (1000, 2048)
    blobs["fc1000_b"] = (1000,)
    return blobs


def imagenet_r50_blobs() -> Dict[str, Shape]:
    """ImageNetPretrained/MSRA/R-50.pkl (Caffe conversion: every conv has a zero ``_b``)."""
    return _imagenet_classifier(resnet_body_blobs(R50_BLOCKS, conv_bias=True))


def imagenet_r50_gn_blobs() -> Dict[str, Shape]:
    """ImageNetPretrained/47261647/R-50-GN.pkl (GroupNorm everywhere, stem norm ``conv1_gn``)."""
    return _imagenet_classifier(resnet_body_blobs(R50_BLOCKS, norm="gn"))


def imagenet_x101_32x8d_blobs() -> Dict[str, Shape]:
    """ImageNetPretrained/20171220/X-101-32x8d.pkl (ResNeXt-101, 32 groups of width 8, AffineChannel)."""
    return _imagenet_classifier(resnet_body_blobs(R101_BLOCKS, groups=32, width_per_group=8))


def fpn_blobs(stage_dims=(256, 512, 1024, 2048), stage_blocks=R50_BLOCKS, dim: int = 256,
              min_level: int = 2) -> Dict[str, Shape]:
    """FPN on C`min_level`..C5 with P6 by subsampling (no parameters): laterals + 3x3 outputs, all with biases."""
    blobs: Dict[str, Shape] = {}
    stage_names = [f"res{s}_{n - 1}_sum" for s, n in zip(range(2, 6), stage_blocks)]
    stages = list(zip(stage_names, stage_dims))[min_level - 2:]
    for i, (name, d) in enumerate(reversed(stages)):
        inner = f"fpn_inner_{name}" + ("_lateral" if i > 0 else "")
        _conv(blobs, inner, d, dim, 1, bias=True, norm=None)
        _conv(blobs, f"fpn_{name}", dim, dim, 3, bias=True, norm=None)
    return blobs


def fpn_rpn_blobs(dim: int = 256, num_anchors: int = 3) -> Dict[str, Shape]:
    """The FPN RPN head, stored once at the finest level (fpn2) and shared by all levels."""
    blobs: Dict[str, Shape] = {}
    _conv(blobs, "conv_rpn_fpn2", dim, dim, 3, bias=True, norm=None)
    _conv(blobs, "rpn_cls_logits_fpn2", dim, num_anchors, 1, bias=True, norm=None)
    _conv(blobs, "rpn_bbox_pred_fpn2", dim, 4 * num_anchors, 1, bias=True, norm=None)
    return blobs


def box_head_blobs(num_classes: int, dim_in: int = 256, resolution: int = 7, hidden: int = 1024,
                   cls_agnostic: bool = False) -> Dict[str, Shape]:
    """roi_2mlp_head (fc6, fc7) + cls_score + bbox_pred (4 * (2 if agnostic else num_classes) rows)."""
    reg_classes = 2 if cls_agnostic else num_classes
    return {
        "fc6_w": (hidden, dim_in * resolution * resolution), "fc6_b": (hidden,),
        "fc7_w": (hidden, hidden), "fc7_b": (hidden,),
        "cls_score_w": (num_classes, hidden), "cls_score_b": (num_classes,),
        "bbox_pred_w": (4 * reg_classes, hidden), "bbox_pred_b": (4 * reg_classes,),
    }


def mask_head_blobs(num_classes: int, dim_in: int = 256, dim: int = 256, num_convs: int = 4) -> Dict[str, Shape]:
    """mask_rcnn_fcn_head_v1up4convs + class-specific mask_fcn_logits."""
    blobs: Dict[str, Shape] = {}
    for i in range(num_convs):
        _conv(blobs, f"_[mask]_fcn{i + 1}", dim_in if i == 0 else dim, dim, 3, bias=True, norm=None)
    blobs["conv5_mask_w"] = (dim, dim, 2, 2)  # ConvTranspose: (in, out, k, k)
    blobs["conv5_mask_b"] = (dim,)
    _conv(blobs, "mask_fcn_logits", dim, num_classes, 1, bias=True, norm=None)
    return blobs


def keypoint_head_blobs(num_keypoints: int = 17, dim_in: int = 256, dim: int = 512, num_convs: int = 8,
                        ) -> Dict[str, Shape]:
    """add_roi_pose_head_v1convX (8 x conv_fcn, 3x3) + kps_score_lowres (ConvTranspose 4x4/2) + the fixed
    bilinear ``kps_score`` (ConvTranspose 4x4/2, UP_SCALE 2)."""
    blobs: Dict[str, Shape] = {}
    for i in range(num_convs):
        _conv(blobs, f"conv_fcn{i + 1}", dim_in if i == 0 else dim, dim, 3, bias=True, norm=None)
    blobs["kps_score_lowres_w"] = (dim, num_keypoints, 4, 4)
    blobs["kps_score_lowres_b"] = (num_keypoints,)
    blobs["kps_score_w"] = (num_keypoints, num_keypoints, 4, 4)
    blobs["kps_score_b"] = (num_keypoints,)
    return blobs


def _is_trainable(name: str) -> bool:
    """Trainable under FREEZE_AT=2 with AffineChannel: has a gradient and is not on do_not_update_params."""
    frozen = name.startswith(("conv1_", "res_conv1_", "res2_")) or "_bn_" in name
    return not frozen and name not in ("kps_score_w", "kps_score_b")


def _model_zoo(params: Dict[str, Shape]) -> Dict[str, Shape]:
    """Params + preserved ImageNet R-50 blobs + ``_momentum`` twins of the trainable params."""
    preserved = {k: v for k, v in imagenet_r50_blobs().items() if k not in params}
    blobs = dict(params)
    blobs.update(preserved)
    for name, shape in params.items():
        if _is_trainable(name):
            blobs[f"{name}_momentum"] = shape
    return blobs


def mask_rcnn_r50_fpn_1x_blobs(num_classes: int = 81) -> Dict[str, Shape]:
    """Model zoo e2e_mask_rcnn_R-50-FPN_1x model_final.pkl ``blobs``."""
    params = resnet_body_blobs(R50_BLOCKS)
    params.update(fpn_blobs())
    params.update(fpn_rpn_blobs())
    params.update(box_head_blobs(num_classes))
    params.update(mask_head_blobs(num_classes))
    return _model_zoo(params)


def keypoint_rcnn_r50_fpn_1x_blobs(num_keypoints: int = 17) -> Dict[str, Shape]:
    """Model zoo e2e_keypoint_rcnn_R-50-FPN_1x model_final.pkl ``blobs`` (2 classes: bg, person)."""
    params = resnet_body_blobs(R50_BLOCKS)
    params.update(fpn_blobs())
    params.update(fpn_rpn_blobs())
    params.update(box_head_blobs(2))
    params.update(keypoint_head_blobs(num_keypoints))
    return _model_zoo(params)


def retinanet_head_blobs(num_classes: int = 81, dim: int = 256, num_anchors: int = 9, num_convs: int = 4
                         ) -> Dict[str, Shape]:
    """add_fpn_retinanet_outputs: cls and bbox towers + predictors, stored once at the finest level (fpn3)."""
    blobs: Dict[str, Shape] = {}
    for tower in ("cls", "bbox"):
        for n in range(num_convs):
            _conv(blobs, f"retnet_{tower}_conv_n{n}_fpn3", dim, dim, 3, bias=True, norm=None)
    _conv(blobs, "retnet_cls_pred_fpn3", dim, num_anchors * (num_classes - 1), 3, bias=True, norm=None)
    _conv(blobs, "retnet_bbox_pred_fpn3", dim, num_anchors * 4, 3, bias=True, norm=None)
    return blobs


def retinanet_r50_fpn_1x_blobs(num_classes: int = 81) -> Dict[str, Shape]:
    """Model zoo retinanet_R-50-FPN_1x model_final.pkl ``blobs``: FPN on C3..C5, P6 and P7 by 3x3/2 convs
    (``fpn_6`` on res5, ``fpn_7`` on ReLU(P6)), the RetinaNet head."""
    params = resnet_body_blobs(R50_BLOCKS)
    params.update(fpn_blobs(min_level=3))
    _conv(params, "fpn_6", 2048, 256, 3, bias=True, norm=None)
    _conv(params, "fpn_7", 256, 256, 3, bias=True, norm=None)
    params.update(retinanet_head_blobs(num_classes))
    return _model_zoo(params)

