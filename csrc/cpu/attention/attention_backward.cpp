// attention_backward on CPU: the gradients of window_attention, and of global_attention (window_size 0), with
// respect to the qkv map and the qkv bias.
//
// grad_out, out: (B, H_out, W_out, dim), the gradient of the forward's output and that output (any strides, read
// from contiguous copies where they are not contiguous); qkv: (B, H, W, 3 * dim) as the forward got it (without its
// bias when add_bias), read with its own strides over B, H, W (any, 0 included), its channels made contiguous first
// where they are strided; qkv_bias: (3 * dim,) of any floating dtype, or None; num_heads, window_size, q_pool,
// add_bias: the forward's. fp32, bf16, fp16 or fp64 (grad_out and out of qkv's dtype).
// Returns grad_qkv (B, H, W, 3 * dim), contiguous, qkv's dtype, and the qkv bias's gradient (3 * dim,) in its dtype
// (shape (0,) without a bias).
//
// Flash-attention style, per (window, head): the probabilities are recomputed from q and k (a block of query rows
// holds every key, so the softmax is exact and needs no saved log-sum-exp), D = rowsum(dO * O) comes from the saved
// output, then dV = P^T dO, dP = dO V^T, dS = P * (dP - D), dQ = dS K * scale and dK = dS^T Q * scale, accumulated in
// fp32 (fp64 for fp64 inputs, so that gradcheck can check the kernel). As in the forward, windows are read and their
// gradients written in place (no partition, pad or unpartition copies), only the queries that survive the crop are
// computed, and a window's padding tokens (all equal to the qkv bias, or zero without one) are one key weighted by
// their count, whose k and v gradients are the padding tokens' summed ones and go to the qkv bias. With q_pool, the
// gradient of each pooled q goes to the token max_pool2d takes (the first maximum in its scan order; the last NaN if
// there is one), among the values the forward pooled (bias added). Global attention is one window covering the whole
// map, its queries in blocks.
//
// The five products of a block are plain row-major ones, C (+)= A B, on operands laid out for them once per window:
// the queries scaled (Qs = Q * scale, so that dK = dS^T Qs), K^T, V^T, and Qs^T and dO^T; the key and value gradients
// accumulate transposed (dK^T += Qs^T dS, dV^T += dO^T P) and are turned back once per window. The products of the
// fp32 and 16-bit inputs run on ATen's brgemm (oneDNN's micro-kernels) where it works on this CPU (checked once, see
// brgemm_f32_usable), else, and for fp64, on the BLAS torch links (MKL in the x86-64 Linux wheels).
// At the encoder's window shapes on an AMD EPYC Zen 4 (AVX-512, one thread) brgemm ran these products at 1.2x-1.8x
// the BLAS's speed (MKL takes a narrower code path on that CPU). The element-wise work (reading and pooling tokens,
// the softmax and its backward, routing and writing the gradients) is compiled for AVX2 + FMA as well as the
// baseline ISA, picked at load time.

#include "cpu/attention/attention_backward.h"
#include "cpu/attention/window_tasks.h"
#include "common/brgemm_f32.h"
#include "common/transpose.h"

#include <ATen/Dispatch.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <utility>
#include <type_traits>
#include <vector>

#include "common/cpu_utils.h"
#include "common/exp8.h"
#include "common/tensor_args.h"
#include "common/vec8.h"

// The BLAS that torch links (MKL in the x86-64 Linux wheels; ATen calls the same symbols). Weak, so that the library
// loads where a torch build has none: the kernel is then not registered (see the end of this file) and the op layer
// falls back to differentiating the torch implementation.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

