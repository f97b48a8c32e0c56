"""Detectors whose output the tool tests control (stand-ins for the real model, used ONLY in tests), and a
small Mask R-CNN cfg for the tests that run the real one."""

from __future__ import annotations

import torch
from torch import nn

# A ResNet-18-FPN Mask R-CNN with narrow heads and small images.
TINY_CFG = """\
MODEL:
  TYPE: generalized_rcnn
  CONV_BODY: FPN.add_fpn_ResNet18_conv5_body
  NUM_CLASSES: -1
  FASTER_RCNN: True
  MASK_ON: True
  LOAD_IMAGENET_PRETRAINED_WEIGHTS: False
RESNETS:
  TRANS_FUNC: basic_transformation
  NORM: GN
FPN:
  FPN_ON: True
  MULTILEVEL_ROIS: True
  MULTILEVEL_RPN: True
  DIM: 32
FAST_RCNN:
  ROI_BOX_HEAD: fast_rcnn_heads.add_roi_2mlp_head
  ROI_XFORM_METHOD: RoIAlign
  ROI_XFORM_RESOLUTION: 7
  ROI_XFORM_SAMPLING_RATIO: 2
  MLP_HEAD_DIM: 64
MRCNN:
  ROI_MASK_HEAD: mask_rcnn_heads.mask_rcnn_fcn_head_v1up4convs
  RESOLUTION: 28
  ROI_XFORM_METHOD: RoIAlign
  ROI_XFORM_RESOLUTION: 14
  ROI_XFORM_SAMPLING_RATIO: 2
  DILATION: 1
  DIM_REDUCED: 32
TEST:
  SCALE: 128
  MAX_SIZE: 200
  RPN_PRE_NMS_TOP_N: 200
  RPN_POST_NMS_TOP_N: 50
"""


class GridDetector(nn.Module):
    """Deterministic detections that depend on the pixels: a 3 x 3 grid of boxes over the original image,
    class (cell % (C - 1)) + 1, score from the mean input value of the cell, a mask filling each box.

    Follows the detector contract: forward(data (N, 3, H, W), im_info (N, 3)) in eval mode -> one dict per image
    in original pixels (boxes (D, 4) inclusive xyxy, scores (D,), classes (D,), masks (D, h, w) uint8)."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.scale = nn.Parameter(torch.full((num_classes,), 0.02))

    def forward(self, data, im_info, roidb=None):
        results = []
        for i in range(data.shape[0]):
            h, w, s = (float(v) for v in im_info[i])
            height, width = round(h / s), round(w / s)
            boxes, scores, classes = [], [], []
            for cell in range(9):
                r, c = divmod(cell, 3)
                x1, y1 = c * width / 3, r * height / 3
                x2, y2 = (c + 1) * width / 3 - 1, (r + 1) * height / 3 - 1
                region = data[i, :, int(y1 * s): int(y2 * s) + 1, int(x1 * s): int(x2 * s) + 1]
                cls = cell % (self.num_classes - 1) + 1
                boxes.append([x1, y1, x2, y2])
                scores.append(torch.sigmoid(region.mean() * self.scale[cls]))
                classes.append(cls)
            boxes = torch.tensor(boxes)
            masks = torch.zeros((9, height, width), dtype=torch.uint8)
            for k, (x1, y1, x2, y2) in enumerate(boxes.round().long().tolist()):
                masks[k, y1: y2 + 1, x1: x2 + 1] = 1
            results.append({"boxes": boxes, "scores": torch.stack(scores).detach(),
                            "classes": torch.tensor(classes), "masks": masks})
        return results


class FixedDetector(nn.Module):
    """One detection of class `label` at a fixed box (original pixels) with score 0.95 and a mask filling it."""

    def __init__(self, box=(20, 20, 60, 50), num_classes: int = 81, label: int = 1) -> None:
        super().__init__()
        self.box = box
        self.label = label
        self.weight = nn.Parameter(torch.zeros(num_classes))

    def forward(self, data, im_info, roidb=None):
        h, w, s = (float(v) for v in im_info[0])
        height, width = round(h / s), round(w / s)
        x1, y1, x2, y2 = self.box
        mask = torch.zeros((1, height, width), dtype=torch.uint8)
        mask[0, y1: y2 + 1, x1: x2 + 1] = 1
        return [{"boxes": torch.tensor([self.box], dtype=torch.float32), "scores": torch.tensor([0.95]),
                 "classes": torch.tensor([self.label]), "masks": mask}]
