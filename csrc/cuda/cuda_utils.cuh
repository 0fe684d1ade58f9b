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

// One step of torch's max-pool scan: take `candidate` if it is larger or NaN, else keep `current` (so ties keep the
// earlier value and a NaN anywhere propagates).
template <typename T>
__device__ __forceinline__ T pool_max(T current, T candidate) {
  const float value = static_cast<float>(candidate);
  return (value > static_cast<float>(current) || value != value) ? candidate : current;
}

}  // namespace sam2_fast
