// Detectron's soft-NMS on CUDA: the same sequential algorithm as cpu/soft_nms_kernel.cpp (read its header
// for the semantics), run by one thread block with the per-step work spread over its threads.
//
// Step i: the block finds the first highest score in [i, n) (a first-index arg-max reduction) and thread 0
// swaps it into slot i. All threads then decay the scores of slots (i, n) against slot i; every box there is
// examined exactly once by Detectron's loop as well (a box moved into a hole is examined there, with its
// own coordinates), so the decays are independent and the new scores equal the sequential ones. Which boxes
// fell below score_threshold is recorded as a bitmask in shared memory, and thread 0 replays Detectron's
// "replace with the last box, shrink n" compaction from that mask in O(dropped + moved) steps.
//
// The arithmetic is the CPU kernel's (products via __fmul_rn/__dmul_rn so none is fused into an FMA, the
// gaussian exp in double); float16 inputs are computed in float.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
// c10 headers only: ATen/cuda/CUDAContext.h needs cuSPARSE/cuBLAS headers that a bare toolkit may lack.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

namespace pydetectron {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
// The 48 KiB a block may use without opting in, less a margin for the kernel's static shared variables
// (warp_score, warp_slot, best_slot, shared_n: at most 200 bytes).
constexpr int64_t kMaxSharedBytes = 48 * 1024 - 256;

enum Method : int64_t { kHard = 0, kLinear = 1, kGaussian = 2 };  // Detectron's codes

__device__ __forceinline__ float mul_rn(float a, float b) {
  return __fmul_rn(a, b);
}
__device__ __forceinline__ double mul_rn(double a, double b) {
  return __dmul_rn(a, b);
}

// Detectron's float max/min: on ties (and NaN) they return the first argument.
template <typename T>
__device__ __forceinline__ T first_max(T a, T b) {
  return a >= b ? a : b;
}
template <typename T>
__device__ __forceinline__ T first_min(T a, T b) {
  return a <= b ? a : b;
}

template <typename T>
struct Slots {
  T *x1, *y1, *x2, *y2, *score;
  int64_t* index;

  __device__ void move(int to, int from) {
    x1[to] = x1[from];
    y1[to] = y1[from];
    x2[to] = x2[from];
    y2[to] = y2[from];
    score[to] = score[from];
    index[to] = index[from];
  }
  __device__ void swap(int a, int b) {
    const T ax1 = x1[a], ay1 = y1[a], ax2 = x2[a], ay2 = y2[a], as = score[a];
    const int64_t ai = index[a];
    move(a, b);
    x1[b] = ax1;
    y1[b] = ay1;
    x2[b] = ax2;
    y2[b] = ay2;
    score[b] = as;
    index[b] = ai;
  }
};

// (score, slot) that wins an arg-max: the higher score, then the lower slot (scores have no NaN).
template <typename T>
__device__ __forceinline__ void take_better(T& score, int& slot, T other_score, int other_slot) {
  if (other_slot >= 0 && (slot < 0 || other_score > score || (other_score == score && other_slot < slot))) {
    score = other_score;
    slot = other_slot;
  }
}

template <typename T>
__device__ int block_argmax(const T* score, int begin, int end, T* warp_score, int* warp_slot, int* result) {
  T best = T(0);
  int slot = -1;
  for (int p = begin + threadIdx.x; p < end; p += blockDim.x) {
    take_better(best, slot, score[p], p);
  }
  for (int offset = 16; offset > 0; offset /= 2) {
    const T other = __shfl_down_sync(0xffffffffu, best, offset);
    const int other_slot = __shfl_down_sync(0xffffffffu, slot, offset);
    take_better(best, slot, other, other_slot);
  }
  const int warp = threadIdx.x / 32;
  if (threadIdx.x % 32 == 0) {
    warp_score[warp] = best;
    warp_slot[warp] = slot;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kWarps; ++w) {
      take_better(best, slot, warp_score[w], warp_slot[w]);
    }
    *result = slot;
  }
  __syncthreads();
  return *result;
}

template <typename T>
__device__ __forceinline__ T decay_weight(T iou, int64_t method, T iou_threshold, T sigma) {
  if (method == kLinear) {
    return iou > iou_threshold ? T(1) - iou : T(1);
  }
  if (method == kGaussian) {
    return static_cast<T>(exp(static_cast<double>(-(iou * iou) / sigma)));
  }
  return iou > iou_threshold ? T(0) : T(1);
}

__device__ __forceinline__ bool bit_set(const uint32_t* bits, int q) {
  return (bits[q / 32] >> (q % 32)) & 1u;
}

// Detectron's removal order: scanning up from i + 1, each dropped slot d (still inside n) is refilled from
// the current last slot; a last box that was itself dropped is discarded and the next last one tried.
// dropped has bit q set when slot i + 1 + q fell below the threshold. Returns the new n.
template <typename T>
__device__ int compact(Slots<T>& s, int i, int n, const uint32_t* dropped) {
  const int words = (n - i - 1 + 31) / 32;
  for (int word = 0; word < words; ++word) {
    for (uint32_t rest = dropped[word]; rest != 0; rest &= rest - 1) {
      const int d = i + 1 + word * 32 + __ffs(static_cast<int>(rest)) - 1;
      if (d >= n) {
        return n;
      }
      while (true) {
        const int last = --n;
        if (last == d) {
          return n;  // every later dropped slot is now past the end
        }
        if (!bit_set(dropped, last - i - 1)) {
          s.move(d, last);
          break;
        }
      }
    }
  }
  return n;
}

