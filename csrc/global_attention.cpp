// global_attention on CPU: multi-head attention over all H * W tokens of each image (Hiera's global blocks).
//
// qkv: (B, H, W, 3 * dim), any strides over B, H, W, channels split as (3, num_heads, head_dim); fp32/bf16/fp16.
// out: (B, H_out, W_out, dim), contiguous, qkv's dtype; (H_out, W_out) = (H, W), or (H // 2, W // 2) with q_pool
// (q max-pooled 2x2, floor). fp32 accumulation, scale 1 / sqrt(head_dim), no mask.
//
// k and v of every (image, head) are first read once into fp32 buffers (k transposed); then each task takes a
// block of query rows of one (image, head) and runs the shared attention core against all keys, writing its rows
// of the output in place.

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "attention_gather.h"

namespace sam2_fast {
namespace {

// Query rows per task: the task's score rows (kQueryRowsPerTask * num_keys floats) stay in the L2 cache.
constexpr int64_t kQueryRowsPerTask = 32;
constexpr int64_t kTokensPerGatherTask = 64;

at::Tensor global_attention_cpu(const at::Tensor& qkv_in, int64_t num_heads, bool q_pool) {
  const at::Tensor qkv = checked_qkv(qkv_in, num_heads, "global_attention");
  const int64_t batch = qkv.size(0), height = qkv.size(1), width = qkv.size(2), dim = qkv.size(3) / 3;
  const int64_t head_dim = dim / num_heads;
  const int64_t out_h = q_pool ? height / 2 : height, out_w = q_pool ? width / 2 : width;
  at::Tensor out = at::empty({batch, out_h, out_w, dim}, qkv.options());
  if (out.numel() == 0) return out;

  const int64_t num_tokens = height * width, num_queries = out_h * out_w;
  const AttentionShape key_shape{kQueryRowsPerTask, num_tokens, head_dim};
  const int64_t keys_size = head_dim * key_shape.key_stride(), values_size = num_tokens * key_shape.value_stride();
  const int64_t num_maps = batch * num_heads;
  // Zero-initialized: the padding columns of keys_t and values stay zero, as attention_f32 expects.
  std::vector<float> keys_t(num_maps * keys_size), values(num_maps * values_size);
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(head_dim)));
  const int64_t query_blocks = (num_queries + kQueryRowsPerTask - 1) / kQueryRowsPerTask;
  const int64_t gather_blocks = (num_tokens + kTokensPerGatherTask - 1) / kTokensPerGatherTask;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv.scalar_type(), "global_attention_cpu", [&] {
    const TokenReader<scalar_t> reader{qkv.const_data_ptr<scalar_t>(), nullptr, qkv.stride(0), qkv.stride(1),
                                       qkv.stride(2), height, width};
    at::parallel_for(0, num_maps * gather_blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t block = task % gather_blocks, map = task / gather_blocks;
        const int64_t b = map / num_heads, head = map % num_heads;
        const int64_t first = block * kTokensPerGatherTask;
        const int64_t last = std::min(num_tokens, first + kTokensPerGatherTask);
        for (int64_t j = first; j < last; ++j) {
          read_key_value(reader.token(b, j / width, j % width), dim + head * head_dim, 2 * dim + head * head_dim,
                         head_dim, j, key_shape, keys_t.data() + map * keys_size, values.data() + map * values_size);
        }
      }
    });

    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, num_maps * query_blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> queries(key_shape.query_rows() * head_dim);
      std::vector<float> scores(key_shape.query_rows() * key_shape.key_stride());
      std::vector<float> result(key_shape.query_rows() * key_shape.value_stride());
      for (int64_t task = begin; task < end; ++task) {
        const int64_t block = task % query_blocks, map = task / query_blocks;
        const int64_t b = map / num_heads, head = map % num_heads;
        const int64_t first = block * kQueryRowsPerTask;
        const int64_t count = std::min(num_queries - first, kQueryRowsPerTask);
        const AttentionShape shape{count, num_tokens, head_dim};
        std::fill(queries.begin(), queries.end(), 0.0f);
        for (int64_t i = 0; i < count; ++i) {
          const int64_t qy = (first + i) / out_w, qx = (first + i) % out_w;
          const int64_t step = q_pool ? 2 : 1;
          read_query(reader, b, step * qy, step * qx, q_pool, head * head_dim, head_dim,
                     queries.data() + i * head_dim);
        }
        attention_f32(shape, scale, queries.data(), keys_t.data() + map * keys_size,
                      values.data() + map * values_size, scores.data(), result.data());
        for (int64_t i = 0; i < count; ++i) {
          const float* src = result.data() + i * shape.value_stride();
          scalar_t* out_token = dst + (b * num_queries + first + i) * dim + head * head_dim;
          for (int64_t d = 0; d < head_dim; ++d) out_token[d] = static_cast<scalar_t>(src[d]);
        }
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace sam2_fast

TORCH_LIBRARY_IMPL(sam2_fast_ext, CPU, m) {
  m.impl("global_attention", TORCH_FN(sam2_fast::global_attention_cpu));
}
