// The fp32 attention core (see attention_core.h): register-blocked q k^T and p v, softmax with a vectorized exp.
//
// Written with GCC/Clang vector extensions (8 floats) so that it vectorizes without -ffast-math or -march flags,
// and compiled twice through target_clones (x86-64-v3, i.e. AVX2 + FMA, and the baseline) on x86-64 Linux.

#include "cpu/attention/attention_core.h"
#include "common/cpu_utils.h"
#include "common/exp8.h"
#include "common/vec8.h"

#include <cmath>

namespace sam2_fast {
namespace {

constexpr int64_t kVectorsPerBlock = kColumnBlock / kLanes;

// c[kQueryBlock, kColumnBlock] = a[kQueryBlock, depth] @ b[depth, kColumnBlock] with row strides lda, ldb;
// each result row is then multiplied by row_scale[r] and stored with row stride ldc.
SAM2_FAST_INLINE void block_matmul(
    const float* a, int64_t lda, const float* b, int64_t ldb, int64_t depth, float* c, int64_t ldc,
    const float* row_scale) {
  vec8 acc[kQueryBlock][kVectorsPerBlock] = {};
  for (int64_t k = 0; k < depth; ++k) {
    vec8 b_vec[kVectorsPerBlock];
    for (int64_t v = 0; v < kVectorsPerBlock; ++v) b_vec[v] = load(b + k * ldb + v * kLanes);
    for (int64_t r = 0; r < kQueryBlock; ++r) {
      const float a_value = a[r * lda + k];
      for (int64_t v = 0; v < kVectorsPerBlock; ++v) acc[r][v] += b_vec[v] * a_value;
    }
  }
  for (int64_t r = 0; r < kQueryBlock; ++r) {
    for (int64_t v = 0; v < kVectorsPerBlock; ++v) store(c + r * ldc + v * kLanes, acc[r][v] * row_scale[r]);
  }
}

}  // namespace

SAM2_FAST_MULTIVERSION
void attention_f32(
    const AttentionShape& shape, float scale, const float* queries, const float* keys_t, const float* values,
    const float* key_logit_offsets, float* scores, float* inverse_sums, float* out) {
  const int64_t query_rows = shape.query_rows(), key_stride = shape.key_stride();
  const int64_t value_stride = shape.value_stride(), head_dim = shape.head_dim, num_keys = shape.num_keys;
  const float row_scales[kQueryBlock] = {scale, scale, scale, scale};
  static_assert(kQueryBlock == 4, "row_scales holds one entry per query row of a block");

  // Key-block outer: the keys_t panel of a block (head_dim x kColumnBlock) stays in L1 across all query rows.
  for (int64_t j = 0; j < key_stride; j += kColumnBlock) {
    for (int64_t i = 0; i < query_rows; i += kQueryBlock) {
      block_matmul(queries + i * head_dim, head_dim, keys_t + j, key_stride, head_dim, scores + i * key_stride + j,
                   key_stride, row_scales);
    }
  }

  // Softmax per row, left unnormalized: the 1 / sum is applied to the output rows.
  for (int64_t i = 0; i < query_rows; ++i) {
    float* row = scores + i * key_stride;
    if (key_logit_offsets != nullptr) {
      for (int64_t j = 0; j < num_keys; ++j) row[j] += key_logit_offsets[j];
    }
    for (int64_t j = num_keys; j < key_stride; ++j) row[j] = -INFINITY;
    inverse_sums[i] = 1.0f / exp_shifted_in_place(row, key_stride);
  }

  // Value-block outer: the values panel of a block (num_keys x kColumnBlock) stays in cache across all query rows.
  for (int64_t c = 0; c < value_stride; c += kColumnBlock) {
    for (int64_t i = 0; i < query_rows; i += kQueryBlock) {
      block_matmul(scores + i * key_stride, key_stride, values + c, value_stride, num_keys,
                   out + i * value_stride + c, value_stride, inverse_sums + i);
    }
  }
}

}  // namespace sam2_fast
