// Small helpers shared by the CPU kernels of sam2_fast_ext.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

// Compiles a function twice, for AVX2 + FMA (x86-64-v3) and for the baseline ISA, picked when the library loads:
// the extension is built without -march flags so that it runs on any x86-64 CPU.
#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define SAM2_FAST_MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define SAM2_FAST_MULTIVERSION
#endif

namespace sam2_fast {

// Whether torch's max-pool scan, holding `current`, moves to `candidate`: if it is larger or NaN (so ties keep the
// earlier value and a NaN anywhere propagates). Its backward routes the gradient to where the scan stopped.
template <typename T>
inline bool pool_takes(T current, T candidate) {
  using compare_t = std::conditional_t<std::is_same_v<T, double>, double, float>;  // exact for every float type
  const compare_t value = static_cast<compare_t>(candidate);
  return value > static_cast<compare_t>(current) || value != value;
}

// One step of torch's max-pool scan.
template <typename T>
inline T pool_max(T current, T candidate) {
  return pool_takes(current, candidate) ? candidate : current;
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

// Runs fn(range, begin, end) over [0, n) in contiguous ranges of about equal total cost (cost(i) >= 0), one range
// per thread, with at least about `min_range_cost` per range. at::parallel_for splits by count instead, which leaves
// a thread idle when items differ in cost (e.g. windows that overhang the map have fewer queries). `range` numbers
// the ranges from 0; there are at most at::get_num_threads() of them (as it is at the call). It indexes per-range
// partial results, which a thread id cannot: a range may run on any thread, and a nested call inline on its caller's.
template <typename Cost, typename Fn>
inline void parallel_for_balanced(int64_t n, int64_t min_range_cost, const Cost& cost, const Fn& fn) {
  if (n <= 0) return;
  std::vector<int64_t> prefix(n + 1, 0);  // prefix[i]: cost of items [0, i)
  for (int64_t i = 0; i < n; ++i) prefix[i + 1] = prefix[i] + cost(i);
  const int64_t total = prefix[n];
  const int64_t ranges = std::clamp<int64_t>(
      total / std::max<int64_t>(1, min_range_cost), 1, std::min<int64_t>(n, at::get_num_threads()));
  // Range r starts at the first item whose prefix reaches r / ranges of the total; the last one ends at n.
  const auto start = [&](int64_t r) -> int64_t {
    if (r == ranges) return n;
    return std::lower_bound(prefix.begin(), prefix.end(), total * r / ranges) - prefix.begin();
  };
  at::parallel_for(0, ranges, 1, [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) {
      const int64_t begin = start(r), end = start(r + 1);
      if (begin < end) fn(r, begin, end);
    }
  });
}

}  // namespace sam2_fast
