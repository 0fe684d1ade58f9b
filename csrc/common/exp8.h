// exp of 8 floats at once, for the CPU attention kernels' softmax (forward and backward).
#pragma once

#include <cmath>
#include <cstdint>

#include "common/vec8.h"

namespace sam2_fast {

// exp(x) for x <= 0 (Cephes' expf polynomial, about 2 ulp); 0 below -87 where expf underflows.
SAM2_FAST_INLINE vec8 exp_nonpositive(vec8 x) {
  const vec8 magic = broadcast(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer kept in the low bits
  const vec8 clamped = x < -87.0f ? broadcast(-87.0f) : x;
  const vec8 shifted = clamped * 1.44269504088896341f + magic;
  const vec8 n = shifted - magic;
  vec8 r = clamped - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  vec8 p = broadcast(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const ivec8 exponent = ((ivec8)shifted - (ivec8)magic) << 23;
  const vec8 result = (vec8)((ivec8)p + exponent);
  return x < -87.0f ? vec8{} : result;
}

// row[0:n] = exp(row[j] - max(row[0:n])) in place; returns the sum of the new row (a softmax's denominator). Eight
// lanes at a time, then the n % 8 tail one by one.
SAM2_FAST_INLINE float exp_shifted_in_place(float* row, int64_t n) {
  const int64_t full = n - n % kLanes;
  vec8 max_vec = broadcast(-INFINITY);
  for (int64_t j = 0; j < full; j += kLanes) {
    const vec8 s = load(row + j);
    max_vec = s > max_vec ? s : max_vec;
  }
  float row_max = -INFINITY;
  for (int64_t lane = 0; lane < kLanes; ++lane) row_max = std::fmax(row_max, max_vec[lane]);
  for (int64_t j = full; j < n; ++j) row_max = std::fmax(row_max, row[j]);
  vec8 sum_vec = {};
  for (int64_t j = 0; j < full; j += kLanes) {
    const vec8 p = exp_nonpositive(load(row + j) - row_max);
    store(row + j, p);
    sum_vec += p;
  }
  float sum = 0.0f;
  for (int64_t lane = 0; lane < kLanes; ++lane) sum += sum_vec[lane];
  for (int64_t j = full; j < n; ++j) {
    row[j] = std::exp(row[j] - row_max);
    sum += row[j];
  }
  return sum;
}

}  // namespace sam2_fast
