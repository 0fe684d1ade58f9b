// Small helpers shared by the CUDA kernels of sam2_fast_ext.
#pragma once

#include <ATen/cuda/detail/KernelUtils.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <utility>

namespace sam2_fast {

constexpr int kThreadsPerBlock = 256;

// Blocks for a grid-stride loop over `count` items: enough to fill the GPU, capped so huge maps loop instead.
inline unsigned int blocks_for(int64_t count) {
  return static_cast<unsigned int>(std::min<int64_t>((count + kThreadsPerBlock - 1) / kThreadsPerBlock, 65535 * 8));
}

// Launches a one-thread-per-item kernel over `count` items on the current stream and checks the launch. The kernel
// walks its items with CUDA_KERNEL_LOOP_TYPE(index, count, int64_t) (a grid-stride loop), so any count fits the grid.
template <typename... KernelArgs, typename... Args>
void launch_per_item(void (*kernel)(KernelArgs...), int64_t count, Args&&... args) {
  kernel<<<blocks_for(count), kThreadsPerBlock, 0, c10::cuda::getCurrentCUDAStream()>>>(std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// One step of torch's max-pool scan: take `candidate` if it is larger or NaN, else keep `current` (so ties keep the
// earlier value and a NaN anywhere propagates).
template <typename T>
__device__ __forceinline__ T pool_max(T current, T candidate) {
  const float value = static_cast<float>(candidate);
  return (value > static_cast<float>(current) || value != value) ? candidate : current;
}

}  // namespace sam2_fast
