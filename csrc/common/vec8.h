// An 8-float vector type (GCC/Clang vector extensions) and its helpers, for CPU kernels that vectorize without
// -ffast-math or -march flags: each function that uses them is compiled per ISA with SAM2_FAST_MULTIVERSION.
#pragma once

#include <cstdint>
#include <cstring>

// The vector types only live inside the extension, so the ABI note on passing them by value does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

// Helpers are forced inline so that they are compiled into each target clone of their caller (an out-of-line copy
// would be baseline-ISA code with its vectors in memory).
#define SAM2_FAST_INLINE inline __attribute__((always_inline))

namespace sam2_fast {

typedef float vec8 __attribute__((vector_size(32)));
typedef int32_t ivec8 __attribute__((vector_size(32)));
constexpr int64_t kLanes = 8;

SAM2_FAST_INLINE vec8 load(const float* p) {
  vec8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

SAM2_FAST_INLINE void store(float* p, vec8 v) { std::memcpy(p, &v, sizeof(v)); }

// The first `count` (< kLanes) values at p, the other lanes zero; and their store back.
SAM2_FAST_INLINE vec8 load_partial(const float* p, int64_t count) {
  vec8 v = {};
  std::memcpy(&v, p, count * sizeof(float));
  return v;
}

SAM2_FAST_INLINE void store_partial(float* p, vec8 v, int64_t count) { std::memcpy(p, &v, count * sizeof(float)); }

// All lanes `value`, its sign of zero included (vec8{} + value would turn -0.0 into +0.0).
SAM2_FAST_INLINE vec8 broadcast(float value) { return vec8{value, value, value, value, value, value, value, value}; }

}  // namespace sam2_fast
