// Reading q, k and v of one head out of a channels-last (B, H, W, 3 * dim) qkv map into the fp32 buffers of
// attention_core.h. Shared by the CPU window_attention and global_attention kernels.
#pragma once

#include <ATen/core/Tensor.h>

#include "attention_core.h"
#include "cpu_utils.h"

namespace sam2_fast {

// Where each token's 3 * dim channels are: qkv[b, y, x, :] inside the map, `fill` (the qkv bias, or zeros) for the
// padding tokens a window reaches beyond it.
template <typename scalar_t>
struct TokenReader {
  const scalar_t* data;
  const scalar_t* fill;
  int64_t stride_b, stride_h, stride_w, height, width;

  const scalar_t* token(int64_t b, int64_t y, int64_t x) const {
    return (y < height && x < width) ? data + b * stride_b + y * stride_h + x * stride_w : fill;
  }
};

// q row: channels [offset, offset + head_dim) of a token, or with `pooled` the NaN-propagating max over the 2x2
// tokens (y, x), (y, x + 1), (y + 1, x), (y + 1, x + 1), as MaxPool2d(2, 2) computes it.
template <typename scalar_t>
inline void read_query(
    const TokenReader<scalar_t>& reader, int64_t b, int64_t y, int64_t x, bool pooled, int64_t offset,
    int64_t head_dim, float* dst) {
  const scalar_t* t00 = reader.token(b, y, x) + offset;
  if (!pooled) {
    for (int64_t d = 0; d < head_dim; ++d) dst[d] = static_cast<float>(t00[d]);
    return;
  }
  const scalar_t* t01 = reader.token(b, y, x + 1) + offset;
  const scalar_t* t10 = reader.token(b, y + 1, x) + offset;
  const scalar_t* t11 = reader.token(b, y + 1, x + 1) + offset;
  for (int64_t d = 0; d < head_dim; ++d) {
    dst[d] = static_cast<float>(nan_max(nan_max(t00[d], t01[d]), nan_max(t10[d], t11[d])));
  }
}

// Key j and value j of a head from one token: keys_t[:, j] (transposed) and values[j, :].
template <typename scalar_t>
inline void read_key_value(
    const scalar_t* token, int64_t key_offset, int64_t value_offset, int64_t head_dim, int64_t j,
    const AttentionShape& shape, float* keys_t, float* values) {
  const int64_t key_stride = shape.key_stride();
  for (int64_t d = 0; d < head_dim; ++d) keys_t[d * key_stride + j] = static_cast<float>(token[key_offset + d]);
  float* value_row = values + j * shape.value_stride();
  for (int64_t d = 0; d < head_dim; ++d) value_row[d] = static_cast<float>(token[value_offset + d]);
}

// Checks a (B, H, W, 3 * dim) qkv map and returns it with contiguous channels.
inline at::Tensor checked_qkv(const at::Tensor& qkv, int64_t num_heads, const char* op_name) {
  TORCH_CHECK(qkv.dim() == 4, op_name, ": expected qkv of shape (B, H, W, 3 * dim), got ", qkv.sizes());
  TORCH_CHECK(num_heads > 0 && qkv.size(3) % (3 * num_heads) == 0, op_name, ": qkv's last dim ", qkv.size(3),
              " is not a multiple of 3 * num_heads = ", 3 * num_heads);
  return qkv.stride(3) == 1 ? qkv : qkv.contiguous();
}

}  // namespace sam2_fast
