// Schemas of every pydetectron op. Kernels register per device with TORCH_LIBRARY_IMPL in
// cpu/*.cpp and cuda/*.cu; autograd lives in Python (pydetectron/ops).
#include <torch/library.h>

TORCH_LIBRARY(pydetectron, m) {
  m.def(
      "roi_align_forward(Tensor input, Tensor rois, float spatial_scale, int pooled_height, "
      "int pooled_width, int sampling_ratio, bool aligned) -> Tensor");
  m.def(
      "roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, int pooled_height, "
      "int pooled_width, int batch_size, int channels, int height, int width, int sampling_ratio, "
      "bool aligned) -> Tensor");
  m.def(
      "roi_pool_forward(Tensor input, Tensor rois, float spatial_scale, int pooled_height, "
      "int pooled_width) -> (Tensor, Tensor)");
  m.def(
      "roi_pool_backward(Tensor grad, Tensor rois, Tensor argmax, float spatial_scale, "
      "int pooled_height, int pooled_width, int batch_size, int channels, int height, int width) -> Tensor");
  m.def("nms(Tensor boxes, Tensor scores, float iou_threshold, bool legacy_plus_one) -> Tensor");
  m.def(
      "soft_nms(Tensor boxes, Tensor scores, float sigma, float iou_threshold, float score_threshold, "
      "int method, bool legacy_plus_one) -> (Tensor, Tensor)");
}
