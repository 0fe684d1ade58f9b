// The bf16 attention core (see attention_bf16.h): both products on ATen's brgemm micro-kernels (oneDNN's, which
// use AMX tiles where the CPU has them and AVX512-BF16 dot products otherwise), the softmax in fp32 between them.

#include "cpu/attention/attention_bf16.h"

#include <ATen/Context.h>
#include <ATen/Version.h>
#include <ATen/cpu/Utils.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <string>

#include "common/brgemm_f32.h"
#include "common/cpu_utils.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SAM2_FAST_BF16_ROW_KERNELS 1
#include <immintrin.h>
#endif

namespace sam2_fast {
namespace {

// Keys per block of the running softmax: a block's scores (queries x 512 fp32) and probabilities stay in L2. Even,
// so that every block but the last starts on a pair of the VNNI values.
constexpr int64_t kKeyBlock = 512;

#if SAM2_FAST_BF16_ROW_KERNELS

// The row kernels below use AVX-512 and its bf16 conversion (VCVTNEPS2BF16): they only run where the bf16 path
// does, on CPUs with AVX512-BF16 (every CPU with AMX has it too), and are compiled for that ISA alone.
#define SAM2_FAST_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
// GCC 12's AVX-512 intrinsics start some results from a deliberately undefined vector, which -Wuninitialized
// reports once they are inlined into functions compiled for AVX-512 by attribute: a false positive.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

constexpr int64_t kLanes16 = 16;

// Lanes [0, count) of a 16-lane vector (count may exceed 16).
SAM2_FAST_AVX512_BF16 inline __mmask16 lanes_mask(int64_t count) {
  return count >= kLanes16 ? __mmask16(0xFFFF) : __mmask16((1u << count) - 1);
}

// From tools/fit_exp2.py: 2^f for |f| <= 1/2 within 2.3e-7 (relative, evaluated in fp32), f^0 first.
constexpr float kExp2[6] = {1.00000012f, 0.693146944f, 0.240221202f, 0.0555071309f, 0.00967554096f, 0.00132764713f};
constexpr float kLog2e = 1.44269504088896341f;

// 2^t for t <= 0: the fit at t - round(t), scaled by 2^round(t) with VSCALEFPS (which flushes to 0 far below the
// smallest normal, with no clamp).
SAM2_FAST_AVX512_BF16 inline __m512 exp2_nonpositive(__m512 t) {
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(kExp2[5]);
  for (int k = 4; k >= 0; --k) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2[k]));
  return _mm512_scalef_ps(p, n);
}

// The largest logit scores * scale + offsets of one row of a key block (offsets may be null).
SAM2_FAST_AVX512_BF16 float max_logit(const float* scores, int64_t count, float scale, const float* offsets) {
  __m512 row_max = _mm512_set1_ps(-INFINITY);
  for (int64_t j = 0; j < count; j += kLanes16) {
    const __mmask16 mask = lanes_mask(count - j);
    __m512 logits = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, scores + j), _mm512_set1_ps(scale));
    if (offsets != nullptr) logits = _mm512_add_ps(logits, _mm512_maskz_loadu_ps(mask, offsets + j));
    row_max = _mm512_mask_max_ps(row_max, mask, row_max, logits);
  }
  return _mm512_reduce_max_ps(row_max);
}

// probabilities = bf16(exp(scores * scale + offsets - row_max)) for one row of a key block, computed as
// 2^((scores * scale + offsets - row_max) * log2(e)); returns the sum of the unrounded values.
SAM2_FAST_AVX512_BF16 float exp_row(const float* scores, int64_t count, float scale, const float* offsets,
                                    float row_max, c10::BFloat16* probabilities) {
  const __m512 scale_log2e = _mm512_set1_ps(scale * kLog2e), shift = _mm512_set1_ps(-row_max * kLog2e);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < count; j += kLanes16) {
    const __mmask16 mask = lanes_mask(count - j);
    __m512 t = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, scores + j), scale_log2e, shift);
    if (offsets != nullptr) t = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, offsets + j), _mm512_set1_ps(kLog2e), t);
    const __m512 p = _mm512_maskz_mov_ps(mask, exp2_nonpositive(t));
    _mm256_mask_storeu_epi16(probabilities + j, mask, (__m256i)_mm512_cvtneps_pbh(p));
    sum = _mm512_add_ps(sum, p);
  }
  return _mm512_reduce_add_ps(sum);
}

SAM2_FAST_AVX512_BF16 void scale_out_row(float* row, int64_t count, float factor) {
  for (int64_t d = 0; d < count; d += kLanes16) {
    const __mmask16 mask = lanes_mask(count - d);
    _mm512_mask_storeu_ps(row + d, mask, _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, row + d), _mm512_set1_ps(factor)));
  }
}

