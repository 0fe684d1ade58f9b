// linear on CPU: input @ weight^T + bias in fp32 on ATen's fp32 brgemm (oneDNN's micro-kernels), the reduction summed
// in blocks.
//
// input: (M, K), weight: (N, K), bias: (N,) or none; fp32 on the CPU, any strides. Returns (M, N), contiguous.
// input is read row-major as it lies where its rows do not overlap (row_major, tensor_args.h: padded rows, one row),
// else from a contiguous copy (a broadcast gradient with stride 0, a transposed or column-strided input); weight is
// read as it lies where it is the transpose of such a matrix (weight.t() of a (K, N) matrix, as the input's gradient
// g @ W passes it), else transposed once from its row-major form into a scratch matrix.
//
// The output is cut into tiles of kRowBlock x kColBlock, and the threads take equal ranges of tiles, row block by row
// block. A tile's first kDepthBlock terms are summed by brgemm straight into the output, each further kDepthBlock
// into a scratch tile that is then added; the bias comes last. Each output is thus a sum of chains of at most
// kDepthBlock products, where oneDNN's GEMM runs one chain over the whole K. On an AMD EPYC Zen 4, over the layers of
// a tiny 512x512 training step (O(1) operands), the worst relative error against float64 was 2.0e-7 to 3.9e-7 for
// the product and 2.3e-7 to 4.5e-7 for the input's gradient, against MKL's 2.3e-7 to 5.0e-7 and 2.7e-7 to 6.4e-7;
// oneDNN's reached 8.7e-7 at K = 1536 and one brgemm chain 1.7e-6 at K = 3072. Used by sam2_fast.cpu_gemm for the
// product and the input's gradient in training, where brgemm_f32_usable().

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#include "common/brgemm_f32.h"
#include "common/cpu_utils.h"
#include "common/tensor_args.h"
#include "common/transpose.h"

