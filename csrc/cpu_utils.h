// Small helpers shared by the CPU kernels of sam2_fast_ext.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

namespace sam2_fast {

// max that propagates NaN from either side, as torch's max-pool and amax do.
template <typename T>
inline T nan_max(T a, T b) {
  const float fa = static_cast<float>(a);
  const float fb = static_cast<float>(b);
  return (fa != fa || fa > fb) ? a : b;
}

// Grain size for at::parallel_for: enough items that each task touches about `min_elements` elements.
inline int64_t grain_for(int64_t elements_per_item, int64_t min_elements = 32768) {
  return std::max<int64_t>(1, min_elements / std::max<int64_t>(1, elements_per_item));
}

}  // namespace sam2_fast
