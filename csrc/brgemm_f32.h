// ATen's fp32 brgemm (oneDNN's micro-kernels): whether it can be used here, and the strides its operands get.
#pragma once

#include <cstdint>

namespace sam2_fast {

// Whether ATen's fp32 brgemm computes a small product in plain row-major layout correctly on this CPU (checked once:
// it raises where oneDNN's micro-kernels are not built or do not support the CPU) and oneDNN is enabled in torch.
bool brgemm_f32_usable();

// The row stride of a matrix with n columns: n, or a little more where n columns make a multiple of 1 KB (fp32),
// whose rows would all fall into the same few cache sets (at 1024 keys the attention backward's products ran about
// 20% slower without it).
inline int64_t padded_stride(int64_t n) { return n % 256 == 0 ? n + 16 : n; }

}  // namespace sam2_fast
