// Greedy non-maximum suppression on CUDA, with the same results as the CPU kernel (cpu/nms_kernel.cpp).
//
// Boxes are sorted by score (stable, descending) and split into blocks of 64. Kernel 1 gives every pair of
// a row block and a later-or-same column block to one CUDA block: each thread owns one row box and writes a
// 64-bit word whose bit k says "this box suppresses column box k". Kernel 2, a single CUDA block, walks the
// row blocks in order: one thread resolves the 64 rows of the current block against the diagonal words, the
// other threads then OR the kept rows' words into the removal mask of all later blocks. The kept bits are
// turned into indices on the device.
//
// IoU arithmetic matches the CPU kernel operation for operation; products go through __fmul_rn/__dmul_rn so
// that nvcc cannot fuse them into FMAs. float16 boxes are computed in float.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
// c10 headers only: ATen/cuda/CUDAContext.h needs cuSPARSE/cuBLAS headers that a bare toolkit may lack.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "cpu/nms_threshold.h"

namespace pydetectron {

namespace {

constexpr int kBoxesPerWord = 64;
constexpr int kReduceThreads = 256;

__device__ __forceinline__ float mul_rn(float a, float b) {
  return __fmul_rn(a, b);
}
__device__ __forceinline__ double mul_rn(double a, double b) {
  return __dmul_rn(a, b);
}

// std::max / std::min semantics (also for NaN), as the CPU kernel.
template <typename T>
__device__ __forceinline__ T max_of(T a, T b) {
  return a < b ? b : a;
}
template <typename T>
__device__ __forceinline__ T min_of(T a, T b) {
  return b < a ? b : a;
}

template <typename T>
struct Box {
  T x1, y1, x2, y2, area;
};

template <typename T, bool kLegacy, typename scalar_t>
__device__ __forceinline__ Box<T> load_box(const scalar_t* boxes, int64_t k) {
  Box<T> b;
  b.x1 = static_cast<T>(boxes[4 * k + 0]);
  b.y1 = static_cast<T>(boxes[4 * k + 1]);
  b.x2 = static_cast<T>(boxes[4 * k + 2]);
  b.y2 = static_cast<T>(boxes[4 * k + 3]);
  b.area = kLegacy ? mul_rn(b.x2 - b.x1 + T(1), b.y2 - b.y1 + T(1)) : mul_rn(b.x2 - b.x1, b.y2 - b.y1);
  return b;
}

template <typename T, bool kLegacy>
__device__ __forceinline__ bool suppresses(const Box<T>& a, const Box<T>& b, T threshold) {
  T w = min_of(a.x2, b.x2) - max_of(a.x1, b.x1);
  T h = min_of(a.y2, b.y2) - max_of(a.y1, b.y1);
  if (kLegacy) {
    w = w + T(1);
    h = h + T(1);
  }
  const T inter = mul_rn(max_of(T(0), w), max_of(T(0), h));
  const T iou = inter / (a.area + b.area - inter);
  return kLegacy ? iou >= threshold : iou > threshold;
}

template <typename scalar_t, bool kLegacy>
__global__ void nms_mask_kernel(int64_t n, const scalar_t* __restrict__ sorted_boxes,
                                at::opmath_type<scalar_t> threshold, uint64_t* __restrict__ mask,
                                int64_t col_blocks) {
  using T = at::opmath_type<scalar_t>;
  const int64_t row_block = blockIdx.y;
  const int64_t col_block = blockIdx.x;
  if (row_block > col_block) {
    return;  // the reduction never reads words left of a row's own block
  }
  const int rows = static_cast<int>(min(n - row_block * kBoxesPerWord, int64_t{kBoxesPerWord}));
  const int cols = static_cast<int>(min(n - col_block * kBoxesPerWord, int64_t{kBoxesPerWord}));
  __shared__ Box<T> col_boxes[kBoxesPerWord];
  if (threadIdx.x < cols) {
    col_boxes[threadIdx.x] = load_box<T, kLegacy>(sorted_boxes, col_block * kBoxesPerWord + threadIdx.x);
  }
  __syncthreads();
  if (threadIdx.x >= rows) {
    return;
  }
  const int64_t row = row_block * kBoxesPerWord + threadIdx.x;
  const Box<T> box = load_box<T, kLegacy>(sorted_boxes, row);
  uint64_t bits = 0;
  for (int k = row_block == col_block ? threadIdx.x + 1 : 0; k < cols; ++k) {
    if (suppresses<T, kLegacy>(box, col_boxes[k], threshold)) {
      bits |= uint64_t{1} << k;
    }
  }
  mask[row * col_blocks + col_block] = bits;
}

// One block. removed: col_blocks zeroed words; kept: col_blocks words out (bit k of word b = box 64b+k kept).
__global__ void nms_reduce_kernel(const uint64_t* __restrict__ mask, int64_t n, int64_t col_blocks,
                                  uint64_t* __restrict__ removed, uint64_t* __restrict__ kept) {
  __shared__ uint64_t diagonal[kBoxesPerWord];
  __shared__ uint64_t kept_now;
  for (int64_t b = 0; b < col_blocks; ++b) {
    const int rows = static_cast<int>(min(n - b * kBoxesPerWord, int64_t{kBoxesPerWord}));
    if (threadIdx.x < rows) {
      diagonal[threadIdx.x] = mask[(b * kBoxesPerWord + threadIdx.x) * col_blocks + b];
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      uint64_t gone = removed[b];
      uint64_t keep = 0;
      for (int k = 0; k < rows; ++k) {
        if (!((gone >> k) & 1)) {
          keep |= uint64_t{1} << k;
          gone |= diagonal[k];
        }
      }
      kept[b] = keep;
      kept_now = keep;
    }
    __syncthreads();
    const uint64_t keep = kept_now;
    for (int64_t w = b + 1 + threadIdx.x; w < col_blocks; w += blockDim.x) {
      uint64_t gone = 0;
      for (uint64_t rest = keep; rest != 0; rest &= rest - 1) {
        const int k = __ffsll(static_cast<long long>(rest)) - 1;
        gone |= mask[(b * kBoxesPerWord + k) * col_blocks + w];
      }
      removed[w] |= gone;
    }
    __syncthreads();
  }
}

template <typename scalar_t, bool kLegacy>
void launch_mask(const at::Tensor& sorted, double iou_threshold, at::Tensor& mask, int64_t col_blocks,
                 cudaStream_t stream) {
  using T = at::opmath_type<scalar_t>;
  T threshold;
  if constexpr (std::is_same_v<T, float>) {
    threshold = nms_float_threshold(iou_threshold, kLegacy);
  } else {
    threshold = static_cast<T>(iou_threshold);
  }
  const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(col_blocks));
  nms_mask_kernel<scalar_t, kLegacy><<<grid, kBoxesPerWord, 0, stream>>>(
      sorted.size(0), sorted.data_ptr<scalar_t>(), threshold,
      reinterpret_cast<uint64_t*>(mask.data_ptr<int64_t>()), col_blocks);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor nms_cuda(const at::Tensor& boxes, const at::Tensor& scores, double iou_threshold,
                    bool legacy_plus_one) {
  TORCH_CHECK(boxes.is_cuda() && scores.is_cuda(), "nms_cuda: boxes and scores must be CUDA tensors");
  TORCH_CHECK(boxes.device() == scores.device(), "nms: boxes and scores must be on the same device");
  TORCH_CHECK(boxes.dim() == 2 && boxes.size(1) == 4, "nms: boxes must have shape (N, 4), got ", boxes.sizes());
  TORCH_CHECK(scores.dim() == 1 && scores.size(0) == boxes.size(0),
              "nms: scores must have shape (N,) with N = boxes.size(0), got ", scores.sizes());
  TORCH_CHECK(boxes.scalar_type() == scores.scalar_type(), "nms: boxes and scores must have the same dtype");
  TORCH_CHECK(!std::isnan(iou_threshold), "nms: iou_threshold is NaN");
  const c10::cuda::CUDAGuard guard(boxes.device());
  const int64_t n = boxes.size(0);
  if (n == 0) {
    return at::empty({0}, boxes.options().dtype(at::kLong));
  }
  const int64_t col_blocks = (n + kBoxesPerWord - 1) / kBoxesPerWord;
  TORCH_CHECK(col_blocks <= 65535, "nms on CUDA supports at most ", 65535 * kBoxesPerWord, " boxes, got ", n);
  const at::Tensor order = std::get<1>(scores.sort(/*stable=*/true, /*dim=*/0, /*descending=*/true));
  const at::Tensor sorted = boxes.index_select(0, order).contiguous();
  const auto long_opts = boxes.options().dtype(at::kLong);
  at::Tensor mask = at::empty({n * col_blocks}, long_opts);
  at::Tensor removed = at::zeros({col_blocks}, long_opts);
  at::Tensor kept = at::empty({col_blocks}, long_opts);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND_HALF(boxes.scalar_type(), "nms_cuda", [&] {
    if (legacy_plus_one) {
      launch_mask<scalar_t, true>(sorted, iou_threshold, mask, col_blocks, stream);
    } else {
      launch_mask<scalar_t, false>(sorted, iou_threshold, mask, col_blocks, stream);
    }
  });
  nms_reduce_kernel<<<1, kReduceThreads, 0, stream>>>(
      reinterpret_cast<const uint64_t*>(mask.data_ptr<int64_t>()), n, col_blocks,
      reinterpret_cast<uint64_t*>(removed.data_ptr<int64_t>()), reinterpret_cast<uint64_t*>(kept.data_ptr<int64_t>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor bit = at::arange(kBoxesPerWord, long_opts);
  const at::Tensor is_kept = kept.unsqueeze(1).bitwise_right_shift(bit).bitwise_and(1).flatten().narrow(0, 0, n);
  return order.index_select(0, is_kept.nonzero().squeeze(1));
}

}  // namespace
}  // namespace pydetectron

TORCH_LIBRARY_IMPL(pydetectron, CUDA, m) {
  m.impl("nms", &pydetectron::nms_cuda);
}