namespace sam2_fast {
namespace {

constexpr int64_t kRowBlock = 64;     // output rows per tile
constexpr int64_t kColBlock = 64;     // output columns per tile
constexpr int64_t kDepthBlock = 128;  // products per chain: the reduction depth of one brgemm call
constexpr int64_t kTransposeRows = 64;  // rows of weight per task of its transpose

// The tile out[rows, cols] (ld_out) = a[rows, depth] (ld_a) @ b[depth, cols] (ld_b) + bias[cols] (or none), with
// `partial` (kRowBlock x kColBlock) as scratch.
SAM2_FAST_MULTIVERSION
void product_tile(const float* a, int64_t ld_a, const float* b, int64_t ld_b, const float* bias, float* out,
                  int64_t ld_out, int64_t rows, int64_t cols, int64_t depth, float* partial) {
  if (depth == 0) {
    for (int64_t i = 0; i < rows; ++i) {
      for (int64_t j = 0; j < cols; ++j) out[i * ld_out + j] = 0.0f;
    }
  } else {
    at::native::cpublas::brgemm(rows, cols, std::min(kDepthBlock, depth), ld_a, ld_b, ld_out, false, a, b, out, false);
  }
  for (int64_t k0 = kDepthBlock; k0 < depth; k0 += kDepthBlock) {
    at::native::cpublas::brgemm(rows, cols, std::min(kDepthBlock, depth - k0), ld_a, ld_b, kColBlock, false, a + k0,
                                b + k0 * ld_b, partial, false);
    for (int64_t i = 0; i < rows; ++i) {
      for (int64_t j = 0; j < cols; ++j) out[i * ld_out + j] += partial[i * kColBlock + j];
    }
  }
  if (bias != nullptr) {
    for (int64_t i = 0; i < rows; ++i) {
      for (int64_t j = 0; j < cols; ++j) out[i * ld_out + j] += bias[j];
    }
  }
}

// weight (n rows of k, ld_weight apart) transposed into dst (k rows of n, ld_dst apart): rows [begin, end) of weight.
SAM2_FAST_MULTIVERSION
void transpose_rows(const float* weight, int64_t ld_weight, int64_t begin, int64_t end, int64_t k, float* dst,
                    int64_t ld_dst) {
  transpose(weight + begin * ld_weight, end - begin, k, ld_weight, dst + begin, ld_dst);
}

// The transpose of weight (cols, depth), as a new row-major matrix with rows padded_stride(cols) apart.
RowMajor transposed(const RowMajor& weight) {
  const int64_t cols = weight.matrix.size(0), depth = weight.matrix.size(1);
  const RowMajor b{at::empty({depth, padded_stride(cols)}, weight.matrix.options()), padded_stride(cols)};
  const float* weight_data = weight.matrix.const_data_ptr<float>();
  float* b_data = b.matrix.mutable_data_ptr<float>();
  at::parallel_for(0, cols, kTransposeRows, [&](int64_t begin, int64_t end) {
    transpose_rows(weight_data, weight.ld, begin, end, depth, b_data, b.ld);
  });
  return b;
}

at::Tensor linear_cpu(const at::Tensor& input_in, const at::Tensor& weight_in,
                      const std::optional<at::Tensor>& bias_in) {
  check_dims("linear", "input", input_in, 2, "(M, K)");
  check_dims("linear", "weight", weight_in, 2, "(N, K)");
  TORCH_CHECK(input_in.size(1) == weight_in.size(1), "linear: expected input (M, K) and weight (N, K), got ",
              input_in.sizes(), " and ", weight_in.sizes());
  check_dtype("linear", "input", input_in, {at::kFloat});
  check_dtype("linear", "weight", weight_in, {at::kFloat});
  check_same_device("linear", "weight", weight_in, "input", input_in);
  const int64_t rows = input_in.size(0), depth = input_in.size(1), cols = weight_in.size(0);
  const bool has_bias = bias_in.has_value() && bias_in->defined();
  if (has_bias) {
    check_sizes("linear", "bias", *bias_in, {cols});
    check_dtype("linear", "bias", *bias_in, {at::kFloat});
    check_same_device("linear", "bias", *bias_in, "input", input_in);
  }
  check_brgemm_f32_usable("linear");
  at::Tensor out = at::empty({rows, cols}, input_in.options());
  if (rows == 0 || cols == 0) return out;
  const RowMajor a = row_major(input_in);
  const at::Tensor bias = has_bias ? bias_in->contiguous() : at::Tensor();
  // b = weight^T, (depth, cols): weight's own memory where weight is the transpose of a row-major matrix.
  const RowMajor b = is_row_major(weight_in.t()) ? row_major(weight_in.t()) : transposed(row_major(weight_in));
  const float* a_data = a.matrix.const_data_ptr<float>();
  const float* b_data = b.matrix.const_data_ptr<float>();
  const float* bias_data = has_bias ? bias.const_data_ptr<float>() : nullptr;
  float* out_data = out.mutable_data_ptr<float>();
  const int64_t row_blocks = (rows + kRowBlock - 1) / kRowBlock, col_blocks = (cols + kColBlock - 1) / kColBlock;
  at::parallel_for(0, row_blocks * col_blocks, 1, [&](int64_t first, int64_t last) {
    std::vector<float> partial(kRowBlock * kColBlock);
    for (int64_t tile = first; tile < last; ++tile) {
      const int64_t i0 = tile / col_blocks * kRowBlock, j0 = tile % col_blocks * kColBlock;
      product_tile(a_data + i0 * a.ld, a.ld, b_data + j0, b.ld, bias_data == nullptr ? nullptr : bias_data + j0,
                   out_data + i0 * cols + j0, cols, std::min(kRowBlock, rows - i0), std::min(kColBlock, cols - j0),
                   depth, partial.data());
    }
  });
  return out;
}

}  // namespace
}  // namespace sam2_fast

TORCH_LIBRARY_IMPL(sam2_fast_ext, CPU, m) { m.impl("linear", TORCH_FN(sam2_fast::linear_cpu)); }
