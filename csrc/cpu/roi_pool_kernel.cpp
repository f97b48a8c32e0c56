// RoIPool on the CPU with Caffe2/Detectron's semantics: rounded box, floor/ceil bins clipped to the map,
// max per bin (first maximum in row-major order), empty bin -> 0 with argmax -1. argmax holds the flat
// offset y * W + x of the maximum inside its (n, c) plane, as int32.
//
// The forward scans each bin over a planar (NCHW) map for few RoIs, and over a channels-last copy for many
// (every pixel then gives C contiguous values, compared with a vectorisable select). The backward adds each
// gradient to its argmax; tasks own channels and process one channel plane at a time, so the plane being
// written stays in cache and no two threads touch the same element.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cfloat>
#include <vector>

#include "cpu/roi_checks.h"
#include "cpu/roi_geometry.h"

namespace pydetectron {
namespace {

using roi::PoolRoi;
using roi::Span;

struct PoolParams {
  double spatial_scale;
  int pooled_h, pooled_w;
  int bins() const {
    return pooled_h * pooled_w;
  }
};

// A planar bin scan compares one value at a time along a row; the channels-last transpose streams every
// (pixel, channel) once. Measured here, the transpose pays off once the bins scan this many pixels per pixel
// of the map.
constexpr double kScannedPerPixelForChannelsLast = 1.0;

// The clipped bins of one RoI along both axes.
struct RoiBins {
  int64_t batch;
  std::vector<Span> rows, cols;
};

template <typename scalar_t>
void bins_of(const scalar_t* rois, int64_t k, const PoolParams& p, int height, int width, RoiBins& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const PoolRoi<acc_t> r =
      roi::pool_roi<acc_t>(rois + k * 5, static_cast<acc_t>(p.spatial_scale), p.pooled_h, p.pooled_w);
  out.batch = r.batch;
  out.rows.resize(p.pooled_h);
  out.cols.resize(p.pooled_w);
  for (int ph = 0; ph < p.pooled_h; ++ph) {
    out.rows[ph] = roi::pool_span(r.start_y, r.bin_h, ph, height);
  }
  for (int pw = 0; pw < p.pooled_w; ++pw) {
    out.cols[pw] = roi::pool_span(r.start_x, r.bin_w, pw, width);
  }
}

// Pixels all bins of all RoIs scan, per channel.
template <typename scalar_t>
int64_t scanned_pixels(const scalar_t* rois, int64_t num_rois, const PoolParams& p, int height, int width) {
  RoiBins bins;
  int64_t total = 0;
  for (int64_t k = 0; k < num_rois; ++k) {
    bins_of(rois, k, p, height, width, bins);
    int64_t rows = 0, cols = 0;
    for (const Span& s : bins.rows) {
      rows += s.empty() ? 0 : s.end - s.begin;
    }
    for (const Span& s : bins.cols) {
      cols += s.empty() ? 0 : s.end - s.begin;
    }
    total += rows * cols;
  }
  return total;
}

// The maximum a bin starts from (Caffe2's -FLT_MAX, also for double).
template <typename acc_t>
constexpr acc_t lowest_start() {
  return static_cast<acc_t>(-FLT_MAX);
}

template <typename scalar_t>
void forward_planes(
    const scalar_t* input, const scalar_t* rois, scalar_t* output, int32_t* argmax, int64_t num_rois,
    int64_t channels, int height, int width, const PoolParams& p) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t plane = static_cast<int64_t>(height) * width;
  at::parallel_for(0, num_rois * channels, 8, [&](int64_t begin, int64_t end) {
    RoiBins bins;
    int64_t current = -1;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t k = i / channels, c = i % channels;
      if (k != current) {
        bins_of(rois, k, p, height, width, bins);
        current = k;
      }
      const scalar_t* data = input + (bins.batch * channels + c) * plane;
      int64_t o = i * p.bins();
      for (const Span& rows : bins.rows) {
        for (const Span& cols : bins.cols) {
          const bool empty = rows.empty() || cols.empty();
          acc_t best = empty ? acc_t(0) : lowest_start<acc_t>();
          int32_t best_at = -1;
          for (int y = rows.begin; y < rows.end; ++y) {
            for (int x = cols.begin; x < cols.end; ++x) {
              const acc_t v = static_cast<acc_t>(data[y * width + x]);
              if (v > best) {
                best = v;
                best_at = y * width + x;
              }
            }
          }
          output[o] = static_cast<scalar_t>(best);
          argmax[o] = best_at;
          ++o;
        }
      }
    }
  });
}

