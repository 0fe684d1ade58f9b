// linear on CPU: input @ weight^T + bias in fp32 on ATen's fp32 brgemm (oneDNN's micro-kernels), the reduction summed
// in blocks.
//
// input: (M, K) with contiguous rows (any row stride); weight: (N, K), either with contiguous rows or the transpose
// of a matrix with contiguous rows (weight.t() of a (K, N) matrix, as the input's gradient g @ W passes it); bias:
// (N,) or none. fp32 on the CPU. Returns (M, N), contiguous.
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

#include "brgemm_f32.h"
#include "cpu_utils.h"
#include "transpose.h"

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

at::Tensor linear_cpu(const at::Tensor& input_in, const at::Tensor& weight_in,
                      const std::optional<at::Tensor>& bias_in) {
  TORCH_CHECK(input_in.dim() == 2 && weight_in.dim() == 2 && input_in.size(1) == weight_in.size(1),
              "linear: expected input (M, K) and weight (N, K), got ", input_in.sizes(), " and ", weight_in.sizes());
  TORCH_CHECK(input_in.scalar_type() == at::kFloat && weight_in.scalar_type() == at::kFloat,
              "linear: expected fp32 input and weight, got ", input_in.scalar_type(), " and ", weight_in.scalar_type());
  const int64_t rows = input_in.size(0), depth = input_in.size(1), cols = weight_in.size(0);
  const bool has_bias = bias_in.has_value() && bias_in->defined();
  if (has_bias) {
    TORCH_CHECK(bias_in->dim() == 1 && bias_in->size(0) == cols && bias_in->scalar_type() == at::kFloat,
                "linear: expected an fp32 bias of shape (", cols, "), got ", bias_in->scalar_type(), " of shape ",
                bias_in->sizes());
  }
  TORCH_CHECK(brgemm_f32_usable(), "linear: ATen's fp32 brgemm is not usable on this CPU");
  at::Tensor out = at::empty({rows, cols}, input_in.options());
  if (rows == 0 || cols == 0) return out;
  const at::Tensor input = input_in.stride(1) == 1 ? input_in : input_in.contiguous();
  const at::Tensor bias = has_bias ? bias_in->contiguous() : at::Tensor();
  // b = weight^T, (depth, cols) with contiguous rows: weight's own memory where weight is a transpose, else a copy.
  at::Tensor b;
  int64_t ld_b = 0;
  if (weight_in.stride(0) == 1 && weight_in.stride(1) >= cols) {
    b = weight_in;
    ld_b = weight_in.stride(1);
  } else {
    const at::Tensor weight = weight_in.contiguous();
    ld_b = padded_stride(cols);
    b = at::empty({depth, ld_b}, weight.options());
    const float* weight_data = weight.const_data_ptr<float>();
    float* b_data = b.mutable_data_ptr<float>();
    at::parallel_for(0, cols, kTransposeRows, [&](int64_t begin, int64_t end) {
      transpose_rows(weight_data, depth, begin, end, depth, b_data, ld_b);
    });
  }
  const float* a_data = input.const_data_ptr<float>();
  const float* b_data = b.const_data_ptr<float>();
  const float* bias_data = has_bias ? bias.const_data_ptr<float>() : nullptr;
  float* out_data = out.mutable_data_ptr<float>();
  const int64_t ld_a = std::max<int64_t>(input.stride(0), depth);
  const int64_t row_blocks = (rows + kRowBlock - 1) / kRowBlock, col_blocks = (cols + kColBlock - 1) / kColBlock;
  at::parallel_for(0, row_blocks * col_blocks, 1, [&](int64_t first, int64_t last) {
    std::vector<float> partial(kRowBlock * kColBlock);
    for (int64_t tile = first; tile < last; ++tile) {
      const int64_t i0 = tile / col_blocks * kRowBlock, j0 = tile % col_blocks * kColBlock;
      product_tile(a_data + i0 * ld_a, ld_a, b_data + j0, ld_b, bias_data == nullptr ? nullptr : bias_data + j0,
                   out_data + i0 * cols + j0, cols, std::min(kRowBlock, rows - i0), std::min(kColBlock, cols - j0),
                   depth, partial.data());
    }
    at::native::cpublas::brgemm_release(false);
  });
  return out;
}

}  // namespace
}  // namespace sam2_fast

TORCH_LIBRARY_IMPL(sam2_fast_ext, CPU, m) { m.impl("linear", TORCH_FN(sam2_fast::linear_cpu)); }
