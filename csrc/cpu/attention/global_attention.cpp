// global_attention on CPU: multi-head attention over all H * W tokens of each image (Hiera's global blocks).
//
// qkv: (B, H, W, 3 * dim), any strides, channels split as (3, num_heads, head_dim); fp32/bf16/fp16/fp64.
// out: (B, H_out, W_out, dim), contiguous, qkv's dtype; (H_out, W_out) = (H, W), or (H // 2, W // 2) with q_pool
// (q max-pooled 2x2, floor, by this extension's maxpool2x2), scale 1 / sqrt(head_dim), no mask.
//
// bf16 on a CPU with bf16 matrix units (see attention_bf16.h): each image's keys and values are packed once per head
// into the brgemm operands, straight from the qkv map; then each (image, head, block of queries) runs the bf16 core
// over all keys and writes its rows of the output in place.
// Otherwise q, k and v are strided views of qkv (no copies) handed to ATen's fused CPU attention, whose blocked
// GEMMs beat the window kernel's fp32 core at thousands of keys. ATen's CPU kernel writes its output as
// (B, N, heads, head_dim), so the final (B, H_out, W_out, dim) reshape is free.

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scaled_dot_product_attention.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/attention/attention_bf16.h"
#include "common/cpu_utils.h"
#include "common/tensor_args.h"

namespace sam2_fast {
namespace {

// Queries per task of the bf16 path: a block's scores against one key block (64 x 512 fp32) stay in L2.
constexpr int64_t kGlobalQueryBlock = 64;
// Keys per packing task (even: a task's values start on a VNNI pair).
constexpr int64_t kPackKeyBlock = 256;

// A (B, h, w, channels) map's token t of image b, as a pointer to its channel `channel`.
struct MapTokens {
  const c10::BFloat16* data;
  int64_t stride_b, stride_h, stride_w, width;

  const c10::BFloat16* at(int64_t b, int64_t token, int64_t channel) const {
    return data + b * stride_b + (token / width) * stride_h + (token % width) * stride_w + channel;
  }
};

// The bf16 path: q_map (B, h_q, w_q, >= dim channels, q in the first dim; channel stride 1) attends to the keys and
// values of qkv (channel stride 1).
at::Tensor global_attention_bf16(const at::Tensor& qkv, const at::Tensor& q_map, int64_t num_heads) {
  using bf16 = c10::BFloat16;
  const int64_t batch = qkv.size(0), dim = qkv.size(3) / 3, head_dim = dim / num_heads;
  const int64_t num_keys = qkv.size(1) * qkv.size(2), num_queries = q_map.size(1) * q_map.size(2);
  at::Tensor out = at::empty({batch, q_map.size(1), q_map.size(2), dim}, qkv.options());
  if (out.numel() == 0) return out;
  const MapTokens keys{qkv.const_data_ptr<bf16>(), qkv.stride(0), qkv.stride(1), qkv.stride(2), qkv.size(2)};
  const MapTokens queries{q_map.const_data_ptr<bf16>(), q_map.stride(0), q_map.stride(1), q_map.stride(2),
                          q_map.size(2)};
  const Bf16AttentionShape packed_shape{kGlobalQueryBlock, num_keys, head_dim};
  const int64_t keys_size = packed_shape.depth() * packed_shape.key_columns();
  const int64_t values_size = packed_shape.padded_keys() * packed_shape.value_columns();
  // Every entry brgemm reads is written by the packing below, so the buffer starts uninitialized.
  const at::Tensor packed_storage = at::empty({batch * num_heads * (keys_size + values_size)}, qkv.options());
  bf16* packed = packed_storage.mutable_data_ptr<bf16>();
  const auto keys_vnni = [&](int64_t b, int64_t head) { return packed + (b * num_heads + head) * keys_size; };
  const auto values_vnni = [&](int64_t b, int64_t head) {
    return packed + batch * num_heads * keys_size + (b * num_heads + head) * values_size;
  };

  // Pack: task (b, head, key block).
  const int64_t key_blocks = (num_keys + kPackKeyBlock - 1) / kPackKeyBlock;
  at::parallel_for(0, batch * num_heads * key_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<const bf16*> key_rows(kPackKeyBlock), value_rows(kPackKeyBlock);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t block = task % key_blocks, head = (task / key_blocks) % num_heads, b = task / key_blocks / num_heads;
      const int64_t first = block * kPackKeyBlock, last = std::min(num_keys, first + kPackKeyBlock);
      for (int64_t j = first; j < last; ++j) {
        key_rows[j - first] = keys.at(b, j, dim + head * head_dim);
        value_rows[j - first] = keys.at(b, j, 2 * dim + head * head_dim);
      }
      pack_keys(packed_shape, first, last, key_rows.data(), keys_vnni(b, head));
      pack_values(packed_shape, first, last, value_rows.data(), values_vnni(b, head));
    }
  });