namespace sam2_fast {
namespace {

// A block of query rows holds this many scores at most (256 KB in fp32), so that its probabilities and their
// gradients (512 KB together) stay in a 1 MB L2 with the other operands while the products go over them; a window's
// queries fit in one block.
constexpr int64_t kScoreBlockElements = 1 << 16;
constexpr int64_t kMinQueryBlockRows = 16;

template <typename scalar_t>
using acc_of = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Row-major C[m, n] = A[m, k] B[k, n] (plus C when accumulate), rows lda, ldb, ldc apart, through the column-major
// BLAS: a row-major matrix read column-major is its transpose, so C^T = B^T A^T.
template <typename acc_t>
void blas_product(int64_t m, int64_t n, int64_t k, const acc_t* a, int64_t lda, const acc_t* b, int64_t ldb,
                  bool accumulate, acc_t* c, int64_t ldc) {
  const char no = 'N';
  const int rows = static_cast<int>(n), cols = static_cast<int>(m), depth = static_cast<int>(k);
  const int ld_a = static_cast<int>(lda), ld_b = static_cast<int>(ldb), ld_c = static_cast<int>(ldc);
  const acc_t one = 1, beta = accumulate ? 1 : 0;
  if constexpr (std::is_same_v<acc_t, float>) {
    sgemm_(&no, &no, &rows, &cols, &depth, &one, b, &ld_b, a, &ld_a, &beta, c, &ld_c);
  } else {
    dgemm_(&no, &no, &rows, &cols, &depth, &one, b, &ld_b, a, &ld_a, &beta, c, &ld_c);
  }
}

// The products of one call: C[m, n] (+)= A[m, k] B[k, n], row-major, on brgemm (fp32 only) or the BLAS.
template <typename acc_t>
struct Products {
  bool brgemm;

