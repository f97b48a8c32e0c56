// RoIPool on CUDA with Caffe2's semantics (see cpu/roi_pool_kernel.cpp): one thread per output element
// scans its bin; the backward adds each gradient at its argmax with atomics into an accumulation buffer
// of the op-math type (float for half / bfloat16). Same geometry as the CPU kernels (cpu/roi_geometry.h).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/Atomic.cuh>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cfloat>

#include "cpu/roi_checks.h"
#include "cpu/roi_geometry.h"
#include "cuda/roi_launch.cuh"

namespace pydetectron {
namespace {

using roi::PoolRoi;
using roi::Span;

struct PoolShape {
  int64_t channels;
  int height, width, pooled_h, pooled_w;
};

template <typename scalar_t>
__global__ void roi_pool_forward_kernel(
    int64_t total, const scalar_t* __restrict__ input, const scalar_t* __restrict__ rois,
    at::opmath_type<scalar_t> spatial_scale, PoolShape s, scalar_t* __restrict__ output,
    int32_t* __restrict__ argmax) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int pw = static_cast<int>(i % s.pooled_w);
    const int ph = static_cast<int>((i / s.pooled_w) % s.pooled_h);
    const int64_t c = (i / s.pooled_w / s.pooled_h) % s.channels;
    const int64_t k = i / s.pooled_w / s.pooled_h / s.channels;
    const PoolRoi<acc_t> r = roi::pool_roi<acc_t>(rois + k * 5, spatial_scale, s.pooled_h, s.pooled_w);
    const Span rows = roi::pool_span(r.start_y, r.bin_h, ph, s.height);
    const Span cols = roi::pool_span(r.start_x, r.bin_w, pw, s.width);
    const scalar_t* data = input + (r.batch * s.channels + c) * s.height * s.width;
    acc_t best = rows.empty() || cols.empty() ? acc_t(0) : static_cast<acc_t>(-FLT_MAX);
    int32_t best_at = -1;
    for (int y = rows.begin; y < rows.end; ++y) {
      for (int x = cols.begin; x < cols.end; ++x) {
        const acc_t value = static_cast<acc_t>(data[y * s.width + x]);
        if (value > best) {
          best = value;
          best_at = y * s.width + x;
        }
      }
    }
    output[i] = static_cast<scalar_t>(best);
    argmax[i] = best_at;
  }
}

template <typename scalar_t>
__global__ void roi_pool_backward_kernel(
    int64_t total, const scalar_t* __restrict__ grad, const scalar_t* __restrict__ rois,
    const int32_t* __restrict__ argmax, PoolShape s, at::opmath_type<scalar_t>* grad_input) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int32_t place = argmax[i];
    if (place < 0) {
      continue;
    }
    const int64_t c = (i / s.pooled_w / s.pooled_h) % s.channels;
    const int64_t k = i / s.pooled_w / s.pooled_h / s.channels;
    const int64_t batch = static_cast<int64_t>(rois[k * 5]);
    gpuAtomicAdd(grad_input + (batch * s.channels + c) * s.height * s.width + place, static_cast<acc_t>(grad[i]));
  }
}

std::tuple<at::Tensor, at::Tensor> roi_pool_forward_cuda(
    const at::Tensor& input, const at::Tensor& rois, double spatial_scale, int64_t pooled_height,
    int64_t pooled_width) {
  roi::check_forward_args("roi_pool_forward", input, rois, pooled_height, pooled_width);
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor output = at::empty({rois.size(0), input.size(1), pooled_height, pooled_width}, input.options());
  at::Tensor argmax = at::empty(output.sizes(), input.options().dtype(at::kInt));
  const int64_t total = output.numel();
  if (total == 0) {
    return {output, argmax};
  }
  const at::Tensor in = input.contiguous(), rois_c = rois.contiguous();
  const PoolShape s{input.size(1), static_cast<int>(input.size(2)), static_cast<int>(input.size(3)),
                    static_cast<int>(pooled_height), static_cast<int>(pooled_width)};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "roi_pool_forward_cuda", [&] {
    roi_pool_forward_kernel<scalar_t><<<roi::blocks_for(total), roi::kThreadsPerBlock, 0, stream>>>(
        total, in.data_ptr<scalar_t>(), rois_c.data_ptr<scalar_t>(),
        static_cast<at::opmath_type<scalar_t>>(spatial_scale), s, output.data_ptr<scalar_t>(),
        argmax.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {output, argmax};
}

at::Tensor roi_pool_backward_cuda(
    const at::Tensor& grad, const at::Tensor& rois, const at::Tensor& argmax, double spatial_scale,
    int64_t pooled_height, int64_t pooled_width, int64_t batch_size, int64_t channels, int64_t height,
    int64_t width) {
  (void)spatial_scale;  // the argmax already says where each gradient goes
  roi::check_backward_args(
      "roi_pool_backward", grad, rois, pooled_height, pooled_width, batch_size, channels, height, width);
  roi::check_pool_argmax("roi_pool_backward", argmax, grad, height, width);
  // Atomic adds make the summation order, and so the last bits, vary from run to run.
  at::globalContext().alertNotDeterministic("roi_pool_backward_cuda");
  const c10::cuda::CUDAGuard guard(grad.device());
  const at::Tensor grad_c = grad.contiguous(), rois_c = rois.contiguous(), argmax_c = argmax.contiguous();
  const PoolShape s{channels, static_cast<int>(height), static_cast<int>(width), static_cast<int>(pooled_height),
                    static_cast<int>(pooled_width)};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t total = grad_c.numel();
  at::Tensor result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "roi_pool_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor acc = at::zeros({batch_size, channels, height, width},
                               grad.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    if (total > 0) {
      roi_pool_backward_kernel<scalar_t><<<roi::blocks_for(total), roi::kThreadsPerBlock, 0, stream>>>(
          total, grad_c.data_ptr<scalar_t>(), rois_c.data_ptr<scalar_t>(), argmax_c.data_ptr<int32_t>(), s,
          acc.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    result = acc.to(grad.scalar_type());
  });
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(pydetectron, CUDA, m) {
  m.impl("roi_pool_forward", &roi_pool_forward_cuda);
  m.impl("roi_pool_backward", &roi_pool_backward_cuda);
}

}  // namespace pydetectron