  // Attend: task (b, head, query block).
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(head_dim)));
  const int64_t query_blocks = (num_queries + kGlobalQueryBlock - 1) / kGlobalQueryBlock;
  bf16* dst = out.mutable_data_ptr<bf16>();
  at::parallel_for(0, batch * num_heads * query_blocks, 1, [&](int64_t begin, int64_t end) {
    const Bf16MatrixUnitsRelease release;
    Bf16AttentionScratch scratch(kGlobalQueryBlock, num_keys);
    std::vector<bf16> query_rows(kGlobalQueryBlock * packed_shape.depth());
    std::vector<float> result(kGlobalQueryBlock * packed_shape.value_columns()), inverse_sums(kGlobalQueryBlock);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t block = task % query_blocks, head = (task / query_blocks) % num_heads;
      const int64_t b = task / query_blocks / num_heads;
      const int64_t first = block * kGlobalQueryBlock, count = std::min(kGlobalQueryBlock, num_queries - first);
      const Bf16AttentionShape shape{count, num_keys, head_dim};
      for (int64_t i = 0; i < count; ++i) {
        bf16* row = query_rows.data() + i * shape.depth();
        copy_bf16_row(queries.at(b, first + i, head * head_dim), head_dim, row);
        if (shape.depth() > head_dim) row[head_dim] = bf16(0.0f);
      }
      attention_bf16(shape, scale, query_rows.data(), keys_vnni(b, head), values_vnni(b, head), nullptr, scratch,
                     result.data(), inverse_sums.data());
      for (int64_t i = 0; i < count; ++i) {
        store_bf16_row(result.data() + i * shape.value_columns(), head_dim, inverse_sums[i],
                       dst + (b * num_queries + first + i) * dim + head * head_dim);
      }
    }
  });
  return out;
}

at::Tensor global_attention_cpu(const at::Tensor& qkv_in, int64_t num_heads, bool q_pool) {
  check_qkv("global_attention", qkv_in, num_heads);
  const bool matrix_units = qkv_in.scalar_type() == at::kBFloat16 && bf16_matrix_attention();
  // ATen's attention reads q, k and v with any strides; the bf16 path reads runs of channels per token.
  const at::Tensor qkv = matrix_units ? with_unit_channel_stride(qkv_in) : qkv_in;
  const int64_t batch = qkv.size(0), dim = qkv.size(3) / 3;
  const int64_t head_dim = dim / num_heads;
  at::Tensor q_map = qkv.narrow(3, 0, dim);
  if (q_pool) {
    static const auto maxpool2x2 = c10::Dispatcher::singleton()
                                       .findSchemaOrThrow("sam2_fast_ext::maxpool2x2", "")
                                       .typed<at::Tensor(const at::Tensor&)>();
    q_map = maxpool2x2.call(q_map);
  }
  if (matrix_units) return global_attention_bf16(qkv, q_map, num_heads);
  // (B, H, W, dim) map of q, k or v -> (B, heads, tokens, head_dim) view.
  auto heads_view = [&](const at::Tensor& map) {
    return map.unflatten(3, {num_heads, head_dim}).flatten(1, 2).transpose(1, 2);
  };
  const at::Tensor out = at::scaled_dot_product_attention(
      heads_view(q_map), heads_view(qkv.narrow(3, dim, dim)), heads_view(qkv.narrow(3, 2 * dim, dim)));
  return out.transpose(1, 2).reshape({batch, q_map.size(1), q_map.size(2), dim}).contiguous();
}

}  // namespace
}  // namespace sam2_fast

TORCH_LIBRARY_IMPL(sam2_fast_ext, CPU, m) {
  m.impl("global_attention", TORCH_FN(sam2_fast::global_attention_cpu));
}
