// linear_weight_grad on CPU: a linear layer's weight and bias gradients, dW = grad^T input and db = the column sums
// of grad, fp32, on ATen's fp32 brgemm (oneDNN's micro-kernels).
//
// grad: (M, N), input: (M, K), fp32 on the CPU, any strides: each is read row-major as it lies where its rows do not
// overlap (row_major, tensor_args.h), else from a contiguous copy (a broadcast gradient with stride 0, a transposed
// one). with_bias: whether to return db. Returns dW (N, K), contiguous, and db (N,) (shape (0,) without with_bias).
//
// The threads split the M rows into equal ranges. For each chunk of kRowChunk rows a thread transposes a block of
// kOutBlock columns of grad at a time (in registers) and brgemm adds its product with the chunk of input into the
// thread's partial dW, kColBlock columns at a time so that the operands stay in cache; the bias gradient sums the same
// transposed rows in float64. The partials are then added in thread order, so the result depends on the thread count only.
// Each output sums kRowChunk products in one chain, then the chunks: the rounding of a blocked sum. Used by
// sam2_fast.cpu_gemm in training where oneDNN is the chosen fp32 library, only where brgemm_f32_usable(): against
// the BLAS's mm and sum it took 1.0x-1.3x less time at the encoder's shapes on an AMD EPYC Zen 4, with less rounding.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "brgemm_f32.h"
#include "cpu_utils.h"
#include "tensor_args.h"
#include "transpose.h"

namespace sam2_fast {
namespace {

constexpr int64_t kRowChunk = 128;  // rows of grad and input per product (the reduction depth of one brgemm call)
constexpr int64_t kOutBlock = 64;   // dW rows per transposed block of grad
constexpr int64_t kColBlock = 512;  // dW columns per brgemm call

// Rows [0, rows) of grad and input into the partial dW (n, k; rows ld_partial apart) and the partial db (or null).
SAM2_FAST_MULTIVERSION
void accumulate_rows(const float* grad, int64_t ld_grad, const float* input, int64_t ld_input, int64_t rows, int64_t n,
                     int64_t k, float* partial, int64_t ld_partial, double* bias_partial, float* scratch) {
  for (int64_t m0 = 0; m0 < rows; m0 += kRowChunk) {
    const int64_t chunk = std::min(kRowChunk, rows - m0);
    for (int64_t n0 = 0; n0 < n; n0 += kOutBlock) {
      const int64_t block = std::min(kOutBlock, n - n0);
      transpose(grad + m0 * ld_grad + n0, chunk, block, ld_grad, scratch, kRowChunk);  // (block, chunk)
      if (bias_partial != nullptr) {
        for (int64_t i = 0; i < block; ++i) {
          double sum = 0.0;
          for (int64_t j = 0; j < chunk; ++j) sum += scratch[i * kRowChunk + j];
          bias_partial[n0 + i] = m0 == 0 ? sum : bias_partial[n0 + i] + sum;
        }
      }
      for (int64_t k0 = 0; k0 < k; k0 += kColBlock) {
        at::native::cpublas::brgemm(block, std::min(kColBlock, k - k0), chunk, kRowChunk, ld_input, ld_partial, m0 > 0,
                                    scratch, input + m0 * ld_input + k0, partial + n0 * ld_partial + k0, false);
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor> linear_weight_grad_cpu(const at::Tensor& grad_in, const at::Tensor& input_in,
                                                          bool with_bias) {
  check_dims("linear_weight_grad", "grad", grad_in, 2, "(M, N)");
  check_dims("linear_weight_grad", "input", input_in, 2, "(M, K)");
  TORCH_CHECK(grad_in.size(0) == input_in.size(0), "linear_weight_grad: expected grad (M, N) and input (M, K), got ",
              grad_in.sizes(), " and ", input_in.sizes());
  check_dtype("linear_weight_grad", "grad", grad_in, {at::kFloat});
  check_dtype("linear_weight_grad", "input", input_in, {at::kFloat});
  check_same_device("linear_weight_grad", "input", input_in, "grad", grad_in);
  check_brgemm_f32_usable("linear_weight_grad");
  const RowMajor grad = row_major(grad_in), input = row_major(input_in);
  const int64_t rows = grad_in.size(0), n = grad_in.size(1), k = input_in.size(1);
  const int64_t ld_partial = padded_stride(k);
  // Ranges of whole chunks, at most one per thread.
  const int64_t chunks = (rows + kRowChunk - 1) / kRowChunk;
  const int64_t ranges = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), chunks));
  at::Tensor partials = at::empty({ranges, n, ld_partial}, grad_in.options());
  // The bias gradient sums M rows: in float64, since in fp32 its chains (kRowChunk rows, then the chunks) rounded
  // up to 8x ATen's cascade sum for a gradient whose rows agree in sign (a loss broadcast over the pixels).
  at::Tensor bias_partials = at::empty({ranges, with_bias ? n : 0}, grad_in.options().dtype(at::kDouble));
  if (rows == 0) {
    partials.zero_();
    bias_partials.zero_();
  }
  const float* grad_data = grad.matrix.const_data_ptr<float>();
  const float* input_data = input.matrix.const_data_ptr<float>();
  float* partial_data = partials.mutable_data_ptr<float>();
  double* bias_data = with_bias ? bias_partials.mutable_data_ptr<double>() : nullptr;
  const int64_t ld_grad = grad.ld, ld_input = input.ld;
  at::parallel_for(0, ranges, 1, [&](int64_t first, int64_t last) {
    std::vector<float> scratch(kOutBlock * kRowChunk);
    for (int64_t r = first; r < last; ++r) {
      const int64_t begin = chunks * r / ranges * kRowChunk;
      const int64_t end = std::min(rows, chunks * (r + 1) / ranges * kRowChunk);
      accumulate_rows(grad_data + begin * ld_grad, ld_grad, input_data + begin * ld_input, ld_input, end - begin, n, k,
                      partial_data + r * n * ld_partial, ld_partial, bias_data == nullptr ? nullptr : bias_data + r * n,
                      scratch.data());
    }
  });
  at::Tensor weight_grad = (ranges == 1 ? partials[0] : partials.sum(0)).narrow(1, 0, k).contiguous();
  at::Tensor bias_grad = with_bias ? bias_partials.sum(0).to(at::kFloat) : at::empty({0}, grad_in.options());
  return {weight_grad, bias_grad};
}

}  // namespace
}  // namespace sam2_fast

TORCH_LIBRARY_IMPL(sam2_fast_ext, CPU, m) {
  m.impl("linear_weight_grad", TORCH_FN(sam2_fast::linear_weight_grad_cpu));
}
