// Where the bins and samples of a region of interest fall on a feature map, shared by the CPU and CUDA
// kernels of RoIAlign and RoIPool (host + device functions), so both backends compute the same positions.
// A RoI is 5 numbers [batch_index, x1, y1, x2, y2] in input-image pixels; spatial_scale maps them onto
// the feature map.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace pydetectron {
namespace roi {

// ---------------------------------------------------------------------------------------------------------
// RoIAlign: each output bin averages grid_h x grid_w bilinear samples placed at the centres of a regular
// sub-grid of the bin. aligned=false is Caffe2/Detectron's RoIAlign (box corners used as they are, box
// clamped to at least 1x1); aligned=true shifts by half a pixel and keeps the true (possibly empty) size.

template <typename T>
struct AlignRoi {
  int64_t batch;
  T start_y, start_x;  // top-left corner on the feature map
  T bin_h, bin_w;      // size of one output bin
  int grid_h, grid_w;  // samples per bin along each axis; <= 0 means none (empty aligned box)
  T count;             // the divisor of the average, >= 1
};

template <typename T, typename R>
C10_HOST_DEVICE inline AlignRoi<T> align_roi(
    const R* roi, T spatial_scale, int pooled_h, int pooled_w, int sampling_ratio, bool aligned) {
  const T offset = aligned ? T(0.5) : T(0);
  AlignRoi<T> r;
  r.batch = static_cast<int64_t>(roi[0]);
  r.start_x = static_cast<T>(roi[1]) * spatial_scale - offset;
  r.start_y = static_cast<T>(roi[2]) * spatial_scale - offset;
  T width = static_cast<T>(roi[3]) * spatial_scale - offset - r.start_x;
  T height = static_cast<T>(roi[4]) * spatial_scale - offset - r.start_y;
  if (!aligned) {
    width = width > T(1) ? width : T(1);
    height = height > T(1) ? height : T(1);
  }
  r.bin_h = height / static_cast<T>(pooled_h);
  r.bin_w = width / static_cast<T>(pooled_w);
  r.grid_h = sampling_ratio > 0 ? sampling_ratio : static_cast<int>(ceil(height / static_cast<T>(pooled_h)));
  r.grid_w = sampling_ratio > 0 ? sampling_ratio : static_cast<int>(ceil(width / static_cast<T>(pooled_w)));
  const int product = r.grid_h * r.grid_w;
  r.count = static_cast<T>(product > 1 ? product : 1);
  return r;
}

// Number of samples one bin of `r` really takes (0 for an empty aligned box).
template <typename T>
C10_HOST_DEVICE inline int samples_per_bin(const AlignRoi<T>& r) {
  return (r.grid_h > 0 ? r.grid_h : 0) * (r.grid_w > 0 ? r.grid_w : 0);
}

// Coordinate of sample `i` of bin `bin` along one axis.
template <typename T>
C10_HOST_DEVICE inline T sample_coord(T start, T bin_size, int bin, int i, int grid) {
  return start + static_cast<T>(bin) * bin_size +
      static_cast<T>(i + 0.5f) * bin_size / static_cast<T>(grid);
}

// Where one sample coordinate falls along an axis of `size` pixels: the two neighbouring pixels and their
// weights. Caffe2's boundary rules: a coordinate more than one pixel outside the map gives nothing;
// otherwise it is clamped onto the map, and on the last pixel it takes that pixel's value.
template <typename T>
struct AxisSample {
  int low, high;
  T w_low, w_high;
  bool inside;
};

template <typename T>
C10_HOST_DEVICE inline AxisSample<T> axis_sample(T v, int size) {
  AxisSample<T> a;
  a.inside = !(v < T(-1) || v > static_cast<T>(size));
  if (!a.inside) {
    a.low = a.high = 0;
    a.w_low = a.w_high = T(0);
    return a;
  }
  v = v <= T(0) ? T(0) : v;
  a.low = static_cast<int>(v);
  if (a.low >= size - 1) {
    a.high = a.low = size - 1;
    v = static_cast<T>(a.low);
  } else {
    a.high = a.low + 1;
  }
  a.w_high = v - static_cast<T>(a.low);
  a.w_low = T(1) - a.w_high;
  return a;
}

// One bilinear sample on an H x W plane: four flat offsets (y * W + x) and their weights, the products of
// the two axes' weights.
template <typename T>
struct Bilinear {
  int pos[4];
  T w[4];
  bool inside;  // false: the sample lies beyond the map and contributes nothing
};

template <typename T>
C10_HOST_DEVICE inline Bilinear<T> bilinear(T y, T x, int height, int width) {
  const AxisSample<T> ay = axis_sample(y, height), ax = axis_sample(x, width);
  Bilinear<T> s;
  s.inside = ay.inside && ax.inside;
  s.pos[0] = ay.low * width + ax.low;
  s.pos[1] = ay.low * width + ax.high;
  s.pos[2] = ay.high * width + ax.low;
  s.pos[3] = ay.high * width + ax.high;
  s.w[0] = ay.w_low * ax.w_low;
  s.w[1] = ay.w_low * ax.w_high;
  s.w[2] = ay.w_high * ax.w_low;
  s.w[3] = ay.w_high * ax.w_high;
  return s;
}

// Sample (iy, ix) of output bin (ph, pw).
template <typename T>
C10_HOST_DEVICE inline Bilinear<T> align_sample(
    const AlignRoi<T>& r, int ph, int pw, int iy, int ix, int height, int width) {
  return bilinear(
      sample_coord(r.start_y, r.bin_h, ph, iy, r.grid_h), sample_coord(r.start_x, r.bin_w, pw, ix, r.grid_w),
      height, width);
}

// ---------------------------------------------------------------------------------------------------------
// RoIPool (Caffe2): the box is rounded to whole pixels, split into floor/ceil bins, each clipped to the map;
// a bin's output is its maximum, an empty bin gives 0.

template <typename T>
struct PoolRoi {
  int64_t batch;
  int start_y, start_x;
  T bin_h, bin_w;
};

template <typename T, typename R>
C10_HOST_DEVICE inline PoolRoi<T> pool_roi(const R* roi, T spatial_scale, int pooled_h, int pooled_w) {
  PoolRoi<T> r;
  r.batch = static_cast<int64_t>(roi[0]);
  r.start_x = static_cast<int>(round(static_cast<T>(roi[1]) * spatial_scale));
  r.start_y = static_cast<int>(round(static_cast<T>(roi[2]) * spatial_scale));
  const int end_x = static_cast<int>(round(static_cast<T>(roi[3]) * spatial_scale));
  const int end_y = static_cast<int>(round(static_cast<T>(roi[4]) * spatial_scale));
  const int width = end_x - r.start_x + 1;
  const int height = end_y - r.start_y + 1;
  r.bin_w = static_cast<T>(width > 1 ? width : 1) / static_cast<T>(pooled_w);
  r.bin_h = static_cast<T>(height > 1 ? height : 1) / static_cast<T>(pooled_h);
  return r;
}

// Half-open pixel range [begin, end) of bin `bin` along one axis, clipped to [0, size).
struct Span {
  int begin, end;
  C10_HOST_DEVICE bool empty() const {
    return end <= begin;
  }
};

template <typename T>
C10_HOST_DEVICE inline Span pool_span(int start, T bin_size, int bin, int size) {
  int begin = static_cast<int>(floor(static_cast<T>(bin) * bin_size)) + start;
  int end = static_cast<int>(ceil(static_cast<T>(bin + 1) * bin_size)) + start;
  begin = begin < 0 ? 0 : (begin > size ? size : begin);
  end = end < 0 ? 0 : (end > size ? size : end);
  return Span{begin, end};
}

}  // namespace roi
}  // namespace pydetectron
