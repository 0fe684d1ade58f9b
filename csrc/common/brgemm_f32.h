// ATen's fp32 brgemm (oneDNN's micro-kernels from AVX2 up): whether it can be used here, and the strides its operands
// get; the correctness check of its fp32 and bf16 forms.
#pragma once

#include <algorithm>
#include <cstdint>

namespace sam2_fast {

// Whether ATen's fp32 brgemm computes a small product in plain row-major layout correctly here (checked once) and
// oneDNN is enabled in torch. ATen runs it on oneDNN's micro-kernels where oneDNN's ISA is AVX2 or above (capped by
// ONEDNN_MAX_CPU_ISA), and below that on its own BLAS gemm instead, so the check fails only where oneDNN is
// disabled (torch.backends.mkldnn) or ATen's brgemm raises or computes wrongly.
bool brgemm_f32_usable();

// Raises unless brgemm_f32_usable(), naming `op`: the entry check of the kernels that need it.
void check_brgemm_f32_usable(const char* op);

// Whether ATen's brgemm computes a small product correctly here (it raises where oneDNN's micro-kernels are not built
// or not supported): `scalar_t` float in plain row-major layout, or c10::BFloat16 with B in VNNI layout, as the
// kernels call it. Not cached: each user checks once (brgemm_f32_usable, bf16_matrix_units_usable).
template <typename scalar_t>
bool brgemm_computes_small_product();

// The row stride of a matrix with n columns: n, or a little more where n columns make a multiple of 1 KB (fp32),
// whose rows would all fall into the same few cache sets (at 1024 keys the attention backward's products ran about
// 20% slower without it).
inline int64_t padded_stride(int64_t n) { return n % 256 == 0 ? n + 16 : n; }

// The largest padded_stride(m) over 0 <= m <= n, the row stride scratch needs to hold any matrix of at most n
// columns: padded_stride is not monotonic (padded_stride(256) = 272 > padded_stride(257) = 257).
inline int64_t max_padded_stride(int64_t n) { return std::max(padded_stride(n), n - n % 256 + 16); }

}  // namespace sam2_fast
