// The check of ATen's brgemm (see brgemm_f32.h).

#include "common/brgemm_f32.h"

#include <ATen/Context.h>
#include <ATen/native/CPUBlas.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <exception>
#include <type_traits>

namespace sam2_fast {
namespace {

// The small product of brgemm_computes_small_product: A (m x k) and B (k x n) of small integers, exact in any order.
constexpr int64_t kCheckM = 3, kCheckN = 5, kCheckK = 4;
inline float check_a(int64_t i, int64_t p) { return static_cast<float>(i + p); }
inline float check_b(int64_t p, int64_t j) { return static_cast<float>(p - j); }

}  // namespace

template <typename scalar_t>
bool brgemm_computes_small_product() {
  constexpr int64_t m = kCheckM, n = kCheckN, k = kCheckK;
  // 16-bit operands go in as the kernels pass them: B in VNNI layout, pairs of its rows interleaved.
  constexpr bool vnni = !std::is_same_v<scalar_t, float>;
  scalar_t a[m * k], b[k * n];
  float c[m * n] = {}, expected[m * n] = {};
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t p = 0; p < k; ++p) a[i * k + p] = static_cast<scalar_t>(check_a(i, p));
  }
  for (int64_t p = 0; p < k; ++p) {
    for (int64_t j = 0; j < n; ++j) {
      b[vnni ? (p / 2) * 2 * n + 2 * j + p % 2 : p * n + j] = static_cast<scalar_t>(check_b(p, j));
      for (int64_t i = 0; i < m; ++i) expected[i * n + j] += check_a(i, p) * check_b(p, j);
    }
  }
  try {
    at::native::cpublas::brgemm(m, n, k, k, n, n, false, a, b, c, vnni);
    if constexpr (vnni) at::native::cpublas::brgemm_release(true);
  } catch (const std::exception&) {
    return false;
  }
  return std::equal(c, c + m * n, expected);
}

template bool brgemm_computes_small_product<float>();
template bool brgemm_computes_small_product<c10::BFloat16>();

bool brgemm_f32_usable() {
  static const bool works = brgemm_computes_small_product<float>();
  return works && at::globalContext().userEnabledMkldnn();
}

void check_brgemm_f32_usable(const char* op) {
  TORCH_CHECK(brgemm_f32_usable(), op, ": needs ATen's fp32 brgemm, which is not usable here (oneDNN is disabled in "
              "torch, or the brgemm failed its check)");
}

}  // namespace sam2_fast