#else

// Elsewhere the path never runs (bf16_matrix_units_usable() is false): these only keep the build whole.
[[noreturn]] void no_row_kernels() {
  TORCH_CHECK(false, "the bf16 matrix-unit attention needs an x86-64 CPU with AVX512-BF16");
}
float max_logit(const float*, int64_t, float, const float*) { no_row_kernels(); }
float exp_row(const float*, int64_t, float, const float*, float, c10::BFloat16*) { no_row_kernels(); }
void scale_out_row(float*, int64_t, float) { no_row_kernels(); }

#endif  // SAM2_FAST_BF16_ROW_KERNELS

// The row kernels need AVX512-BF16; AMX (without it, on no CPU made so far) would not be enough. They also need ATen
// to run AVX-512 code itself: capping it (ATEN_CPU_CAPABILITY=avx2 or default) caps them with it, so that a capped
// run exercises the fp32 core and ATen's AVX2 kernels on an AVX-512 CPU, as it would run on an AVX2 one.
bool cpu_has_bf16_units() {
#if !SAM2_FAST_BF16_ROW_KERNELS
  return false;
#endif
  const auto capabilities = at::cpu::get_cpu_capabilities();
  const auto has = [&](const std::string& name) {
    const auto found = capabilities.find(name);
    return found != capabilities.end() && found->second.isBool() && found->second.toBool();
  };
  return has("avx512_bf16") && at::get_cpu_capability() == "AVX512";
}

std::atomic<bool> matrix_attention_enabled{true};

}  // namespace

bool bf16_matrix_units_usable() {
  static const bool hardware = cpu_has_bf16_units() && brgemm_computes_small_product<c10::BFloat16>();
  return hardware && at::globalContext().userEnabledMkldnn();
}

bool bf16_matrix_attention() { return matrix_attention_enabled.load() && bf16_matrix_units_usable(); }

void set_bf16_matrix_attention(bool enabled) { matrix_attention_enabled.store(enabled); }

Bf16AttentionScratch::Bf16AttentionScratch(int64_t max_queries, int64_t max_keys)
    : max_queries(max_queries),
      max_keys(max_keys),
      block_stride(round_up(std::min(max_keys, kKeyBlock), kVnniColumnAlign)),
      scores(max_queries * block_stride),
      row_max(max_queries),
      row_sum(max_queries),
      probabilities(max_queries * block_stride) {}

void attention_bf16(
    const Bf16AttentionShape& shape, float scale, const c10::BFloat16* queries, const c10::BFloat16* keys_vnni,
    const c10::BFloat16* values_vnni, const float* key_logit_offsets, Bf16AttentionScratch& scratch, float* out,
    float* inverse_sums) {
  const int64_t num_queries = shape.num_queries, num_keys = shape.num_keys, head_dim = shape.head_dim;
  const int64_t depth = shape.depth(), key_columns = shape.key_columns(), value_columns = shape.value_columns();
  TORCH_CHECK(num_queries <= scratch.max_queries && num_keys <= scratch.max_keys,
              "attention_bf16: scratch sized for ", scratch.max_queries, " x ", scratch.max_keys, ", got ",
              num_queries, " x ", num_keys);
  const int64_t score_stride = round_up(std::min(num_keys, kKeyBlock), kVnniColumnAlign);
  float* scores = scratch.scores.data();
  float* row_max = scratch.row_max.data();
  float* row_sum = scratch.row_sum.data();
  c10::BFloat16* probabilities = scratch.probabilities.data();
  for (int64_t first = 0; first < num_keys; first += kKeyBlock) {
    const int64_t block_keys = std::min(kKeyBlock, num_keys - first), block_pairs = round_up(block_keys, 2);
    at::native::cpublas::brgemm(num_queries, block_keys, depth, depth, key_columns, score_stride, false, queries,
                                keys_vnni + 2 * first, scores, true);
    const float* block_offsets = key_logit_offsets == nullptr ? nullptr : key_logit_offsets + first;
    for (int64_t i = 0; i < num_queries; ++i) {
      const float* row_scores = scores + i * score_stride;
      c10::BFloat16* row = probabilities + i * score_stride;
      const float block_max = max_logit(row_scores, block_keys, scale, block_offsets);
      if (first == 0) {
        row_max[i] = block_max;
        row_sum[i] = exp_row(row_scores, block_keys, scale, block_offsets, block_max, row);
      } else {
        const float new_max = std::max(row_max[i], block_max);
        const float correction = std::exp(row_max[i] - new_max);
        row_max[i] = new_max;
        row_sum[i] = row_sum[i] * correction + exp_row(row_scores, block_keys, scale, block_offsets, new_max, row);
        scale_out_row(out + i * value_columns, head_dim, correction);
      }
      if (block_pairs > block_keys) row[block_keys] = c10::BFloat16(0.0f);
    }
    at::native::cpublas::brgemm(num_queries, head_dim, block_pairs, score_stride, value_columns, value_columns,
                                first > 0, probabilities, values_vnni + first * value_columns, out, true);
  }
  for (int64_t i = 0; i < num_queries; ++i) inverse_sums[i] = 1.0f / row_sum[i];
}

