// Launch shape shared by the RoIAlign / RoIPool CUDA kernels: one thread per element, grid-stride loops.
#pragma once

#include <algorithm>
#include <cstdint>

namespace pydetectron {
namespace roi {

constexpr int kThreadsPerBlock = 256;

// Enough blocks to give every element a thread, capped so huge tensors loop inside the kernel instead.
inline unsigned int blocks_for(int64_t elements) {
  const int64_t needed = (elements + kThreadsPerBlock - 1) / kThreadsPerBlock;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(needed, 65535)));
}

}  // namespace roi
}  // namespace pydetectron