template <typename T>
__global__ void soft_nms_kernel(Slots<T> s, int n, T sigma, T iou_threshold, T score_threshold, int64_t method,
                                T one, int* out_count) {
  extern __shared__ uint32_t dropped[];
  __shared__ T warp_score[kWarps];
  __shared__ int warp_slot[kWarps];
  __shared__ int best_slot;
  __shared__ int shared_n;
  if (threadIdx.x == 0) {
    shared_n = n;
  }
  __syncthreads();
  for (int i = 0; i < shared_n; ++i) {
    const int cur_n = shared_n;
    const int best = block_argmax(s.score, i, cur_n, warp_score, warp_slot, &best_slot);
    if (threadIdx.x == 0) {
      s.swap(i, best);
    }
    __syncthreads();
    const T tx1 = s.x1[i], ty1 = s.y1[i], tx2 = s.x2[i], ty2 = s.y2[i];
    const T tarea = mul_rn(tx2 - tx1 + one, ty2 - ty1 + one);
    // Slot p = i + 1 + q; lanes of a warp cover 32 consecutive q starting at a multiple of 32.
    for (int q0 = 0; q0 < cur_n - i - 1; q0 += blockDim.x) {
      const int q = q0 + threadIdx.x;
      const int p = i + 1 + q;
      bool drop = false;
      if (p < cur_n) {
        const T iw = first_min(tx2, s.x2[p]) - first_max(tx1, s.x1[p]) + one;
        const T ih = first_min(ty2, s.y2[p]) - first_max(ty1, s.y1[p]) + one;
        if (iw > T(0) && ih > T(0)) {
          const T area = mul_rn(s.x2[p] - s.x1[p] + one, s.y2[p] - s.y1[p] + one);
          const T inter = mul_rn(iw, ih);
          const T iou = inter / (tarea + area - inter);
          s.score[p] = mul_rn(decay_weight(iou, method, iou_threshold, sigma), s.score[p]);
          drop = s.score[p] < score_threshold;
        }
      }
      const uint32_t ballot = __ballot_sync(0xffffffffu, drop);
      if (threadIdx.x % 32 == 0) {
        dropped[q / 32] = ballot;
      }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      shared_n = compact(s, i, cur_n, dropped);
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    *out_count = shared_n;
  }
}

std::tuple<at::Tensor, at::Tensor> soft_nms_cuda(const at::Tensor& boxes, const at::Tensor& scores, double sigma,
                                                 double iou_threshold, double score_threshold, int64_t method,
                                                 bool legacy_plus_one) {
  TORCH_CHECK(boxes.is_cuda() && scores.is_cuda(), "soft_nms_cuda: boxes and scores must be CUDA tensors");
  TORCH_CHECK(boxes.device() == scores.device(), "soft_nms: boxes and scores must be on the same device");
  TORCH_CHECK(boxes.dim() == 2 && boxes.size(1) == 4, "soft_nms: boxes must have shape (N, 4), got ",
              boxes.sizes());
  TORCH_CHECK(scores.dim() == 1 && scores.size(0) == boxes.size(0),
              "soft_nms: scores must have shape (N,) with N = boxes.size(0), got ", scores.sizes());
  TORCH_CHECK(boxes.scalar_type() == scores.scalar_type(), "soft_nms: boxes and scores must have the same dtype");
  TORCH_CHECK(method == kHard || method == kLinear || method == kGaussian,
              "soft_nms: method must be 0 (hard), 1 (linear) or 2 (gaussian), got ", method);
  TORCH_CHECK(method != kGaussian || sigma > 0, "soft_nms: gaussian sigma must be > 0, got ", sigma);
  const int64_t n = boxes.size(0);
  // One bit per box in shared memory, plus padding for the last step's whole warp words.
  const int64_t shared_bytes = ((n + kThreads - 1) / kThreads * kThreads / 32) * 4;
  TORCH_CHECK(shared_bytes <= kMaxSharedBytes, "soft_nms on CUDA supports at most ", kMaxSharedBytes * 8,
              " boxes, got ", n);
  const c10::cuda::CUDAGuard guard(boxes.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  std::tuple<at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND_HALF(boxes.scalar_type(), "soft_nms_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    const auto opts = boxes.options().dtype(c10::CppTypeToScalarType<T>::value);
    // (4, n): x1, y1, x2, y2 rows. A private copy: the kernel reorders it, and .to() / .contiguous() can hand
    // back the caller's own memory (a float (4, n)^T input).
    const at::Tensor coords = boxes.to(opts).t().clone(at::MemoryFormat::Contiguous);
    const at::Tensor work_scores = scores.to(opts).clone();
    const at::Tensor index = at::arange(n, boxes.options().dtype(at::kLong));
    const at::Tensor count = at::empty({1}, boxes.options().dtype(at::kInt));
    T* c = coords.data_ptr<T>();
    Slots<T> slots{c, c + n, c + 2 * n, c + 3 * n, work_scores.data_ptr<T>(), index.data_ptr<int64_t>()};
    if (n > 0) {
      soft_nms_kernel<T><<<1, kThreads, shared_bytes, stream>>>(
          slots, static_cast<int>(n), static_cast<T>(sigma), static_cast<T>(iou_threshold),
          static_cast<T>(score_threshold), method, legacy_plus_one ? T(1) : T(0), count.data_ptr<int>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    const int64_t kept = n > 0 ? count.item<int>() : 0;
    out = {index.narrow(0, 0, kept), work_scores.narrow(0, 0, kept).to(scores.scalar_type())};
  });
  return out;
}

}  // namespace
}  // namespace pydetectron

TORCH_LIBRARY_IMPL(pydetectron, CUDA, m) {
  m.impl("soft_nms", &pydetectron::soft_nms_cuda);
}
