// Small helpers shared by the CPU kernels of sam2_fast_ext.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

// Compiles a function twice, for AVX2 + FMA (x86-64-v3) and for the baseline ISA, picked when the library loads:
// the extension is built without -march flags so that it runs on any x86-64 CPU.
#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define SAM2_FAST_MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define SAM2_FAST_MULTIVERSION
#endif

namespace sam2_fast {

// One step of torch's max-pool scan: take `candidate` if it is larger or NaN, else keep `current` (so ties keep the
// earlier value and a NaN anywhere propagates).
template <typename T>
inline T pool_max(T current, T candidate) {
  const float value = static_cast<float>(candidate);
  return (value > static_cast<float>(current) || value != value) ? candidate : current;
}

// Max of a 2x2 window in torch's scan order: top-left, top-right, bottom-left, bottom-right.
template <typename T>
inline T pool_max4(T top_left, T top_right, T bottom_left, T bottom_right) {
  return pool_max(pool_max(pool_max(top_left, top_right), bottom_left), bottom_right);
}

// Grain size for at::parallel_for: enough items that each task touches about `min_elements` elements.
inline int64_t grain_for(int64_t elements_per_item, int64_t min_elements = 32768) {
  return std::max<int64_t>(1, min_elements / std::max<int64_t>(1, elements_per_item));
}

}  // namespace sam2_fast
