"""detectron2's numerics, for ``MODEL.CONVENTIONS: 'detectron2'``: one job per module.

Boxes here are continuous ``[x1, y1, x2, y2]`` (width ``x2 - x1``, no +1), as in detectron2. The modules
reuse ``pydetectron.boxes`` (``legacy_plus_one=False``) and ``pydetectron.ops`` rather than copying them:

- ``box_transform``: ``Box2BoxTransform`` (weights, clamp ``log(1000 / 16)``);
- ``matcher``: ``Matcher`` (thresholds, labels, ``allow_low_quality_matches``);
- ``sampling``: ``subsample_labels`` (random positives / negatives by ``randperm``);
- ``losses``: smooth-L1 with detectron2's beta, GIoU, the dense (anchor) box-regression loss;
- ``anchors``: ``DefaultAnchorGenerator`` (cell anchors, offset, sizes per level);
- ``rpn``: the RPN head, its labels, losses and ``find_top_rpn_proposals``;
- ``pooler``: ``ROIPooler``'s level rule (the pooling is ``roi_features.RoIFeatureExtractor``, aligned RoIAlign);
- ``norms``: the heads' ``NORM`` names (d2's ``get_norm``);
- ``box_head`` / ``fast_rcnn``: ``FastRCNNConvFCHead``, ``FastRCNNOutputLayers``, its losses, ``fast_rcnn_inference``;
- ``mask_head`` / ``keypoint_head``: ``MaskRCNNConvUpsampleHead``, ``KRCNNConvDeconvUpsampleHead``, their targets,
  losses and decoding;
- ``postprocess``: ``detector_postprocess``, ``paste_masks_in_image``;
- ``roi_heads``: ``StandardROIHeads``, ``Res5ROIHeads``, ``Res5ROIHeadsExtraNorm``.
"""
