// Transposes of row-major fp32 (and other) matrices, 8 x 8 blocks in registers, for the CPU kernels' operand
// layouts. Force-inlined: compiled into each target clone of the caller (see vec8.h).
#pragma once

#include <cstdint>
#include <type_traits>

#include "common/vec8.h"

namespace sam2_fast {

// The 8 x 8 block at src (rows ld_src apart) transposed into dst (rows ld_dst apart), in registers: pairs of rows
// interleaved, then pairs of pairs, then the 128-bit halves swapped (the three steps of the AVX transpose).
SAM2_FAST_INLINE void transpose_8x8(const float* src, int64_t ld_src, float* dst, int64_t ld_dst) {
  vec8 r[8], t[8], s[8];
  for (int64_t i = 0; i < 8; ++i) r[i] = load(src + i * ld_src);
  for (int64_t i = 0; i < 8; i += 2) {
    t[i] = __builtin_shufflevector(r[i], r[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    t[i + 1] = __builtin_shufflevector(r[i], r[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  for (int64_t i = 0; i < 8; i += 4) {
    s[i] = __builtin_shufflevector(t[i], t[i + 2], 0, 1, 8, 9, 4, 5, 12, 13);
    s[i + 1] = __builtin_shufflevector(t[i], t[i + 2], 2, 3, 10, 11, 6, 7, 14, 15);
    s[i + 2] = __builtin_shufflevector(t[i + 1], t[i + 3], 0, 1, 8, 9, 4, 5, 12, 13);
    s[i + 3] = __builtin_shufflevector(t[i + 1], t[i + 3], 2, 3, 10, 11, 6, 7, 14, 15);
  }
  for (int64_t j = 0; j < 4; ++j) {
    store(dst + j * ld_dst, __builtin_shufflevector(s[j], s[j + 4], 0, 1, 2, 3, 8, 9, 10, 11));
    store(dst + (j + 4) * ld_dst, __builtin_shufflevector(s[j], s[j + 4], 4, 5, 6, 7, 12, 13, 14, 15));
  }
}

// dst[j * ld_dst + i] = src[i * ld_src + j] for i < rows, j < cols: fp32 in 8 x 8 blocks in registers, the edges
// (and other types) element by element.
template <typename T>
SAM2_FAST_INLINE void transpose(const T* src, int64_t rows, int64_t cols, int64_t ld_src, T* dst, int64_t ld_dst) {
  int64_t full_rows = 0, full_cols = 0;
  if constexpr (std::is_same_v<T, float>) {
    full_rows = rows - rows % kLanes;
    full_cols = cols - cols % kLanes;
    for (int64_t i0 = 0; i0 < full_rows; i0 += kLanes) {
      for (int64_t j0 = 0; j0 < full_cols; j0 += kLanes) {
        transpose_8x8(src + i0 * ld_src + j0, ld_src, dst + j0 * ld_dst + i0, ld_dst);
      }
    }
  }
  // What the blocks left: the columns past full_cols of every row, and the rows past full_rows.
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = i < full_rows ? full_cols : 0; j < cols; ++j) dst[j * ld_dst + i] = src[i * ld_src + j];
  }
}

}  // namespace sam2_fast
