// The boundary of every kernel of sam2_fast_ext, CPU and CUDA: the checks each entry point runs on its tensor
// arguments (shape, dtype, device, with messages that name what was expected and what came), and the layouts a
// kernel may read an operand in. An operand reaches a kernel either through one of the layout functions below or
// read with exactly the strides it has; no kernel derives a stride or a leading dimension that was not checked here.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <sstream>

namespace sam2_fast {

// The floating dtypes the map kernels dispatch over (AT_DISPATCH_FLOATING_TYPES_AND2(kBFloat16, kHalf, ...)).
inline constexpr std::array<at::ScalarType, 4> kFloatingDtypes{at::kFloat, at::kBFloat16, at::kHalf, at::kDouble};

// Raises unless `tensor` has `dims` dimensions: "<op>: expected <name> of shape <shape>, got [...]".
inline void check_dims(const char* op, const char* name, const at::Tensor& tensor, int64_t dims, const char* shape) {
  TORCH_CHECK(tensor.dim() == dims, op, ": expected ", name, " of shape ", shape, ", got ", tensor.sizes());
}

// Raises unless `tensor` has exactly the sizes `expected`.
inline void check_sizes(const char* op, const char* name, const at::Tensor& tensor, at::IntArrayRef expected) {
  TORCH_CHECK(tensor.sizes() == expected, op, ": expected ", name, " of shape ", expected, ", got ", tensor.sizes());
}

// Raises unless `tensor`'s dtype is one of `dtypes`: "<op>: expected <name> of dtype Float or Double, got Int".
inline void check_dtype(const char* op, const char* name, const at::Tensor& tensor,
                        c10::ArrayRef<at::ScalarType> dtypes) {
  if (std::find(dtypes.begin(), dtypes.end(), tensor.scalar_type()) != dtypes.end()) return;
  std::ostringstream expected;
  for (size_t i = 0; i < dtypes.size(); ++i) {
    expected << (i == 0 ? "" : (i + 1 == dtypes.size() ? " or " : ", ")) << dtypes[i];
  }
  TORCH_CHECK(false, op, ": expected ", name, " of dtype ", expected.str(), ", got ", tensor.scalar_type());
}

// Raises unless `tensor` is on the device of `reference` (the op's argument named `reference_name`).
inline void check_same_device(const char* op, const char* name, const at::Tensor& tensor, const char* reference_name,
                              const at::Tensor& reference) {
  TORCH_CHECK(tensor.device() == reference.device(), op, ": expected ", name, " on the device of ", reference_name,
              " (", reference.device(), "), got ", tensor.device());
}

// Raises unless `qkv` is an attention op's (B, H, W, 3 * dim) map of a floating dtype whose channels split as
// (3, num_heads, head_dim).
inline void check_qkv(const char* op, const at::Tensor& qkv, int64_t num_heads) {
  check_dims(op, "qkv", qkv, 4, "(B, H, W, 3 * dim)");
  check_dtype(op, "qkv", qkv, kFloatingDtypes);
  TORCH_CHECK(num_heads > 0 && qkv.size(3) % (3 * num_heads) == 0, op, ": qkv's last dim ", qkv.size(3),
              " is not a multiple of 3 * num_heads = ", 3 * num_heads);
}

// Raises unless `qkv_bias` is the (3 * dim,) floating bias of `qkv` (B, H, W, 3 * dim), on its device.
inline void check_qkv_bias(const char* op, const at::Tensor& qkv_bias, const at::Tensor& qkv) {
  check_sizes(op, "qkv_bias", qkv_bias, {qkv.size(3)});
  check_dtype(op, "qkv_bias", qkv_bias, kFloatingDtypes);
  check_same_device(op, "qkv_bias", qkv_bias, "qkv", qkv);
}

// Raises unless lateral (B, C, 2h, 2w) and prev (B, C, h, w) are fpn_upsample_add's floating maps, on one device.
inline void check_fpn_upsample_add_args(const at::Tensor& lateral, const at::Tensor& prev) {
  check_dims("fpn_upsample_add", "lateral", lateral, 4, "(B, C, 2h, 2w)");
  check_dims("fpn_upsample_add", "prev", prev, 4, "(B, C, h, w)");
  check_sizes("fpn_upsample_add", "lateral", lateral,
              {prev.size(0), prev.size(1), 2 * prev.size(2), 2 * prev.size(3)});
  check_dtype("fpn_upsample_add", "lateral", lateral, kFloatingDtypes);
  check_dtype("fpn_upsample_add", "prev", prev, kFloatingDtypes);
  check_same_device("fpn_upsample_add", "prev", prev, "lateral", lateral);
}

// Whether a (rows, cols) matrix can be read as it lies as row-major with unit column stride, rows stride(0) elements
// apart and not overlapping (stride(0) >= cols). A dimension of size 1 is never stepped over, so its stride does not
// matter; an empty matrix has nothing to read.
inline bool is_row_major(const at::Tensor& matrix) {
  const int64_t rows = matrix.size(0), cols = matrix.size(1);
  return matrix.numel() == 0 || ((cols == 1 || matrix.stride(1) == 1) && (rows == 1 || matrix.stride(0) >= cols));
}

// A matrix as the GEMM kernels read it: row-major with unit column stride, row i at data + i * ld, with
// ld >= max(cols, 1), so that rows never overlap and brgemm gets a leading dimension it accepts.
struct RowMajor {
  at::Tensor matrix;
  int64_t ld;
};

// `matrix` (2-D) itself where is_row_major (padded rows, one row of any stride), else a contiguous copy of it (a
// broadcast operand with stride 0, a transposed or column-strided one).
inline RowMajor row_major(const at::Tensor& matrix) {
  TORCH_CHECK(matrix.dim() == 2, "row_major: expected a matrix, got shape ", matrix.sizes());
  const at::Tensor rows = is_row_major(matrix) ? matrix : matrix.contiguous();
  const bool any_row_stride = rows.size(0) == 1 || rows.numel() == 0;
  return {rows, any_row_stride ? std::max<int64_t>(rows.size(1), 1) : rows.stride(0)};
}

// `map` itself where its last dimension (channels) has unit stride or a single element, else a contiguous copy: for
// kernels that read a run of channels per token and step over the other dimensions with the map's own strides,
// whatever they are (0 and overlapping included: they only read the map).
inline at::Tensor with_unit_channel_stride(const at::Tensor& map) {
  return map.numel() == 0 || map.size(-1) == 1 || map.stride(-1) == 1 ? map : map.contiguous();
}

}  // namespace sam2_fast
