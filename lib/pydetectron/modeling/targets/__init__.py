"""Training-time label assignment (RPN anchors, Fast R-CNN RoIs, masks, keypoints); never used at inference."""
