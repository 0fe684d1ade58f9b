// The fp32 attention core of the CPU window_attention kernel: one head of one window at a time.
#pragma once

#include <cstdint>

namespace sam2_fast {

inline int64_t round_up(int64_t value, int64_t multiple) { return (value + multiple - 1) / multiple * multiple; }

// Query rows are processed in blocks of kQueryBlock, key columns and value channels in blocks of kColumnBlock;
// the buffers below are padded to those multiples.
constexpr int64_t kQueryBlock = 4;
constexpr int64_t kColumnBlock = 16;

// The sizes of one attention problem (one head of one window) and of its
// padded fp32 buffers, all row-major:
//   queries  (query_rows, head_dim)        rows past num_queries: zero
//   keys_t   (head_dim, key_stride)        k transposed; columns past num_keys: zero
//   values   (num_keys, value_stride)      columns past head_dim: zero
//   scores   (query_rows, key_stride)      scratch
//   inverse_sums (query_rows,)             scratch
//   out      (query_rows, value_stride)    softmax(q k^T * scale) v, rows < num_queries and columns < head_dim valid
struct AttentionShape {
  int64_t num_queries, num_keys, head_dim;
  int64_t query_rows() const { return round_up(num_queries, kQueryBlock); }
  int64_t key_stride() const { return round_up(num_keys, kColumnBlock); }
  int64_t value_stride() const { return round_up(head_dim, kColumnBlock); }
};

// out = softmax(queries @ keys_t * scale + key_logit_offsets) @ values, accumulated in fp32 (no mask).
// key_logit_offsets (num_keys,) may be null (all zero); an offset of log(n) makes a key count as n identical keys.
// Compiled for AVX2+FMA and for the baseline ISA, picked at load time.
void attention_f32(
    const AttentionShape& shape, float scale, const float* queries, const float* keys_t, const float* values,
    const float* key_logit_offsets, float* scores, float* inverse_sums, float* out);

}  // namespace sam2_fast
