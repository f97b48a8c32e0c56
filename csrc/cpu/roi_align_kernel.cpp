// RoIAlign on the CPU: Caffe2/Detectron's op (aligned=false) and detectron2's half-pixel variant (aligned=true).
//
// Two memory layouts, picked per call by a cost estimate (prefer_channels_last):
//  * planes (NCHW): threads own channels and sweep them block of RoIs by block; a block's bilinear sample
//    geometry is computed once and reused for every channel, and a channel plane stays in cache while the
//    block's RoIs read it (forward) or add into it (backward), so no two threads touch the same element.
//  * channels-last (NHWC), for dense RoIs or an input that already is channels-last: after one transpose
//    of the map every sample touches C contiguous values, so the inner loop is a vectorisable axpy over
//    channels. The backward gives each thread its own block of channels.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "cpu/roi_checks.h"
#include "cpu/roi_geometry.h"

namespace pydetectron {
namespace {

using roi::AlignRoi;
using roi::Bilinear;

struct AlignParams {
  double spatial_scale;
  int pooled_h, pooled_w, sampling_ratio;
  bool aligned;
  int bins() const {
    return pooled_h * pooled_w;
  }
};

// Channels handled by one backward task: a multiple of a 64-byte cache line of floats, so two threads never
// write the same line of the channels-last gradient.
constexpr int64_t kChannelBlock = 16;

// The channels-last kernels first pay a transpose of the whole map (and, in the backward, a transpose of
// the gradient back), then run vectorised over channels; the planar kernels pay per sample. Measured on
// 1x256x200x304 with 7x7 bins and 2x2 samples (ms of CPU time, planar vs channels-last), at 1.65 samples per
// map pixel (512 RoIs): forward 88 vs 78, backward 156 vs 191; at 6.4 (2000 RoIs): forward 448 vs 227,
// backward 563 vs 415. Hence these break-even densities.
constexpr double kForwardSamplesPerPixelForChannelsLast = 1.5;
constexpr double kBackwardSamplesPerPixelForChannelsLast = 4.0;

template <typename acc_t, typename scalar_t>
AlignRoi<acc_t> roi_at(const scalar_t* rois, int64_t k, const AlignParams& p) {
  return roi::align_roi<acc_t>(
      rois + k * 5, static_cast<acc_t>(p.spatial_scale), p.pooled_h, p.pooled_w, p.sampling_ratio, p.aligned);
}

// RoIs handled together while a thread sweeps its channels: their sample geometry (~16 bytes per sample
// row or column) stays in cache next to the channel plane being read or written.
constexpr int64_t kRoiBlock = 256;

// The bilinear sample geometry of a block of RoIs, axis by axis (a bin's samples are the grid of its
// rows x columns): RoI j's sample rows start at ys[y_first[j]], grid_h of them per output row, and
// likewise for columns. Computed once per block and reused for every channel.
template <typename acc_t>
struct RoiBlock {
  std::vector<AlignRoi<acc_t>> rois;
  std::vector<roi::AxisSample<acc_t>> ys, xs;
  std::vector<int64_t> y_first, x_first;