  void operator()(int64_t m, int64_t n, int64_t k, const acc_t* a, int64_t lda, const acc_t* b, int64_t ldb,
                  bool accumulate, acc_t* c, int64_t ldc) const {
    if constexpr (std::is_same_v<acc_t, float>) {
      if (brgemm) {
        at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, accumulate, a, b, c, false);
        return;
      }
    }
    blas_product(m, n, k, a, lda, b, ldb, accumulate, c, ldc);
  }
};

std::atomic<bool> brgemm_enabled{true};

// row[0:n] = softmax(row[0:n]) in place for each of `rows` rows `ld` apart (fp32: the vectorized exp of exp8.h).
template <typename acc_t>
SAM2_FAST_INLINE void softmax_rows(acc_t* scores, int64_t rows, int64_t n, int64_t ld) {
  if constexpr (std::is_same_v<acc_t, float>) {
    for (int64_t i = 0; i < rows; ++i) {
      float* row = scores + i * ld;
      const float inverse = 1.0f / exp_shifted_in_place(row, n);
      for (int64_t j = 0; j < n; ++j) row[j] *= inverse;
    }
  } else {
    for (int64_t i = 0; i < rows; ++i) {
      acc_t* row = scores + i * ld;
      const acc_t row_max = *std::max_element(row, row + n);
      acc_t sum = 0;
      for (int64_t j = 0; j < n; ++j) sum += (row[j] = std::exp(row[j] - row_max));
      for (int64_t j = 0; j < n; ++j) row[j] /= sum;
    }
  }
}

// grad_scores[i, :n] = probs[i, :n] * (grad_scores[i, :n] - row_terms[i]), the softmax's backward, in place; rows
// `ld` apart.
template <typename acc_t>
SAM2_FAST_INLINE void softmax_backward_rows(const acc_t* probs, acc_t* grad_scores, const acc_t* row_terms,
                                            int64_t rows, int64_t n, int64_t ld) {
  for (int64_t i = 0; i < rows; ++i) {
    const acc_t term = row_terms[i];
    for (int64_t j = 0; j < n; ++j) grad_scores[i * ld + j] = probs[i * ld + j] * (grad_scores[i * ld + j] - term);
  }
}

// value + bias rounded to scalar_t, as the forward reads a token with add_bias (summed in fp32, exact for the 16-bit
// types; in fp64 for fp64).
template <typename scalar_t>
SAM2_FAST_INLINE scalar_t add_rounded(scalar_t value, scalar_t bias) {
  return static_cast<scalar_t>(static_cast<acc_of<scalar_t>>(value) + static_cast<acc_of<scalar_t>>(bias));
}

// dst[0:n] = src[0:n] (plus bias[0:n], rounded to scalar_t, unless bias is null) in the accumulation type.
template <typename scalar_t, typename acc_t>
SAM2_FAST_INLINE void read_row(const scalar_t* src, const scalar_t* bias, int64_t n, acc_t* dst) {
  if (bias == nullptr) {
    for (int64_t d = 0; d < n; ++d) dst[d] = static_cast<acc_t>(src[d]);
  } else {
    for (int64_t d = 0; d < n; ++d) dst[d] = static_cast<acc_t>(add_rounded(src[d], bias[d]));
  }
}

template <typename scalar_t, typename acc_t>
SAM2_FAST_INLINE void write_row(const acc_t* src, int64_t n, scalar_t* dst) {
  for (int64_t d = 0; d < n; ++d) dst[d] = static_cast<scalar_t>(src[d]);
}

// q[d] = the max of rows[0..3][d] in max_pool2d's scan order, corner[d] = the row it came from (see pool_takes).
template <typename acc_t>
SAM2_FAST_INLINE void pool_rows(const acc_t* rows, int64_t n, acc_t* q, uint8_t* corner) {
  for (int64_t d = 0; d < n; ++d) {
    acc_t best = rows[d];
    uint8_t best_corner = 0;
    for (uint8_t c = 1; c < 4; ++c) {
      const acc_t candidate = rows[c * n + d];
      const bool take = candidate > best || candidate != candidate;
      best = take ? candidate : best;
      best_corner = take ? c : best_corner;
    }
    q[d] = best;
    corner[d] = best_corner;
  }
}

// One call's problem: the tensors' data and the geometry of its tasks (one per window and head).
template <typename scalar_t>
struct BackwardProblem {
  using acc_t = acc_of<scalar_t>;
  const scalar_t* qkv;
  int64_t stride_b, stride_h, stride_w;  // qkv's strides over B, H, W (channels contiguous)
  const scalar_t* bias;                  // the qkv bias in qkv's dtype, or null
  bool add_bias;                         // the forward added the bias to every token as it read it
  const scalar_t* grad_out;
  const scalar_t* out;
  scalar_t* grad_qkv;                    // contiguous (B, H, W, 3 * dim)
  double* bias_grads;                    // (ranges, 3 * dim), one row per range of tasks, summed in float64
  WindowTasks tasks;                     // the windows, as the forward walked them
  int64_t dim, head_dim, step, block_rows;
  bool q_pool, brgemm;
};

// The gradients of tasks [begin, end) (see the top of the file), written into grad_qkv and bias row `range`.
template <typename scalar_t>
SAM2_FAST_INLINE void backward_tasks(const BackwardProblem<scalar_t>& p, int64_t range, int64_t begin, int64_t end) {
  using acc_t = acc_of<scalar_t>;
  const Products<acc_t> product{p.brgemm};
  const int64_t head_dim = p.head_dim, dim = p.dim, step = p.step;
  const int64_t max_keys = p.tasks.max_keys(), max_queries = p.tasks.max_queries(), block_rows = p.block_rows;
  const acc_t scale = static_cast<acc_t>(1.0 / std::sqrt(static_cast<double>(head_dim)));
  const scalar_t* added_bias = p.add_bias ? p.bias : nullptr;
  const auto token = [&](int64_t b, int64_t y, int64_t x) {
    return p.qkv + b * p.stride_b + y * p.stride_h + x * p.stride_w;
  };
  const auto grad_token = [&](int64_t b, int64_t y, int64_t x) {
    return p.grad_qkv + ((b * p.tasks.height + y) * p.tasks.width + x) * 3 * dim;
  };
  const auto out_offset = [&](int64_t b, int64_t y, int64_t x) {
    return ((b * p.tasks.out_h + y) * p.tasks.out_w + x) * dim;
  };
  const auto channels_of = [](const scalar_t* data, int64_t channel) { return data == nullptr ? data : data + channel; };

  // Row-major: keys and values (max_keys, head_dim), then their gradients there; K^T, V^T and the gradients dK^T,
  // dV^T (head_dim, num_keys; rows key_ld apart); Qs and dO (max_queries, head_dim) and their transposes (head_dim,
  // num_queries; rows query_ld apart); D (max_queries,); P and dP (then dS) of a block of queries (block_rows,
  // num_keys; rows key_ld apart); dQ of the block (block_rows, head_dim).
  std::vector<acc_t> keys(max_keys * head_dim), values(max_keys * head_dim);
  const int64_t max_key_ld = max_padded_stride(max_keys), max_query_ld = max_padded_stride(max_queries);
  std::vector<acc_t> keys_t(head_dim * max_key_ld), values_t(head_dim * max_key_ld);
  std::vector<acc_t> grad_keys_t(head_dim * max_key_ld), grad_values_t(head_dim * max_key_ld);
  std::vector<acc_t> queries(max_queries * head_dim), queries_t(head_dim * max_query_ld);
  std::vector<acc_t> grad_outs(max_queries * head_dim), grad_outs_t(head_dim * max_query_ld), row_terms(max_queries);
  std::vector<acc_t> out_row(head_dim), corner_rows(p.q_pool ? 4 * head_dim : 0);
  std::vector<uint8_t> corners(p.q_pool ? max_queries * head_dim : 0);  // which of the 2x2 tokens each q came from
  std::vector<acc_t> probs(block_rows * max_key_ld), grad_scores(block_rows * max_key_ld);
  std::vector<acc_t> grad_queries(block_rows * head_dim);
  double* bias_grad = p.bias_grads + range * 3 * dim;

  for (int64_t task = begin; task < end; ++task) {
    const TaskWindow w = p.tasks.window(task);
    const int64_t q_channel = w.head * head_dim, k_channel = dim + q_channel, v_channel = 2 * dim + q_channel;
    const int64_t num_keys = w.num_keys(), num_queries = w.num_queries(), in_map = w.in_h * w.in_w;
    const int64_t key_ld = padded_stride(num_keys), query_ld = padded_stride(num_queries);
    const auto key_place = [&](int64_t j) -> std::pair<int64_t, int64_t> {
      return {w.y0 + j / w.in_w, w.x0 + j % w.in_w};
    };
    // Keys and values: the window's tokens in the map, row by row, then its padding tokens as one key; transposed.
    for (int64_t j = 0; j < in_map; ++j) {
      const auto [y, x] = key_place(j);
      const scalar_t* t = token(w.b, y, x);
      read_row(t + k_channel, channels_of(added_bias, k_channel), head_dim, keys.data() + j * head_dim);
      read_row(t + v_channel, channels_of(added_bias, v_channel), head_dim, values.data() + j * head_dim);
    }
    if (w.padding > 0) {
      acc_t* key = keys.data() + in_map * head_dim;
      acc_t* value = values.data() + in_map * head_dim;
      if (p.bias == nullptr) {
        std::fill(key, key + head_dim, acc_t(0));
        std::fill(value, value + head_dim, acc_t(0));
      } else {
        read_row(p.bias + k_channel, static_cast<const scalar_t*>(nullptr), head_dim, key);
        read_row(p.bias + v_channel, static_cast<const scalar_t*>(nullptr), head_dim, value);
      }
    }
    transpose(keys.data(), num_keys, head_dim, head_dim, keys_t.data(), key_ld);
    transpose(values.data(), num_keys, head_dim, head_dim, values_t.data(), key_ld);
    // Queries (pooled, remembering the winning token per channel, then scaled), their output gradients and D.
    for (int64_t i = 0; i < num_queries; ++i) {
      const int64_t qy = i / w.kept_w, qx = i % w.kept_w;
      const int64_t y = w.y0 + step * qy, x = w.x0 + step * qx;
      acc_t* q = queries.data() + i * head_dim;
      if (p.q_pool) {
        for (int64_t c = 0; c < 4; ++c) {
          read_row(token(w.b, y + c / 2, x + c % 2) + q_channel, channels_of(added_bias, q_channel), head_dim,
                   corner_rows.data() + c * head_dim);
        }
        pool_rows(corner_rows.data(), head_dim, q, corners.data() + i * head_dim);
      } else {
        read_row(token(w.b, y, x) + q_channel, channels_of(added_bias, q_channel), head_dim, q);
      }
      for (int64_t d = 0; d < head_dim; ++d) q[d] *= scale;
      const int64_t offset = out_offset(w.b, w.out_y0 + qy, w.out_x0 + qx) + q_channel;
      acc_t* grad_o = grad_outs.data() + i * head_dim;
      read_row(p.grad_out + offset, static_cast<const scalar_t*>(nullptr), head_dim, grad_o);
      read_row(p.out + offset, static_cast<const scalar_t*>(nullptr), head_dim, out_row.data());
      acc_t term = 0;
      for (int64_t d = 0; d < head_dim; ++d) term += grad_o[d] * out_row[d];
      row_terms[i] = term;
    }
    if (num_queries == 0) {
      std::fill(grad_keys_t.begin(), grad_keys_t.begin() + key_ld * head_dim, acc_t(0));
      std::fill(grad_values_t.begin(), grad_values_t.begin() + key_ld * head_dim, acc_t(0));
    } else {
      transpose(queries.data(), num_queries, head_dim, head_dim, queries_t.data(), query_ld);
      transpose(grad_outs.data(), num_queries, head_dim, head_dim, grad_outs_t.data(), query_ld);
    }
    for (int64_t i0 = 0; i0 < num_queries; i0 += block_rows) {
      const int64_t n = std::min(block_rows, num_queries - i0);
      const bool accumulate = i0 > 0;
      // P = softmax(Qs K^T), the padding key counting `padding` times.
      product(n, num_keys, head_dim, queries.data() + i0 * head_dim, head_dim, keys_t.data(), key_ld, false,
              probs.data(), key_ld);
      if (w.padding > 0) {
        const acc_t log_count = std::log(static_cast<acc_t>(w.padding));
        for (int64_t i = 0; i < n; ++i) probs[i * key_ld + num_keys - 1] += log_count;
      }
      softmax_rows(probs.data(), n, num_keys, key_ld);
      // dS = P * (dO V^T - D)
      product(n, num_keys, head_dim, grad_outs.data() + i0 * head_dim, head_dim, values_t.data(), key_ld, false,
              grad_scores.data(), key_ld);
      softmax_backward_rows(probs.data(), grad_scores.data(), row_terms.data() + i0, n, num_keys, key_ld);
      // dQ = dS K * scale; dK^T (+)= Qs^T dS; dV^T (+)= dO^T P
      product(n, head_dim, num_keys, grad_scores.data(), key_ld, keys.data(), head_dim, false, grad_queries.data(),
              head_dim);
      product(head_dim, num_keys, n, queries_t.data() + i0, query_ld, grad_scores.data(), key_ld, accumulate,
              grad_keys_t.data(), key_ld);
      product(head_dim, num_keys, n, grad_outs_t.data() + i0, query_ld, probs.data(), key_ld, accumulate,
              grad_values_t.data(), key_ld);
      // Each query's gradient to its token, or with q_pool per channel to the token its q came from (the other
      // three of its 2x2 tokens get zero).
      for (int64_t i = 0; i < n; ++i) {
        const int64_t qy = (i0 + i) / w.kept_w, qx = (i0 + i) % w.kept_w;
        const int64_t y = w.y0 + step * qy, x = w.x0 + step * qx;
        acc_t* g = grad_queries.data() + i * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) g[d] *= scale;
        if (p.q_pool) {
          const uint8_t* corner = corners.data() + (i0 + i) * head_dim;
          for (uint8_t c = 0; c < 4; ++c) {
            scalar_t* dst = grad_token(w.b, y + c / 2, x + c % 2) + q_channel;
            for (int64_t d = 0; d < head_dim; ++d) {
              dst[d] = static_cast<scalar_t>(corner[d] == c ? g[d] : acc_t(0));
            }
          }
        } else {
          write_row(g, head_dim, grad_token(w.b, y, x) + q_channel);
        }
        if (p.add_bias) {
          for (int64_t d = 0; d < head_dim; ++d) bias_grad[q_channel + d] += g[d];
        }
      }
    }
    // Tokens of the window that no kept query covers (past the pooled crop) get zero q gradients.
    const int64_t covered_h = num_queries > 0 ? step * w.kept_h : 0, covered_w = num_queries > 0 ? step * w.kept_w : 0;
    for (int64_t j = 0; j < in_map; ++j) {
      const auto [y, x] = key_place(j);
      if (y - w.y0 < covered_h && x - w.x0 < covered_w) continue;
      scalar_t* g = grad_token(w.b, y, x) + q_channel;
      std::fill(g, g + head_dim, scalar_t(0));
    }
    // dK and dV back to rows (in the keys' and values' buffers), to their tokens.
    acc_t* grad_keys = keys.data();
    acc_t* grad_values = values.data();
    transpose(grad_keys_t.data(), head_dim, num_keys, key_ld, grad_keys, head_dim);
    transpose(grad_values_t.data(), head_dim, num_keys, key_ld, grad_values, head_dim);
    for (int64_t j = 0; j < in_map; ++j) {
      const auto [y, x] = key_place(j);
      scalar_t* g = grad_token(w.b, y, x);
      write_row(grad_keys + j * head_dim, head_dim, g + k_channel);
      write_row(grad_values + j * head_dim, head_dim, g + v_channel);
    }
    // The bias gets the padding key's gradients, and with add_bias every token's.
    for (int64_t j = p.add_bias ? 0 : in_map; j < num_keys; ++j) {
      for (int64_t d = 0; d < head_dim; ++d) {
        bias_grad[k_channel + d] += grad_keys[j * head_dim + d];
        bias_grad[v_channel + d] += grad_values[j * head_dim + d];
      }
    }
  }
}