SAM2_FAST_MULTIVERSION
void pack_keys(const Bf16AttentionShape& shape, int64_t first, int64_t last, const c10::BFloat16* const* key_rows,
               c10::BFloat16* keys_vnni) {
  // A pair of channels is one 32-bit word of the key row and of the packed operand: word p of key j goes to
  // (row p, column j). Writing row by row keeps the stores contiguous; the key rows' few cache lines stay in L1.
  const int64_t head_dim = shape.head_dim, key_columns = shape.key_columns(), count = last - first;
  uint32_t* packed = reinterpret_cast<uint32_t*>(keys_vnni) + first;
  for (int64_t p = 0; p < head_dim / 2; ++p) {
    uint32_t* row = packed + p * key_columns;
    for (int64_t j = 0; j < count; ++j) std::memcpy(row + j, key_rows[j] + 2 * p, sizeof(uint32_t));
  }
  if (head_dim % 2 == 1) {  // the last channel paired with a zero
    uint32_t* row = packed + (head_dim / 2) * key_columns;
    for (int64_t j = 0; j < count; ++j) row[j] = key_rows[j][head_dim - 1].x;
  }
}

SAM2_FAST_MULTIVERSION
void pack_values(const Bf16AttentionShape& shape, int64_t first, int64_t last,
                 const c10::BFloat16* const* value_rows, c10::BFloat16* values_vnni) {
  // Values 2q and 2q + 1 interleave into row q: channel d of the pair is one 32-bit word (the even key in its low
  // half, as the VNNI layout has it in memory).
  TORCH_CHECK(first % 2 == 0, "pack_values: expected an even first value, got ", first);
  const int64_t head_dim = shape.head_dim, value_columns = shape.value_columns();
  uint32_t* packed = reinterpret_cast<uint32_t*>(values_vnni);
  for (int64_t j = first; j < last; j += 2) {
    uint32_t* row = packed + (j / 2) * value_columns;
    const c10::BFloat16* even = value_rows[j - first];
    if (j + 1 < last) {
      const c10::BFloat16* odd = value_rows[j + 1 - first];
      for (int64_t d = 0; d < head_dim; ++d) row[d] = uint32_t{even[d].x} | (uint32_t{odd[d].x} << 16);
    } else {
      for (int64_t d = 0; d < head_dim; ++d) row[d] = even[d].x;
    }
  }
}

#if SAM2_FAST_BF16_ROW_KERNELS

SAM2_FAST_AVX512_BF16 void store_bf16_row(const float* src, int64_t count, float factor, c10::BFloat16* dst) {
  for (int64_t d = 0; d < count; d += kLanes16) {
    const __mmask16 mask = lanes_mask(count - d);
    const __m512 value = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, src + d), _mm512_set1_ps(factor));
    _mm256_mask_storeu_epi16(dst + d, mask, (__m256i)_mm512_cvtneps_pbh(value));
  }
}

SAM2_FAST_AVX512_BF16 void copy_bf16_row(const c10::BFloat16* src, int64_t count, c10::BFloat16* dst) {
  for (int64_t d = 0; d < count; d += 2 * kLanes16) {
    const __mmask32 mask = count - d >= 2 * kLanes16 ? __mmask32(0xFFFFFFFF) : __mmask32((1ull << (count - d)) - 1);
    _mm512_mask_storeu_epi16(dst + d, mask, _mm512_maskz_loadu_epi16(mask, src + d));
  }
}

#else

void store_bf16_row(const float*, int64_t, float, c10::BFloat16*) { no_row_kernels(); }
void copy_bf16_row(const c10::BFloat16*, int64_t, c10::BFloat16*) { no_row_kernels(); }

#endif  // SAM2_FAST_BF16_ROW_KERNELS

void release_bf16_matrix_units() { at::native::cpublas::brgemm_release(true); }

}  // namespace sam2_fast