  template <typename scalar_t>
  void fill(const scalar_t* boxes, int64_t k0, int64_t k1, const AlignParams& p, int height, int width) {
    rois.clear();
    ys.clear();
    xs.clear();
    y_first.clear();
    x_first.clear();
    for (int64_t k = k0; k < k1; ++k) {
      const AlignRoi<acc_t> r = roi_at<acc_t>(boxes, k, p);
      rois.push_back(r);
      y_first.push_back(static_cast<int64_t>(ys.size()));
      x_first.push_back(static_cast<int64_t>(xs.size()));
      for (int ph = 0; ph < p.pooled_h; ++ph) {
        for (int iy = 0; iy < r.grid_h; ++iy) {
          ys.push_back(roi::axis_sample(roi::sample_coord(r.start_y, r.bin_h, ph, iy, r.grid_h), height));
        }
      }
      for (int pw = 0; pw < p.pooled_w; ++pw) {
        for (int ix = 0; ix < r.grid_w; ++ix) {
          xs.push_back(roi::axis_sample(roi::sample_coord(r.start_x, r.bin_w, pw, ix, r.grid_w), width));
        }
      }
    }
  }
};

template <typename scalar_t>
bool prefer_channels_last(
    const scalar_t* rois, int64_t num_rois, const AlignParams& p, int64_t batch, int64_t height, int64_t width,
    double samples_per_pixel) {
  using acc_t = at::opmath_type<scalar_t>;
  int64_t samples = 0;
  for (int64_t k = 0; k < num_rois; ++k) {
    samples += static_cast<int64_t>(p.bins()) * roi::samples_per_bin(roi_at<acc_t>(rois, k, p));
  }
  return static_cast<double>(samples) >= samples_per_pixel * batch * height * width;
}

// ----------------------------------------------------------------------------------------------- forward

// Threads own channels; each sweeps its channels block of RoIs by block, so a channel plane is read for
// many RoIs while it is in cache.
template <typename scalar_t>
void forward_planes(
    const scalar_t* input, const scalar_t* rois, scalar_t* output, int64_t num_rois, int64_t channels, int height,
    int width, const AlignParams& p) {
  using acc_t = at::opmath_type<scalar_t>;
  const int bins = p.bins();
  const int64_t plane = static_cast<int64_t>(height) * width;
  at::parallel_for(0, channels, 1, [&](int64_t c_begin, int64_t c_end) {
    RoiBlock<acc_t> block;
    for (int64_t k0 = 0; k0 < num_rois; k0 += kRoiBlock) {
      const int64_t k1 = std::min(num_rois, k0 + kRoiBlock);
      block.fill(rois, k0, k1, p, height, width);
      for (int64_t c = c_begin; c < c_end; ++c) {
        for (int64_t k = k0; k < k1; ++k) {
          const AlignRoi<acc_t>& r = block.rois[k - k0];
          const roi::AxisSample<acc_t>* ys = block.ys.data() + block.y_first[k - k0];
          const roi::AxisSample<acc_t>* xs = block.xs.data() + block.x_first[k - k0];
          const scalar_t* data = input + (r.batch * channels + c) * plane;
          scalar_t* out = output + (k * channels + c) * bins;
          for (int ph = 0; ph < p.pooled_h; ++ph) {
            for (int pw = 0; pw < p.pooled_w; ++pw) {
              acc_t sum = 0;
              for (int iy = 0; iy < r.grid_h; ++iy) {
                const roi::AxisSample<acc_t>& ay = ys[ph * r.grid_h + iy];
                if (!ay.inside) {
                  continue;
                }
                const scalar_t* low = data + static_cast<int64_t>(ay.low) * width;
                const scalar_t* high = data + static_cast<int64_t>(ay.high) * width;
                for (int ix = 0; ix < r.grid_w; ++ix) {
                  const roi::AxisSample<acc_t>& ax = xs[pw * r.grid_w + ix];
                  if (!ax.inside) {
                    continue;
                  }
                  sum += ay.w_low * ax.w_low * static_cast<acc_t>(low[ax.low]) +
                      ay.w_low * ax.w_high * static_cast<acc_t>(low[ax.high]) +
                      ay.w_high * ax.w_low * static_cast<acc_t>(high[ax.low]) +
                      ay.w_high * ax.w_high * static_cast<acc_t>(high[ax.high]);
                }
              }
              out[ph * p.pooled_w + pw] = static_cast<scalar_t>(sum / r.count);
            }
          }
        }
      }
    }
  });
}

// input is (N, H, W, C) in memory.
template <typename scalar_t>
void forward_channels_last(
    const scalar_t* input, const scalar_t* rois, scalar_t* output, int64_t num_rois, int64_t channels, int height,
    int width, const AlignParams& p) {
  using acc_t = at::opmath_type<scalar_t>;
  const int bins = p.bins();
  const int64_t image = static_cast<int64_t>(height) * width * channels;
  at::parallel_for(0, num_rois * bins, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sum(channels);
    acc_t* __restrict__ acc = sum.data();
    for (int64_t i = begin; i < end; ++i) {
      const int64_t k = i / bins;
      const int b = static_cast<int>(i % bins), ph = b / p.pooled_w, pw = b % p.pooled_w;
      const AlignRoi<acc_t> r = roi_at<acc_t>(rois, k, p);
      const scalar_t* data = input + r.batch * image;
      std::fill(sum.begin(), sum.end(), acc_t(0));
      for (int iy = 0; iy < r.grid_h; ++iy) {
        for (int ix = 0; ix < r.grid_w; ++ix) {
          const Bilinear<acc_t> s = roi::align_sample(r, ph, pw, iy, ix, height, width);
          if (!s.inside) {
            continue;
          }
          const scalar_t* __restrict__ v0 = data + s.pos[0] * channels;
          const scalar_t* __restrict__ v1 = data + s.pos[1] * channels;
          const scalar_t* __restrict__ v2 = data + s.pos[2] * channels;
          const scalar_t* __restrict__ v3 = data + s.pos[3] * channels;
          for (int64_t c = 0; c < channels; ++c) {
            acc[c] += s.w[0] * static_cast<acc_t>(v0[c]) + s.w[1] * static_cast<acc_t>(v1[c]) +
                s.w[2] * static_cast<acc_t>(v2[c]) + s.w[3] * static_cast<acc_t>(v3[c]);
          }
        }
      }
      scalar_t* out = output + k * channels * bins + b;
      for (int64_t c = 0; c < channels; ++c) {
        out[c * bins] = static_cast<scalar_t>(acc[c] / r.count);
      }
    }
  });
}

at::Tensor roi_align_forward_cpu(
    const at::Tensor& input, const at::Tensor& rois, double spatial_scale, int64_t pooled_height,
    int64_t pooled_width, int64_t sampling_ratio, bool aligned) {
  roi::check_forward_args("roi_align_forward", input, rois, pooled_height, pooled_width);
  TORCH_CHECK(sampling_ratio >= 0, "roi_align_forward: sampling_ratio must be >= 0 (0 = adaptive), got ",
              sampling_ratio);
  const AlignParams p{spatial_scale, static_cast<int>(pooled_height), static_cast<int>(pooled_width),
                      static_cast<int>(sampling_ratio), aligned};
  const int64_t num_rois = rois.size(0), batch = input.size(0), channels = input.size(1);
  const int height = static_cast<int>(input.size(2)), width = static_cast<int>(input.size(3));
  at::Tensor output = at::empty({num_rois, channels, pooled_height, pooled_width}, input.options());
  if (output.numel() == 0) {
    return output;
  }
  const at::Tensor rois_c = rois.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "roi_align_forward_cpu", [&] {
    const scalar_t* r = rois_c.data_ptr<scalar_t>();
    const bool already_last = input.is_contiguous(at::MemoryFormat::ChannelsLast) && !input.is_contiguous();
    if (already_last ||
        prefer_channels_last(r, num_rois, p, batch, height, width, kForwardSamplesPerPixelForChannelsLast)) {
      const at::Tensor in = input.contiguous(at::MemoryFormat::ChannelsLast);
      forward_channels_last(in.data_ptr<scalar_t>(), r, output.data_ptr<scalar_t>(), num_rois, channels, height,
                            width, p);
    } else {
      const at::Tensor in = input.contiguous();
      forward_planes(in.data_ptr<scalar_t>(), r, output.data_ptr<scalar_t>(), num_rois, channels, height, width, p);
    }
  });
  return output;
}

