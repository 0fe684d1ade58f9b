// linear_weight_grad on CPU: a linear layer's weight and bias gradients, dW = grad^T input and db = the column sums
// of grad, fp32, on ATen's fp32 brgemm (oneDNN's micro-kernels).
//
// grad: (M, N), input: (M, K), fp32 on the CPU, any strides: each is read row-major as it lies where its rows do not
// overlap (row_major, tensor_args.h), else from a contiguous copy (a broadcast gradient with stride 0, a transposed
// one). with_bias: whether to return db. Returns dW (N, K), contiguous, and db (N,) (shape (0,) without with_bias).
//
// The threads split the M rows into ranges of whole chains. For each chain of rows a thread transposes a block of
// kOutBlock columns of grad at a time (in registers); brgemm sums its product with the chain's rows of input,
// kColBlock columns at a time so that the operands stay in cache, straight into the thread's partial dW for the first
// chain and into a scratch tile added to it for each later one; the bias gradient sums the same transposed rows in
// float64. The partials are then added in thread order, so the result depends on the thread count only.
// Rounding: each output is a two-level sum, `chain` products in one fp32 chain, then the chains. Its error grows with
// the chain length plus the number of chains, least where the chain is about the square root of a thread's rows;
// chain_rows picks that within 64 to 128 rows. One chain over all of a thread's rows (this kernel before) rounded
// 7x worse on 4096 rows of positive products, and 3x worse than oneDNN's convolution backward (which sums each image
// row first) for a 1x1 convolution's weight over 2 x 8 x 12 pixels. Chains of 32 rows cost up to 1.5x the time at
// the encoder's small-M shapes (each chain is another brgemm call and tile add); 64-128 cost 1.0x-1.05x of one chain
// at most shapes, the tiny encoder's fp32 training step 2.30 against 2.26 s (within its run-to-run spread; AMD EPYC
// Zen 4, 2 threads). Used by sam2_fast.cpu_gemm in training where oneDNN is the chosen fp32 library, only where
// brgemm_f32_usable().

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

#include "common/brgemm_f32.h"
#include "common/cpu_utils.h"
#include "common/tensor_args.h"
#include "common/transpose.h"

namespace sam2_fast {
namespace {

constexpr int64_t kMaxChain = 128;  // most rows of grad and input per fp32 chain (the depth of one brgemm call)
constexpr int64_t kMinChain = 64;   // fewest rows per chain (see the top of the file)
constexpr int64_t kOutBlock = 64;   // dW rows per transposed block of grad
constexpr int64_t kColBlock = 512;  // dW columns per brgemm call

// The rows of one fp32 chain for a thread that sums `rows` rows (see the top of the file).
int64_t chain_rows(int64_t rows) {
  const auto root = static_cast<int64_t>(std::ceil(std::sqrt(static_cast<double>(rows))));
  return std::clamp<int64_t>((root + 15) / 16 * 16, kMinChain, kMaxChain);
}

// tile (rows x cols, rows ld_tile apart) added into out (rows ld_out apart).
inline void add_tile(const float* tile, int64_t ld_tile, int64_t rows, int64_t cols, float* out, int64_t ld_out) {
  for (int64_t i = 0; i < rows; ++i) {
    const float* from = tile + i * ld_tile;
    float* to = out + i * ld_out;
    for (int64_t j = 0; j < cols; ++j) to[j] += from[j];
  }
}

// Rows [0, rows) of grad and input, in chains of `chain` rows, into the partial dW (n, k; rows ld_partial apart) and
// the partial db (or null). transposed: kOutBlock x kMaxChain floats; tile: kOutBlock x max_padded_stride(kColBlock).
SAM2_FAST_MULTIVERSION
void accumulate_rows(const float* grad, int64_t ld_grad, const float* input, int64_t ld_input, int64_t rows,
                     int64_t chain, int64_t n, int64_t k, float* partial, int64_t ld_partial, double* bias_partial,
                     float* transposed, float* tile) {
  for (int64_t m0 = 0; m0 < rows; m0 += chain) {
    const int64_t depth = std::min(chain, rows - m0);
    for (int64_t n0 = 0; n0 < n; n0 += kOutBlock) {
      const int64_t block = std::min(kOutBlock, n - n0);
      transpose(grad + m0 * ld_grad + n0, depth, block, ld_grad, transposed, kMaxChain);  // (block, depth)
      if (bias_partial != nullptr) {
        for (int64_t i = 0; i < block; ++i) {
          double sum = 0.0;
          for (int64_t j = 0; j < depth; ++j) sum += transposed[i * kMaxChain + j];
          bias_partial[n0 + i] = m0 == 0 ? sum : bias_partial[n0 + i] + sum;
        }
      }
      for (int64_t k0 = 0; k0 < k; k0 += kColBlock) {
        const int64_t cols = std::min(kColBlock, k - k0);
        float* out = partial + n0 * ld_partial + k0;
        if (m0 == 0) {
          at::native::cpublas::brgemm(block, cols, depth, kMaxChain, ld_input, ld_partial, false, transposed,
                                      input + m0 * ld_input + k0, out, false);
        } else {
          // The tile's rows as far apart as its columns need (padded off multiples of 256 floats, which map the
          // rows onto few cache sets).
          const int64_t ld_tile = padded_stride(cols);
          at::native::cpublas::brgemm(block, cols, depth, kMaxChain, ld_input, ld_tile, false, transposed,
                                      input + m0 * ld_input + k0, tile, false);
          add_tile(tile, ld_tile, block, cols, out, ld_partial);
        }
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
  // Ranges of whole chains, at most one per thread.
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t chain = chain_rows((rows + threads - 1) / threads);
  const int64_t chains = (rows + chain - 1) / chain;
  const int64_t ranges = std::max<int64_t>(1, std::min<int64_t>(threads, chains));
  at::Tensor partials = at::empty({ranges, n, ld_partial}, grad_in.options());
  // The bias gradient sums M rows: in float64, since in fp32 its chains (then the chains' sums) rounded
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
    std::vector<float> transposed(kOutBlock * kMaxChain), tile(kOutBlock * max_padded_stride(kColBlock));
    for (int64_t r = first; r < last; ++r) {
      const int64_t begin = chains * r / ranges * chain;
      const int64_t end = std::min(rows, chains * (r + 1) / ranges * chain);
      accumulate_rows(grad_data + begin * ld_grad, ld_grad, input_data + begin * ld_input, ld_input, end - begin, chain,
                      n, k, partial_data + r * n * ld_partial, ld_partial,
                      bias_data == nullptr ? nullptr : bias_data + r * n, transposed.data(), tile.data());
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
