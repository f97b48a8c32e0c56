// Greedy non-maximum suppression on CPU.
//
// Boxes are visited in stable descending score order (equal scores keep their input order, as
// torch.sort(stable=True) and torchvision's CPU kernel do). A box is suppressed when its IoU with an
// earlier kept box is > iou_threshold, or >= iou_threshold in legacy (Detectron cython_nms) mode, where
// widths and heights are also inclusive (x2 - x1 + 1).
//
// Speed: the sorted boxes live in contiguous per-coordinate arrays and are processed in row tiles. A tile's
// rows are first resolved among themselves (rows already suppressed by earlier tiles are skipped), then the
// tile's kept rows suppress every later box. That second sweep is nearly all of the O(kept x N) work; its
// branch-free inner loop vectorises, and it is split by column range (threads never write the same flag)
// over the calling thread and helpers that claim chunks as they come (see run_claiming_chunks).
// The IoU uses the same operations in the same order as torchvision (Detectron in legacy mode), so the kept
// set is identical to theirs, not merely close.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#include "cpu/nms_threshold.h"

namespace pydetectron {

float nms_float_threshold(double threshold, bool legacy_plus_one) {
  float t = static_cast<float>(threshold);
  if (!legacy_plus_one && static_cast<double>(t) > threshold) {
    t = std::nextafter(t, -std::numeric_limits<float>::infinity());
  }
  return t;
}

namespace {

// On x86-64 Linux the column sweep is also compiled for AVX2 and picked at load time (the baseline SSE2
// build cannot vectorise the double version). "avx2" does not enable FMA, so no product is fused and the
// arithmetic stays bit-identical to the plain build.
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__)
#define PYD_SIMD_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define PYD_SIMD_CLONES
#endif

constexpr int64_t kRowTile = 256;        // rows resolved sequentially between two column sweeps
constexpr int64_t kColBlock = 1024;      // columns swept for all of a tile's kept rows while in cache
constexpr int64_t kTaskPairs = 1 << 19;  // IoUs per claimable chunk of a sweep (~0.15 ms of work)

// Runs body(lo, hi) over chunks of [begin, end) on the calling thread and on up to at::get_num_threads() - 1
// helpers from the inter-op pool. Chunks are claimed one at a time and the caller waits only for chunks a
// helper has claimed: on a busy machine a helper the OS has not scheduled yet costs nothing, whereas an
// OpenMP region would wait for it at its closing barrier. body must not throw.
template <typename F>
void run_claiming_chunks(int64_t begin, int64_t end, int64_t chunk, const F& body) {
  const int64_t chunks = (end - begin + chunk - 1) / chunk;
  const int64_t helpers = std::min<int64_t>(at::get_num_threads() - 1, chunks - 1);
  if (helpers <= 0) {
    body(begin, end);
    return;
  }
  struct Progress {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  // Shared ownership: a helper may start after this call returned; it then claims nothing and touches
  // only `progress` (body is dereferenced only for a claimed chunk, which this call waits for).
  auto progress = std::make_shared<Progress>();
  auto work = [progress, begin, end, chunk, chunks, &body] {
    for (int64_t c = progress->next.fetch_add(1); c < chunks; c = progress->next.fetch_add(1)) {
      body(begin + c * chunk, std::min(end, begin + (c + 1) * chunk));
      progress->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t h = 0; h < helpers; ++h) {
    at::launch(work);
  }
  work();
  while (progress->done.load(std::memory_order_acquire) < chunks) {
    std::this_thread::yield();
  }
}

// Suppression flags as wide as T, so that the vectorised comparison needs no narrowing.
template <typename T>
using Flag = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;

// Sorted boxes as structure-of-arrays so the column loop reads unit-stride memory.
template <typename T>
struct SortedBoxes {
  std::vector<T> x1, y1, x2, y2, area;
};

template <typename T, bool kLegacy>
SortedBoxes<T> gather_sorted(const at::Tensor& boxes, const at::Tensor& order) {
  const int64_t n = order.numel();
  const auto b = boxes.accessor<T, 2>();
  const int64_t* idx = order.data_ptr<int64_t>();
  SortedBoxes<T> s;
  for (auto* v : {&s.x1, &s.y1, &s.x2, &s.y2, &s.area}) {
    v->resize(n);
  }
  for (int64_t i = 0; i < n; ++i) {
    const int64_t k = idx[i];
    s.x1[i] = b[k][0];
    s.y1[i] = b[k][1];
    s.x2[i] = b[k][2];
    s.y2[i] = b[k][3];
    s.area[i] = kLegacy ? (s.x2[i] - s.x1[i] + T(1)) * (s.y2[i] - s.y1[i] + T(1))
                        : (s.x2[i] - s.x1[i]) * (s.y2[i] - s.y1[i]);
  }
  return s;
}

// Marks removed[j] for j in [begin, end) whose IoU with box i passes the threshold. No early exits or
// data-dependent branches: the compiler turns this into SIMD code.
template <typename T, bool kLegacy>
PYD_SIMD_CLONES void suppress_by(const SortedBoxes<T>& s, int64_t i, int64_t begin, int64_t end, T threshold,
                 Flag<T>* removed) {
  const T ix1 = s.x1[i], iy1 = s.y1[i], ix2 = s.x2[i], iy2 = s.y2[i], iarea = s.area[i];
  const T* x1 = s.x1.data();
  const T* y1 = s.y1.data();
  const T* x2 = s.x2.data();
  const T* y2 = s.y2.data();
  const T* area = s.area.data();
  for (int64_t j = begin; j < end; ++j) {
    T w = std::min(ix2, x2[j]) - std::max(ix1, x1[j]);
    T h = std::min(iy2, y2[j]) - std::max(iy1, y1[j]);
    if constexpr (kLegacy) {
      w = w + T(1);
      h = h + T(1);
    }
    const T inter = std::max(T(0), w) * std::max(T(0), h);
    const T iou = inter / (iarea + area[j] - inter);
    removed[j] |= static_cast<Flag<T>>(kLegacy ? iou >= threshold : iou > threshold);
  }
}

// Returns the kept positions in sorted order.
template <typename T, bool kLegacy>
std::vector<int64_t> greedy_keep(const SortedBoxes<T>& s, T threshold) {
  const int64_t n = static_cast<int64_t>(s.x1.size());
  std::vector<Flag<T>> removed(n, 0);
  std::vector<int64_t> keep;
  std::vector<int64_t> tile_keep;
  for (int64_t t0 = 0; t0 < n; t0 += kRowTile) {
    const int64_t t1 = std::min(n, t0 + kRowTile);
    tile_keep.clear();
    for (int64_t i = t0; i < t1; ++i) {
      if (!removed[i]) {
        tile_keep.push_back(i);
        suppress_by<T, kLegacy>(s, i, i + 1, t1, threshold, removed.data());
      }
    }
    keep.insert(keep.end(), tile_keep.begin(), tile_keep.end());
    if (t1 == n || tile_keep.empty()) {
      continue;
    }
    const int64_t chunk = std::max<int64_t>(kColBlock, kTaskPairs / static_cast<int64_t>(tile_keep.size()));
    run_claiming_chunks(t1, n, chunk, [&](int64_t lo, int64_t hi) {
      for (int64_t c0 = lo; c0 < hi; c0 += kColBlock) {
        const int64_t c1 = std::min(hi, c0 + kColBlock);
        for (const int64_t i : tile_keep) {
          suppress_by<T, kLegacy>(s, i, c0, c1, threshold, removed.data());
        }
      }
    });
  }
  return keep;
}

template <typename T>
T compare_threshold(double iou_threshold, bool legacy_plus_one) {
  if constexpr (std::is_same_v<T, float>) {
    return nms_float_threshold(iou_threshold, legacy_plus_one);
  } else {
    return static_cast<T>(iou_threshold);
  }
}

at::Tensor nms_cpu(const at::Tensor& boxes, const at::Tensor& scores, double iou_threshold,
                   bool legacy_plus_one) {
  TORCH_CHECK(boxes.device().is_cpu() && scores.device().is_cpu(), "nms_cpu: boxes and scores must be CPU tensors");
  TORCH_CHECK(boxes.dim() == 2 && boxes.size(1) == 4, "nms: boxes must have shape (N, 4), got ", boxes.sizes());
  TORCH_CHECK(scores.dim() == 1 && scores.size(0) == boxes.size(0),
              "nms: scores must have shape (N,) with N = boxes.size(0), got ", scores.sizes());
  TORCH_CHECK(boxes.scalar_type() == scores.scalar_type(), "nms: boxes and scores must have the same dtype");
  TORCH_CHECK(!std::isnan(iou_threshold), "nms: iou_threshold is NaN");
  if (boxes.size(0) == 0) {
    return at::empty({0}, boxes.options().dtype(at::kLong));
  }
  const at::Tensor order = std::get<1>(scores.sort(/*stable=*/true, /*dim=*/0, /*descending=*/true));
  std::vector<int64_t> keep;
  AT_DISPATCH_FLOATING_TYPES(boxes.scalar_type(), "nms_cpu", [&] {
    const scalar_t threshold = compare_threshold<scalar_t>(iou_threshold, legacy_plus_one);
    if (legacy_plus_one) {
      keep = greedy_keep<scalar_t, true>(gather_sorted<scalar_t, true>(boxes, order), threshold);
    } else {
      keep = greedy_keep<scalar_t, false>(gather_sorted<scalar_t, false>(boxes, order), threshold);
    }
  });
  // Plain loop rather than index_select: keeps this call free of any other parallel region.
  at::Tensor kept = at::empty({static_cast<int64_t>(keep.size())}, order.options());
  const int64_t* sorted_index = order.data_ptr<int64_t>();
  int64_t* out = kept.data_ptr<int64_t>();
  for (size_t k = 0; k < keep.size(); ++k) {
    out[k] = sorted_index[keep[k]];
  }
  return kept;
}

}  // namespace
}  // namespace pydetectron

TORCH_LIBRARY_IMPL(pydetectron, CPU, m) {
  m.impl("nms", &pydetectron::nms_cpu);
}