// ---------------------------------------------------------------------------------------------- backward

// grad_input: uninitialised (N, C, H, W) planes of acc_t. Threads own channels (no two write the same
// element): each zeroes its planes, then sweeps them block of RoIs by block, so the plane being written
// stays in cache.
template <typename scalar_t, typename acc_t>
void backward_planes(
    const scalar_t* grad, const scalar_t* rois, acc_t* grad_input, int64_t num_rois, int64_t batch,
    int64_t channels, int height, int width, const AlignParams& p) {
  const int bins = p.bins();
  const int64_t plane = static_cast<int64_t>(height) * width;
  at::parallel_for(0, channels, 1, [&](int64_t c_begin, int64_t c_end) {
    for (int64_t n = 0; n < batch; ++n) {
      std::fill_n(grad_input + (n * channels + c_begin) * plane, (c_end - c_begin) * plane, acc_t(0));
    }
    RoiBlock<acc_t> block;
    for (int64_t k0 = 0; k0 < num_rois; k0 += kRoiBlock) {
      const int64_t k1 = std::min(num_rois, k0 + kRoiBlock);
      block.fill(rois, k0, k1, p, height, width);
      for (int64_t c = c_begin; c < c_end; ++c) {
        for (int64_t k = k0; k < k1; ++k) {
          const AlignRoi<acc_t>& r = block.rois[k - k0];
          const roi::AxisSample<acc_t>* ys = block.ys.data() + block.y_first[k - k0];
          const roi::AxisSample<acc_t>* xs = block.xs.data() + block.x_first[k - k0];
          acc_t* data = grad_input + (r.batch * channels + c) * plane;
          const scalar_t* g = grad + (k * channels + c) * bins;
          for (int ph = 0; ph < p.pooled_h; ++ph) {
            for (int pw = 0; pw < p.pooled_w; ++pw) {
              const acc_t share = static_cast<acc_t>(g[ph * p.pooled_w + pw]) / r.count;
              for (int iy = 0; iy < r.grid_h; ++iy) {
                const roi::AxisSample<acc_t>& ay = ys[ph * r.grid_h + iy];
                if (!ay.inside) {
                  continue;
                }
                acc_t* low = data + static_cast<int64_t>(ay.low) * width;
                acc_t* high = data + static_cast<int64_t>(ay.high) * width;
                for (int ix = 0; ix < r.grid_w; ++ix) {
                  const roi::AxisSample<acc_t>& ax = xs[pw * r.grid_w + ix];
                  if (!ax.inside) {
                    continue;
                  }
                  low[ax.low] += ay.w_low * ax.w_low * share;
                  low[ax.high] += ay.w_low * ax.w_high * share;
                  high[ax.low] += ay.w_high * ax.w_low * share;
                  high[ax.high] += ay.w_high * ax.w_high * share;
                }
              }
            }
          }
        }
      }
    }
  });
}

