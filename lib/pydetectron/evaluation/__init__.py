"""Inference over a dataset, COCO result files and COCO metrics (box, mask, keypoint)."""
