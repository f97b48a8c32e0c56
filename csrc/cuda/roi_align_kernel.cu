// RoIAlign on CUDA: one thread per output element in the forward; one thread per gradient element in the
// backward, adding its share to the four bilinear neighbours of each sample with atomics into an
// accumulation buffer of the op-math type (float for half / bfloat16). Same geometry as the CPU kernels
// (cpu/roi_geometry.h).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/Atomic.cuh>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cpu/roi_checks.h"
#include "cpu/roi_geometry.h"
#include "cuda/roi_launch.cuh"

namespace pydetectron {
namespace {

using roi::AlignRoi;
using roi::Bilinear;

struct AlignShape {
  int64_t channels;
  int height, width, pooled_h, pooled_w, sampling_ratio;
  bool aligned;
};

template <typename scalar_t>
__global__ void roi_align_forward_kernel(
    int64_t total, const scalar_t* __restrict__ input, const scalar_t* __restrict__ rois,
    at::opmath_type<scalar_t> spatial_scale, AlignShape s, scalar_t* __restrict__ output) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int pw = static_cast<int>(i % s.pooled_w);
    const int ph = static_cast<int>((i / s.pooled_w) % s.pooled_h);
    const int64_t c = (i / s.pooled_w / s.pooled_h) % s.channels;
    const int64_t k = i / s.pooled_w / s.pooled_h / s.channels;
    const AlignRoi<acc_t> r =
        roi::align_roi<acc_t>(rois + k * 5, spatial_scale, s.pooled_h, s.pooled_w, s.sampling_ratio, s.aligned);
    const scalar_t* data = input + (r.batch * s.channels + c) * s.height * s.width;
    acc_t sum = 0;
    for (int iy = 0; iy < r.grid_h; ++iy) {
      for (int ix = 0; ix < r.grid_w; ++ix) {
        const Bilinear<acc_t> b = roi::align_sample(r, ph, pw, iy, ix, s.height, s.width);
        if (b.inside) {
          for (int q = 0; q < 4; ++q) {
            sum += b.w[q] * static_cast<acc_t>(data[b.pos[q]]);
          }
        }
      }
    }
    output[i] = static_cast<scalar_t>(sum / r.count);
  }
}

template <typename scalar_t>
__global__ void roi_align_backward_kernel(
    int64_t total, const scalar_t* __restrict__ grad, const scalar_t* __restrict__ rois,
    at::opmath_type<scalar_t> spatial_scale, AlignShape s, at::opmath_type<scalar_t>* grad_input) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int pw = static_cast<int>(i % s.pooled_w);
    const int ph = static_cast<int>((i / s.pooled_w) % s.pooled_h);
    const int64_t c = (i / s.pooled_w / s.pooled_h) % s.channels;
    const int64_t k = i / s.pooled_w / s.pooled_h / s.channels;
    const AlignRoi<acc_t> r =
        roi::align_roi<acc_t>(rois + k * 5, spatial_scale, s.pooled_h, s.pooled_w, s.sampling_ratio, s.aligned);
    acc_t* data = grad_input + (r.batch * s.channels + c) * s.height * s.width;
    const acc_t share = static_cast<acc_t>(grad[i]) / r.count;
    for (int iy = 0; iy < r.grid_h; ++iy) {
      for (int ix = 0; ix < r.grid_w; ++ix) {
        const Bilinear<acc_t> b = roi::align_sample(r, ph, pw, iy, ix, s.height, s.width);
        if (b.inside) {
          for (int q = 0; q < 4; ++q) {
            gpuAtomicAdd(data + b.pos[q], b.w[q] * share);
          }
        }
      }
    }
  }
}

AlignShape shape_of(int64_t channels, int64_t height, int64_t width, int64_t pooled_height, int64_t pooled_width,
                    int64_t sampling_ratio, bool aligned) {
  return AlignShape{channels, static_cast<int>(height), static_cast<int>(width), static_cast<int>(pooled_height),
                    static_cast<int>(pooled_width), static_cast<int>(sampling_ratio), aligned};
}

at::Tensor roi_align_forward_cuda(
    const at::Tensor& input, const at::Tensor& rois, double spatial_scale, int64_t pooled_height,
    int64_t pooled_width, int64_t sampling_ratio, bool aligned) {
  roi::check_forward_args("roi_align_forward", input, rois, pooled_height, pooled_width);
  TORCH_CHECK(sampling_ratio >= 0, "roi_align_forward: sampling_ratio must be >= 0 (0 = adaptive), got ",
              sampling_ratio);
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor output = at::empty({rois.size(0), input.size(1), pooled_height, pooled_width}, input.options());
  const int64_t total = output.numel();
  if (total == 0) {
    return output;
  }
  const at::Tensor in = input.contiguous(), rois_c = rois.contiguous();
  const AlignShape s =
      shape_of(input.size(1), input.size(2), input.size(3), pooled_height, pooled_width, sampling_ratio, aligned);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "roi_align_forward_cuda", [&] {
    roi_align_forward_kernel<scalar_t><<<roi::blocks_for(total), roi::kThreadsPerBlock, 0, stream>>>(
        total, in.data_ptr<scalar_t>(), rois_c.data_ptr<scalar_t>(),
        static_cast<at::opmath_type<scalar_t>>(spatial_scale), s, output.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return output;
}

at::Tensor roi_align_backward_cuda(
    const at::Tensor& grad, const at::Tensor& rois, double spatial_scale, int64_t pooled_height,
    int64_t pooled_width, int64_t batch_size, int64_t channels, int64_t height, int64_t width,
    int64_t sampling_ratio, bool aligned) {
  roi::check_backward_args(
      "roi_align_backward", grad, rois, pooled_height, pooled_width, batch_size, channels, height, width);
  TORCH_CHECK(sampling_ratio >= 0, "roi_align_backward: sampling_ratio must be >= 0 (0 = adaptive), got ",
              sampling_ratio);
  // Atomic adds make the summation order, and so the last bits, vary from run to run.
  at::globalContext().alertNotDeterministic("roi_align_backward_cuda");
  const c10::cuda::CUDAGuard guard(grad.device());
  const at::Tensor grad_c = grad.contiguous(), rois_c = rois.contiguous();
  const AlignShape s = shape_of(channels, height, width, pooled_height, pooled_width, sampling_ratio, aligned);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t total = grad_c.numel();
  at::Tensor result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "roi_align_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor acc = at::zeros({batch_size, channels, height, width},
                               grad.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    if (total > 0) {
      roi_align_backward_kernel<scalar_t><<<roi::blocks_for(total), roi::kThreadsPerBlock, 0, stream>>>(
          total, grad_c.data_ptr<scalar_t>(), rois_c.data_ptr<scalar_t>(), static_cast<acc_t>(spatial_scale), s,
          acc.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    result = acc.to(grad.scalar_type());
  });
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(pydetectron, CUDA, m) {
  m.impl("roi_align_forward", &roi_align_forward_cuda);
  m.impl("roi_align_backward", &roi_align_backward_cuda);
}

}  // namespace pydetectron