// input is (N, H, W, C) in memory.
template <typename scalar_t>
void forward_channels_last(
    const scalar_t* input, const scalar_t* rois, scalar_t* output, int32_t* argmax, int64_t num_rois,
    int64_t channels, int height, int width, const PoolParams& p) {
  using acc_t = at::opmath_type<scalar_t>;
  const int bins_per_roi = p.bins();
  const int64_t image = static_cast<int64_t>(height) * width * channels;
  at::parallel_for(0, num_rois, 1, [&](int64_t begin, int64_t end) {
    RoiBins bins;
    std::vector<acc_t> best_values(channels);
    std::vector<int32_t> best_places(channels);
    acc_t* __restrict__ best = best_values.data();
    int32_t* __restrict__ best_at = best_places.data();
    for (int64_t k = begin; k < end; ++k) {
      bins_of(rois, k, p, height, width, bins);
      const scalar_t* data = input + bins.batch * image;
      int b = 0;
      for (const Span& rows : bins.rows) {
        for (const Span& cols : bins.cols) {
          const bool empty = rows.empty() || cols.empty();
          std::fill(best_values.begin(), best_values.end(), empty ? acc_t(0) : lowest_start<acc_t>());
          std::fill(best_places.begin(), best_places.end(), -1);
          for (int y = rows.begin; y < rows.end; ++y) {
            for (int x = cols.begin; x < cols.end; ++x) {
              const int32_t place = y * width + x;
              const scalar_t* __restrict__ v = data + static_cast<int64_t>(place) * channels;
              for (int64_t c = 0; c < channels; ++c) {
                // Written as a select and a bit mask, without branches, so the compiler vectorises it.
                const acc_t value = static_cast<acc_t>(v[c]), old = best[c];
                const int32_t greater = -static_cast<int32_t>(value > old);
                best[c] = value > old ? value : old;
                best_at[c] = (place & greater) | (best_at[c] & ~greater);
              }
            }
          }
          const int64_t o = k * channels * bins_per_roi + b;
          for (int64_t c = 0; c < channels; ++c) {
            output[o + c * bins_per_roi] = static_cast<scalar_t>(best[c]);
            argmax[o + c * bins_per_roi] = best_at[c];
          }
          ++b;
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> roi_pool_forward_cpu(
    const at::Tensor& input, const at::Tensor& rois, double spatial_scale, int64_t pooled_height,
    int64_t pooled_width) {
  roi::check_forward_args("roi_pool_forward", input, rois, pooled_height, pooled_width);
  const PoolParams p{spatial_scale, static_cast<int>(pooled_height), static_cast<int>(pooled_width)};
  const int64_t num_rois = rois.size(0), batch = input.size(0), channels = input.size(1);
  const int height = static_cast<int>(input.size(2)), width = static_cast<int>(input.size(3));
  at::Tensor output = at::empty({num_rois, channels, pooled_height, pooled_width}, input.options());
  at::Tensor argmax = at::empty(output.sizes(), input.options().dtype(at::kInt));
  if (output.numel() == 0) {
    return {output, argmax};
  }
  const at::Tensor rois_c = rois.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "roi_pool_forward_cpu", [&] {
    const scalar_t* r = rois_c.data_ptr<scalar_t>();
    const bool already_last = input.is_contiguous(at::MemoryFormat::ChannelsLast) && !input.is_contiguous();
    const bool last = already_last ||
        scanned_pixels(r, num_rois, p, height, width) >= kScannedPerPixelForChannelsLast * batch * height * width;
    const at::Tensor in = input.contiguous(last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
    const auto run = last ? forward_channels_last<scalar_t> : forward_planes<scalar_t>;
    run(in.data_ptr<scalar_t>(), r, output.data_ptr<scalar_t>(), argmax.data_ptr<int32_t>(), num_rois, channels,
        height, width, p);
  });
  return {output, argmax};
}

// grad_input: uninitialised (N, C, H, W) planes of acc_t. Threads own channels; each zeroes a channel's
// planes and adds every RoI's gradients into them while they are in cache.
template <typename scalar_t, typename acc_t>
void backward_planes(
    const scalar_t* grad, const int32_t* argmax, const std::vector<int64_t>& batch_of, acc_t* grad_input,
    int64_t batch, int64_t channels, int64_t plane, int bins) {
  const int64_t num_rois = static_cast<int64_t>(batch_of.size());
  at::parallel_for(0, channels, 1, [&](int64_t c_begin, int64_t c_end) {
    for (int64_t c = c_begin; c < c_end; ++c) {
      for (int64_t n = 0; n < batch; ++n) {
        std::fill_n(grad_input + (n * channels + c) * plane, plane, acc_t(0));
      }
      for (int64_t k = 0; k < num_rois; ++k) {
        acc_t* data = grad_input + (batch_of[k] * channels + c) * plane;
        const int64_t o = (k * channels + c) * bins;
        for (int b = 0; b < bins; ++b) {
          const int32_t place = argmax[o + b];
          if (place >= 0) {
            data[place] += static_cast<acc_t>(grad[o + b]);
          }
        }
      }
    }
  });
}

at::Tensor roi_pool_backward_cpu(
    const at::Tensor& grad, const at::Tensor& rois, const at::Tensor& argmax, double spatial_scale,
    int64_t pooled_height, int64_t pooled_width, int64_t batch_size, int64_t channels, int64_t height,
    int64_t width) {
  (void)spatial_scale;  // the argmax already says where each gradient goes
  roi::check_backward_args(
      "roi_pool_backward", grad, rois, pooled_height, pooled_width, batch_size, channels, height, width);
  roi::check_pool_argmax("roi_pool_backward", argmax, grad, height, width);
  const int64_t num_rois = rois.size(0);
  const at::Tensor grad_c = grad.contiguous(), argmax_c = argmax.contiguous();
  const at::Tensor batch_index = rois.select(1, 0).to(at::kLong).contiguous();
  const std::vector<int64_t> batch_of(batch_index.data_ptr<int64_t>(), batch_index.data_ptr<int64_t>() + num_rois);
  at::Tensor result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "roi_pool_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // Left uninitialised: the kernel zeroes it in parallel, each thread its own channels.
    at::Tensor acc = at::empty({batch_size, channels, height, width},
                               grad.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    backward_planes(grad_c.data_ptr<scalar_t>(), argmax_c.data_ptr<int32_t>(), batch_of, acc.data_ptr<acc_t>(),
                    batch_size, channels, height * width, static_cast<int>(pooled_height * pooled_width));
    result = acc.to(grad.scalar_type());
  });
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(pydetectron, CPU, m) {
  m.impl("roi_pool_forward", &roi_pool_forward_cpu);
  m.impl("roi_pool_backward", &roi_pool_backward_cpu);
}

}  // namespace pydetectron
