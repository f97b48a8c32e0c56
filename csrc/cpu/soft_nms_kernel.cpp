// Soft-NMS (Bodla et al., 2017) on CPU, step for step as Detectron's utils/cython_nms.pyx soft_nms.
//
// Detectron's algorithm works in place on an array of boxes: at step i it swaps the first highest-scoring
// box of [i, n) into slot i, then decays the score of every later box that overlaps it (linear: by
// 1 - IoU when IoU > iou_threshold; gaussian: by exp(-IoU^2 / sigma); hard: to 0 when IoU > iou_threshold).
// A decayed box whose score drops below score_threshold is replaced by the current last box, which is
// examined in its place, and n shrinks. Only boxes that overlap the selected one are decayed or dropped,
// so a box with an initial score below score_threshold survives unless something overlaps it.
// The survivors' original indices and final scores are returned in slot order, which is Detectron's.
//
// The arithmetic is Detectron's too: everything in the input precision with inclusive (+1) widths when
// legacy_plus_one, except the gaussian exp, which Detectron evaluates in double (np.exp) and rounds back.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <numeric>
#include <tuple>
#include <utility>
#include <vector>

namespace pydetectron {
namespace {

// Detectron's TEST.SOFT_NMS.METHOD codes (box_utils.soft_nms).
enum Method : int64_t { kHard = 0, kLinear = 1, kGaussian = 2 };

template <typename T>
struct Work {
  std::vector<T> x1, y1, x2, y2, score;
  std::vector<int64_t> index;

  void move(int64_t to, int64_t from) {
    x1[to] = x1[from];
    y1[to] = y1[from];
    x2[to] = x2[from];
    y2[to] = y2[from];
    score[to] = score[from];
    index[to] = index[from];
  }
  void swap(int64_t a, int64_t b) {
    std::swap(x1[a], x1[b]);
    std::swap(y1[a], y1[b]);
    std::swap(x2[a], x2[b]);
    std::swap(y2[a], y2[b]);
    std::swap(score[a], score[b]);
    std::swap(index[a], index[b]);
  }
};

// Detectron's float max/min helpers: on ties (and NaN) they return the first argument.
template <typename T>
T first_max(T a, T b) {
  return a >= b ? a : b;
}
template <typename T>
T first_min(T a, T b) {
  return a <= b ? a : b;
}

template <typename T>
T decay_weight(T iou, int64_t method, T iou_threshold, T sigma) {
  switch (method) {
    case kLinear:
      return iou > iou_threshold ? T(1) - iou : T(1);
    case kGaussian:
      return static_cast<T>(std::exp(static_cast<double>(-(iou * iou) / sigma)));
    default:
      return iou > iou_threshold ? T(0) : T(1);
  }
}

template <typename T>
std::tuple<at::Tensor, at::Tensor> soft_nms_impl(const at::Tensor& boxes, const at::Tensor& scores, T sigma,
                                                 T iou_threshold, T score_threshold, int64_t method, T one) {
  int64_t n = boxes.size(0);
  const auto b = boxes.accessor<T, 2>();
  const auto s = scores.accessor<T, 1>();
  Work<T> w;
  for (auto* v : {&w.x1, &w.y1, &w.x2, &w.y2, &w.score}) {
    v->resize(n);
  }
  w.index.resize(n);
  std::iota(w.index.begin(), w.index.end(), int64_t{0});
  for (int64_t k = 0; k < n; ++k) {
    w.x1[k] = b[k][0];
    w.y1[k] = b[k][1];
    w.x2[k] = b[k][2];
    w.y2[k] = b[k][3];
    w.score[k] = s[k];
  }

  for (int64_t i = 0; i < n; ++i) {
    int64_t best = i;
    for (int64_t p = i + 1; p < n; ++p) {
      if (w.score[best] < w.score[p]) {
        best = p;
      }
    }
    w.swap(i, best);
    const T tx1 = w.x1[i], ty1 = w.y1[i], tx2 = w.x2[i], ty2 = w.y2[i];
    const T tarea = (tx2 - tx1 + one) * (ty2 - ty1 + one);
    for (int64_t p = i + 1; p < n; ++p) {
      const T iw = first_min(tx2, w.x2[p]) - first_max(tx1, w.x1[p]) + one;
      if (!(iw > T(0))) {
        continue;
      }
      const T ih = first_min(ty2, w.y2[p]) - first_max(ty1, w.y1[p]) + one;
      if (!(ih > T(0))) {
        continue;
      }
      const T area = (w.x2[p] - w.x1[p] + one) * (w.y2[p] - w.y1[p] + one);
      const T inter = iw * ih;
      const T iou = inter / (tarea + area - inter);
      w.score[p] = decay_weight(iou, method, iou_threshold, sigma) * w.score[p];
      if (w.score[p] < score_threshold) {
        w.move(p, n - 1);
        --n;
        --p;  // examine the box just moved here
      }
    }
  }

  const auto long_opts = boxes.options().dtype(at::kLong);
  at::Tensor keep = at::empty({n}, long_opts);
  at::Tensor new_scores = at::empty({n}, scores.options());
  std::copy(w.index.begin(), w.index.begin() + n, keep.data_ptr<int64_t>());
  std::copy(w.score.begin(), w.score.begin() + n, new_scores.data_ptr<T>());
  return {keep, new_scores};
}

std::tuple<at::Tensor, at::Tensor> soft_nms_cpu(const at::Tensor& boxes, const at::Tensor& scores, double sigma,
                                                double iou_threshold, double score_threshold, int64_t method,
                                                bool legacy_plus_one) {
  TORCH_CHECK(boxes.device().is_cpu() && scores.device().is_cpu(),
              "soft_nms_cpu: boxes and scores must be CPU tensors");
  TORCH_CHECK(boxes.dim() == 2 && boxes.size(1) == 4, "soft_nms: boxes must have shape (N, 4), got ",
              boxes.sizes());
  TORCH_CHECK(scores.dim() == 1 && scores.size(0) == boxes.size(0),
              "soft_nms: scores must have shape (N,) with N = boxes.size(0), got ", scores.sizes());
  TORCH_CHECK(boxes.scalar_type() == scores.scalar_type(), "soft_nms: boxes and scores must have the same dtype");
  TORCH_CHECK(method == kHard || method == kLinear || method == kGaussian,
              "soft_nms: method must be 0 (hard), 1 (linear) or 2 (gaussian), got ", method);
  TORCH_CHECK(method != kGaussian || sigma > 0, "soft_nms: gaussian sigma must be > 0, got ", sigma);
  std::tuple<at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(boxes.scalar_type(), "soft_nms_cpu", [&] {
    out = soft_nms_impl<scalar_t>(boxes, scores, static_cast<scalar_t>(sigma),
                                  static_cast<scalar_t>(iou_threshold), static_cast<scalar_t>(score_threshold),
                                  method, legacy_plus_one ? scalar_t(1) : scalar_t(0));
  });
  return out;
}

}  // namespace
}  // namespace pydetectron

TORCH_LIBRARY_IMPL(pydetectron, CPU, m) {
  m.impl("soft_nms", &pydetectron::soft_nms_cpu);
}
