// Small helpers shared by the CUDA kernels of sam2_fast_ext.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>

namespace sam2_fast {

constexpr int kThreadsPerBlock = 256;

// Blocks for a grid-stride loop over `count` items: enough to fill the GPU, capped so huge maps loop instead.
inline unsigned int blocks_for(int64_t count) {
  return static_cast<unsigned int>(std::min<int64_t>((count + kThreadsPerBlock - 1) / kThreadsPerBlock, 65535 * 8));
}

// max that propagates NaN from either side, as torch's max-pool does.
template <typename T>
__device__ __forceinline__ T nan_max(T a, T b) {
  const float fa = static_cast<float>(a);
  const float fb = static_cast<float>(b);
  return (fa != fa || fa > fb) ? a : b;
}

}  // namespace sam2_fast
