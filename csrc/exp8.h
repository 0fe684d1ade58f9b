// exp of 8 floats at once, for the CPU attention kernels' softmax (forward and backward).
#pragma once

#include "vec8.h"

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

}  // namespace sam2_fast
