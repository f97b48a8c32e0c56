// The IoU threshold both NMS kernels (cpu/nms_kernel.cpp, cuda/nms_kernel.cu) compare float IoUs with, so that
// both devices keep the same boxes.
#pragma once

namespace pydetectron {

// torchvision compares the float IoU, widened to double, with the double threshold: `iou > t` is then the
// same as `iou > largest float <= t`. Detectron's cython_nms takes the threshold as np.float32 (rounded to
// nearest) and compares `iou >= that`. Defined in cpu/nms_kernel.cpp.
float nms_float_threshold(double threshold, bool legacy_plus_one);

}  // namespace pydetectron
