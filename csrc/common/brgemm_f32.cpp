// The one-time check of ATen's fp32 brgemm (see brgemm_f32.h).

#include "common/brgemm_f32.h"

#include <ATen/Context.h>
#include <ATen/native/CPUBlas.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <exception>

namespace sam2_fast {
namespace {

// Whether ATen's fp32 brgemm computes a small product in plain row-major layout correctly here. Small integers: exact
// in any order.
bool brgemm_f32_works() {
  constexpr int64_t m = 3, n = 5, k = 4;
  float a[m * k], b[k * n], c[m * n] = {}, expected[m * n] = {};
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t p = 0; p < k; ++p) a[i * k + p] = static_cast<float>(i + p);
  }
  for (int64_t p = 0; p < k; ++p) {
    for (int64_t j = 0; j < n; ++j) {
      b[p * n + j] = static_cast<float>(p - j);
      for (int64_t i = 0; i < m; ++i) expected[i * n + j] += a[i * k + p] * b[p * n + j];
    }
  }
  try {
    at::native::cpublas::brgemm(m, n, k, k, n, n, false, a, b, c, false);
  } catch (const std::exception&) {
    return false;
  }
  return std::equal(c, c + m * n, expected);
}

}  // namespace

bool brgemm_f32_usable() {
  static const bool works = brgemm_f32_works();
  return works && at::globalContext().userEnabledMkldnn();
}

void check_brgemm_f32_usable(const char* op) {
  TORCH_CHECK(brgemm_f32_usable(), op, ": needs ATen's fp32 brgemm, which is not usable here (oneDNN is disabled in "
              "torch, or the brgemm failed its check)");
}

}  // namespace sam2_fast