// backward_tasks compiled for AVX2 + FMA and for the baseline ISA, per input dtype.
SAM2_FAST_MULTIVERSION
void run_backward_tasks(const BackwardProblem<float>& p, int64_t range, int64_t begin, int64_t end) {
  backward_tasks(p, range, begin, end);
}
SAM2_FAST_MULTIVERSION
void run_backward_tasks(const BackwardProblem<double>& p, int64_t range, int64_t begin, int64_t end) {
  backward_tasks(p, range, begin, end);
}
SAM2_FAST_MULTIVERSION
void run_backward_tasks(const BackwardProblem<c10::BFloat16>& p, int64_t range, int64_t begin, int64_t end) {
  backward_tasks(p, range, begin, end);
}
SAM2_FAST_MULTIVERSION
void run_backward_tasks(const BackwardProblem<c10::Half>& p, int64_t range, int64_t begin, int64_t end) {
  backward_tasks(p, range, begin, end);
}

std::tuple<at::Tensor, at::Tensor> attention_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& qkv_in, const std::optional<at::Tensor>& qkv_bias,
    const at::Tensor& out_in, int64_t num_heads, int64_t window_size, bool q_pool, bool add_bias) {
  check_qkv("attention_backward", qkv_in, num_heads);
  TORCH_CHECK(window_size >= 0, "attention_backward: expected window_size >= 0 (0: global), got ", window_size);
  TORCH_CHECK(!q_pool || window_size % 2 == 0, "attention_backward: q_pool needs an even window_size, got ",
              window_size);
  TORCH_CHECK(!add_bias || qkv_bias.has_value(), "attention_backward: add_bias needs a qkv_bias, got None");
  const at::Tensor qkv = with_unit_channel_stride(qkv_in);
  const int64_t batch = qkv.size(0), height = qkv.size(1), width = qkv.size(2), dim = qkv.size(3) / 3;
  const int64_t head_dim = dim / num_heads, step = q_pool ? 2 : 1;
  const WindowTasks tasks = WindowTasks::of(batch, height, width, num_heads, window_size, q_pool);
  const std::vector<int64_t> out_shape{batch, tasks.out_h, tasks.out_w, dim};
  for (const auto& [name, tensor] : {std::pair{"grad_out", &grad_out_in}, std::pair{"out", &out_in}}) {
    check_sizes("attention_backward", name, *tensor, out_shape);
    check_dtype("attention_backward", name, *tensor, {qkv.scalar_type()});
    check_same_device("attention_backward", name, *tensor, "qkv", qkv);
  }
  const at::Tensor grad_out = grad_out_in.contiguous(), out = out_in.contiguous();
  at::Tensor bias;  // in qkv's dtype, as the forward reads it
  if (qkv_bias.has_value()) {
    check_qkv_bias("attention_backward", *qkv_bias, qkv);
    bias = qkv_bias->to(qkv.scalar_type()).contiguous();
  }
  at::Tensor grad_qkv = at::empty(qkv.sizes(), qkv.options());

  const int64_t max_keys = tasks.max_keys(), max_queries = tasks.max_queries();
  const int64_t block_rows =
      std::min(max_queries, std::max(kMinQueryBlockRows, kScoreBlockElements / std::max<int64_t>(1, max_keys)));
  const at::ScalarType acc_type = qkv.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // One row per range of tasks of parallel_for_balanced (at most one range per thread), summed at the end. In
  // float64: with add_bias a row sums every token of its range, a chain thousands long that in fp32 rounded up to 6x
  // the reference's error (the qkv projection's bias gradient, a cascade sum in ATen) for a loss whose gradients
  // agree in sign across tokens.
  at::Tensor bias_grads = at::zeros({at::get_num_threads(), 3 * dim}, qkv.options().dtype(at::kDouble));
  const bool brgemm = acc_type == at::kFloat && brgemm_attention_backward();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv.scalar_type(), "attention_backward_cpu", [&] {
    const BackwardProblem<scalar_t> problem{
        qkv.const_data_ptr<scalar_t>(), qkv.stride(0), qkv.stride(1), qkv.stride(2),
        bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr, add_bias,
        grad_out.const_data_ptr<scalar_t>(), out.const_data_ptr<scalar_t>(), grad_qkv.mutable_data_ptr<scalar_t>(),
        bias_grads.mutable_data_ptr<double>(),
        tasks, dim, head_dim, step, block_rows, q_pool, brgemm};
    const auto task_cost = [&](int64_t task) { return tasks.cost(task, head_dim); };
    parallel_for_balanced(tasks.count, 1 << 18, task_cost,
                          [&](int64_t range, int64_t begin, int64_t end) {
                            run_backward_tasks(problem, range, begin, end);
                          });
  });
  if (!qkv_bias.has_value()) return {grad_qkv, at::empty({0}, qkv.options())};
  return {grad_qkv, bias_grads.sum(0).to(qkv_bias->scalar_type())};
}

}  // namespace

bool brgemm_attention_backward() { return brgemm_enabled.load() && brgemm_f32_usable(); }

void set_brgemm_attention_backward(bool enabled) { brgemm_enabled.store(enabled); }

}  // namespace sam2_fast

TORCH_LIBRARY_IMPL(sam2_fast_ext, CPU, m) {
  // Only with the BLAS the products need (see sgemm_ above); the op layer asks the dispatcher whether it is there.
  if (sgemm_ != nullptr && dgemm_ != nullptr) {
    m.impl("attention_backward", TORCH_FN(sam2_fast::attention_backward_cpu));
  }
}
