// Argument checks shared by the CPU and CUDA RoIAlign / RoIPool kernels, so a bad call from Python raises
// a RuntimeError naming the fault instead of reading out of bounds.
#pragma once

#include <ATen/ATen.h>

namespace pydetectron {
namespace roi {

inline void check_pooled_size(const char* op, int64_t pooled_h, int64_t pooled_w) {
  TORCH_CHECK(
      pooled_h > 0 && pooled_w > 0, op, ": pooled_height and pooled_width must be positive, got ", pooled_h,
      " and ", pooled_w);
}

// Largest |coordinate| accepted: sample counts and bin edges derived from it still fit an int (the kernels
// cast them), whatever the spatial scale (<= 1) and output size.
constexpr double kMaxRoiCoordinate = 1073741824.0;  // 2^30

// rois: (K, 5) = [batch_index, x1, y1, x2, y2], finite and within +-2^30, batch indices (truncated to
// integers, as the kernels read them) inside [0, batch_size). Valid rois cost one reduction and one host read
// (one device synchronisation when they live on a GPU); the error details are worked out only when
// something is wrong.
inline void check_rois(const char* op, const at::Tensor& rois, int64_t batch_size) {
  TORCH_CHECK(
      rois.dim() == 2 && rois.size(1) == 5, op, ": rois must have shape (K, 5) = [batch_index, x1, y1, x2, y2], got ",
      rois.sizes());
  TORCH_CHECK(at::isFloatingType(rois.scalar_type()), op, ": rois must be floating point, got ", rois.scalar_type());
  if (rois.size(0) == 0) {
    return;
  }
  const at::Tensor batch = rois.select(1, 0);  // truncation keeps b in [0, N) exactly when -1 < b < N
  if ((rois.abs().lt(kMaxRoiCoordinate).all(1) & batch.gt(-1) & batch.lt(batch_size)).all().item<bool>()) {
    return;
  }
  TORCH_CHECK(at::isfinite(rois).all().item<bool>(), op, ": rois contain NaN or infinite values");
  TORCH_CHECK(
      rois.abs().lt(kMaxRoiCoordinate).all().item<bool>(), op, ": rois have a value beyond +-2^30 (",
      rois.abs().max().item<double>(), ")");
  const auto [low, high] = at::aminmax(rois.select(1, 0).to(at::kLong));
  const int64_t lowest = low.item<int64_t>(), highest = high.item<int64_t>();
  TORCH_CHECK(
      lowest >= 0 && highest < batch_size, op, ": roi batch index ", lowest < 0 ? lowest : highest,
      " is outside [0, ", batch_size, ") (the input has ", batch_size, " image(s))");
}

// Forward ops: input (N, C, H, W) and rois of the same dtype and device.
inline void check_forward_args(
    const char* op, const at::Tensor& input, const at::Tensor& rois, int64_t pooled_h, int64_t pooled_w) {
  TORCH_CHECK(input.dim() == 4, op, ": input must be a 4-D (N, C, H, W) tensor, got shape ", input.sizes());
  TORCH_CHECK(
      input.size(2) > 0 && input.size(3) > 0, op, ": input height and width must be positive, got shape ",
      input.sizes());
  TORCH_CHECK(
      at::isFloatingType(input.scalar_type()), op, ": input must be floating point, got ", input.scalar_type());
  TORCH_CHECK(
      rois.scalar_type() == input.scalar_type(), op, ": rois dtype ", rois.scalar_type(),
      " differs from input dtype ", input.scalar_type());
  TORCH_CHECK(
      rois.device() == input.device(), op, ": rois are on ", rois.device(), " but input is on ", input.device());
  check_pooled_size(op, pooled_h, pooled_w);
  check_rois(op, rois, input.size(0));
}

// Backward ops: grad (K, C, pooled_h, pooled_w) for rois (K, 5) and an input of shape (N, C, H, W).
inline void check_backward_args(
    const char* op, const at::Tensor& grad, const at::Tensor& rois, int64_t pooled_h, int64_t pooled_w,
    int64_t batch_size, int64_t channels, int64_t height, int64_t width) {
  check_pooled_size(op, pooled_h, pooled_w);
  TORCH_CHECK(
      batch_size >= 0 && channels >= 0 && height > 0 && width > 0, op,
      ": input sizes must be non-negative with positive height and width, got (", batch_size, ", ", channels,
      ", ", height, ", ", width, ")");
  TORCH_CHECK(
      at::isFloatingType(grad.scalar_type()), op, ": grad must be floating point, got ", grad.scalar_type());
  TORCH_CHECK(
      rois.scalar_type() == grad.scalar_type(), op, ": rois dtype ", rois.scalar_type(), " differs from grad dtype ",
      grad.scalar_type());
  TORCH_CHECK(rois.device() == grad.device(), op, ": rois are on ", rois.device(), " but grad is on ", grad.device());
  check_rois(op, rois, batch_size);
  TORCH_CHECK(
      grad.dim() == 4 && grad.size(0) == rois.size(0) && grad.size(1) == channels && grad.size(2) == pooled_h &&
          grad.size(3) == pooled_w,
      op, ": grad must have shape (K, C, pooled_height, pooled_width) = (", rois.size(0), ", ", channels, ", ",
      pooled_h, ", ", pooled_w, "), got ", grad.sizes());
}

// RoIPool's argmax: int32 flat offsets y * W + x (or -1), shaped like grad, on grad's device.
inline void check_pool_argmax(
    const char* op, const at::Tensor& argmax, const at::Tensor& grad, int64_t height, int64_t width) {
  TORCH_CHECK(
      argmax.scalar_type() == at::kInt && argmax.sizes() == grad.sizes() && argmax.device() == grad.device(), op,
      ": argmax must be an int32 tensor shaped like grad ", grad.sizes(), " on ", grad.device(), ", got ",
      argmax.scalar_type(), " ", argmax.sizes(), " on ", argmax.device());
  if (argmax.numel() == 0) {
    return;
  }
  const auto [low, high] = at::aminmax(argmax);
  const int64_t lowest = low.item<int64_t>(), highest = high.item<int64_t>();
  TORCH_CHECK(
      lowest >= -1 && highest < height * width, op, ": argmax values must lie in [-1, H*W) = [-1, ",
      height * width, "), got [", lowest, ", ", highest, "]");
}

}  // namespace roi
}  // namespace pydetectron
