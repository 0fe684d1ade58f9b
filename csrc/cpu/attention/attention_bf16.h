// The bf16 attention core of the CPU attention kernels, on the CPU's bf16 matrix units (AMX, or AVX512-BF16)
// through ATen's brgemm micro-kernels, which pick the unit at run time. Used for bf16 inputs on CPUs that have
// such units; elsewhere the kernels keep the fp32 core of attention_core.h.
//
// Numerics: q k^T of the bf16 inputs accumulated in fp32; the softmax in fp32; its probabilities rounded to bf16 for
// the p v product (accumulated in fp32) and normalized by their fp32 sum; the caller rounds the output once.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu/attention/attention_core.h"

namespace sam2_fast {

// Whether the bf16 attention kernels run on the matrix units here: the CPU has AVX512-BF16 (as every CPU with AMX
// does; brgemm then uses AMX) and ATen runs AVX-512 code (its capability not capped below AVX512 by
// ATEN_CPU_CAPABILITY), ATen's brgemm ran a bf16 product correctly on it (checked once; it raises where oneDNN's ISA
// is capped below AVX-512 by ONEDNN_MAX_CPU_ISA), ATen's oneDNN is enabled, and the path is not switched off by
// set_bf16_matrix_attention(false) (for tests and side-by-side benchmarks).
bool bf16_matrix_attention();
// Whether the CPU and ATen could run the path at all (the first three conditions above).
bool bf16_matrix_units_usable();
void set_bf16_matrix_attention(bool enabled);

// VNNI layout: the brgemm operand B (depth x columns) stored as (depth / 2, columns, 2), each pair of consecutive
// depth entries of a column side by side; padded columns and depth entries are zero or never read.
constexpr int64_t kVnniColumnAlign = 16;  // the packed operands' row length is a multiple of this (AMX tile width)

// The sizes of one bf16 attention problem (one head of one window, or a block of queries of a global attention)
// and of its buffers, all row-major:
//   queries     (num_queries, depth())                    bf16, channel head_dim zero when head_dim is odd
//   keys_vnni   (depth() / 2, key_columns(), 2)           k^T in VNNI layout
//   values_vnni (padded_keys() / 2, value_columns(), 2)   v in VNNI layout; key num_keys zero when num_keys is odd
//   out         (num_queries, value_columns())            fp32, columns < head_dim valid
struct Bf16AttentionShape {
  int64_t num_queries, num_keys, head_dim;
  int64_t depth() const { return round_up(head_dim, 2); }
  int64_t padded_keys() const { return round_up(num_keys, 2); }
  int64_t key_columns() const { return round_up(num_keys, kVnniColumnAlign); }
  int64_t value_columns() const { return round_up(head_dim, kVnniColumnAlign); }
};

// Scratch of attention_bf16 for problems of up to max_queries x max_keys: one key block's scores (fp32) and
// probabilities (bf16), and each query's running max and sum.
struct Bf16AttentionScratch {
  Bf16AttentionScratch(int64_t max_queries, int64_t max_keys);
  int64_t max_queries, max_keys, block_stride;
  std::vector<float> scores, row_max, row_sum;
  std::vector<c10::BFloat16> probabilities;
};

// softmax(queries @ keys^T * scale + key_logit_offsets) @ values (see the numerics above) is out[i] *
// inverse_sums[i] for query i (inverse_sums: num_queries floats): the normalization is left to the rounding of the
// output (store_bf16_row). Runs over key blocks with a running max and sum, so that global attention's thousands of
// keys stay in cache. key_logit_offsets (num_keys,) may be null (all zero); an offset of log(n) makes a key count as
// n identical keys.
void attention_bf16(
    const Bf16AttentionShape& shape, float scale, const c10::BFloat16* queries, const c10::BFloat16* keys_vnni,
    const c10::BFloat16* values_vnni, const float* key_logit_offsets, Bf16AttentionScratch& scratch, float* out,
    float* inverse_sums);

// dst[0, count) = src * factor rounded to bf16 (to nearest, ties to even), and a plain copy of count bf16 values;
// for the output and query rows of the bf16 path (they use AVX-512: call them only where bf16_matrix_attention()
// holds).
void store_bf16_row(const float* src, int64_t count, float factor, c10::BFloat16* dst);
void copy_bf16_row(const c10::BFloat16* src, int64_t count, c10::BFloat16* dst);

// Hands the matrix units' state back after a thread's last attention_bf16 (AMX tile configuration).
void release_bf16_matrix_units();

// Calls release_bf16_matrix_units() when it goes out of scope, also when the attention throws: one per thread's run
// of attention_bf16 calls.
class Bf16MatrixUnitsRelease {
 public:
  Bf16MatrixUnitsRelease() = default;
  ~Bf16MatrixUnitsRelease() { release_bf16_matrix_units(); }
  Bf16MatrixUnitsRelease(const Bf16MatrixUnitsRelease&) = delete;
  Bf16MatrixUnitsRelease& operator=(const Bf16MatrixUnitsRelease&) = delete;
};

// Packs keys [first, last) of a problem (key_rows[j - first]: the head_dim bf16 channels of key j) into its VNNI
// operand keys_vnni. Ranges of one problem may be packed by different threads.
void pack_keys(const Bf16AttentionShape& shape, int64_t first, int64_t last, const c10::BFloat16* const* key_rows,
               c10::BFloat16* keys_vnni);

// Packs values [first, last) of a problem into its VNNI operand values_vnni, the same way (first even; ranges of
// one problem end on even keys, but for the last); an odd last key is paired with a zero value (its probability is
// zero, and 0 * NaN would not be).
void pack_values(const Bf16AttentionShape& shape, int64_t first, int64_t last,
                 const c10::BFloat16* const* value_rows, c10::BFloat16* values_vnni);

}  // namespace sam2_fast