// grad_input: uninitialised (N, H, W, C) of acc_t in memory; each task owns blocks of kChannelBlock
// channels, which it zeroes and then adds into.
template <typename scalar_t, typename acc_t>
void backward_channels_last(
    const scalar_t* grad, const scalar_t* rois, acc_t* grad_input, int64_t num_rois, int64_t batch,
    int64_t channels, int height, int width, const AlignParams& p) {
  const int bins = p.bins();
  const int64_t pixels = static_cast<int64_t>(height) * width, image = pixels * channels;
  const int64_t blocks = (channels + kChannelBlock - 1) / kChannelBlock;
  at::parallel_for(0, blocks, 1, [&](int64_t block_begin, int64_t block_end) {
    const int64_t c0 = block_begin * kChannelBlock, nc = std::min(block_end * kChannelBlock, channels) - c0;
    for (int64_t pixel = 0; pixel < batch * pixels; ++pixel) {
      std::fill_n(grad_input + pixel * channels + c0, nc, acc_t(0));
    }
    std::vector<acc_t> shares(nc);
    acc_t* __restrict__ share = shares.data();
    for (int64_t k = 0; k < num_rois; ++k) {
      const AlignRoi<acc_t> r = roi_at<acc_t>(rois, k, p);
      acc_t* data = grad_input + r.batch * image + c0;
      for (int b = 0; b < bins; ++b) {
        const int ph = b / p.pooled_w, pw = b % p.pooled_w;
        const scalar_t* g = grad + (k * channels + c0) * bins + b;
        for (int64_t c = 0; c < nc; ++c) {
          share[c] = static_cast<acc_t>(g[c * bins]) / r.count;
        }
        for (int iy = 0; iy < r.grid_h; ++iy) {
          for (int ix = 0; ix < r.grid_w; ++ix) {
            const Bilinear<acc_t> s = roi::align_sample(r, ph, pw, iy, ix, height, width);
            if (!s.inside) {
              continue;
            }
            for (int q = 0; q < 4; ++q) {
              acc_t* __restrict__ row = data + s.pos[q] * channels;
              const acc_t w = s.w[q];
              for (int64_t c = 0; c < nc; ++c) {
                row[c] += w * share[c];
              }
            }
          }
        }
      }
    }
  });
}

at::Tensor roi_align_backward_cpu(
    const at::Tensor& grad, const at::Tensor& rois, double spatial_scale, int64_t pooled_height,
    int64_t pooled_width, int64_t batch_size, int64_t channels, int64_t height, int64_t width,
    int64_t sampling_ratio, bool aligned) {
  roi::check_backward_args(
      "roi_align_backward", grad, rois, pooled_height, pooled_width, batch_size, channels, height, width);
  TORCH_CHECK(sampling_ratio >= 0, "roi_align_backward: sampling_ratio must be >= 0 (0 = adaptive), got ",
              sampling_ratio);
  const AlignParams p{spatial_scale, static_cast<int>(pooled_height), static_cast<int>(pooled_width),
                      static_cast<int>(sampling_ratio), aligned};
  const int64_t num_rois = rois.size(0);
  const at::Tensor grad_c = grad.contiguous(), rois_c = rois.contiguous();
  at::Tensor result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "roi_align_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* r = rois_c.data_ptr<scalar_t>();
    const bool last =
        prefer_channels_last(r, num_rois, p, batch_size, height, width, kBackwardSamplesPerPixelForChannelsLast);
    const auto format = last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
    // Left uninitialised: the kernels zero it in parallel, each thread the part it owns.
    at::Tensor acc = at::empty({batch_size, channels, height, width},
                               grad.options().dtype(c10::CppTypeToScalarType<acc_t>::value), format);
    const auto run = last ? backward_channels_last<scalar_t, acc_t> : backward_planes<scalar_t, acc_t>;
    run(grad_c.data_ptr<scalar_t>(), r, acc.data_ptr<acc_t>(), num_rois, batch_size, channels,
        static_cast<int>(height), static_cast<int>(width), p);
    result = acc.to(grad.scalar_type()).contiguous();
  });
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(pydetectron, CPU, m) {
  m.impl("roi_align_forward", &roi_align_forward_cpu);
  m.impl("roi_align_backward", &roi_align_backward_cpu);
}

}  // namespace pydetectron
