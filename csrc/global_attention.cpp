// global_attention on CPU: multi-head attention over all H * W tokens of each image (Hiera's global blocks).
//
// qkv: (B, H, W, 3 * dim), any strides, channels split as (3, num_heads, head_dim); fp32/bf16/fp16.
// out: (B, H_out, W_out, dim), contiguous, qkv's dtype; (H_out, W_out) = (H, W), or (H // 2, W // 2) with q_pool
// (q max-pooled 2x2, floor), scale 1 / sqrt(head_dim), no mask.
//
// q, k and v are strided views of qkv (no copies) handed to ATen's fused CPU attention, whose blocked GEMMs beat the
// window kernel's core at thousands of keys; q is pooled by this extension's maxpool2x2. ATen's CPU kernel writes
// its output as (B, N, heads, head_dim), so the final (B, H_out, W_out, dim) reshape is free.

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/scaled_dot_product_attention.h>
#include <torch/library.h>

namespace sam2_fast {
namespace {

at::Tensor global_attention_cpu(const at::Tensor& qkv, int64_t num_heads, bool q_pool) {
  TORCH_CHECK(qkv.dim() == 4, "global_attention: expected qkv of shape (B, H, W, 3 * dim), got ", qkv.sizes());
  TORCH_CHECK(num_heads > 0 && qkv.size(3) % (3 * num_heads) == 0, "global_attention: qkv's last dim ",
              qkv.size(3), " is not a multiple of 3 * num_heads = ", 3 * num_heads);
  const int64_t batch = qkv.size(0), dim = qkv.size(3) / 3;
  const int64_t head_dim = dim / num_heads;
  // (B, H, W, dim) map of q, k or v -> (B, heads, tokens, head_dim) view.
  auto heads_view = [&](const at::Tensor& map) {
    return map.unflatten(3, {num_heads, head_dim}).flatten(1, 2).transpose(1, 2);
  };
  at::Tensor q_map = qkv.narrow(3, 0, dim);
  if (q_pool) {
    static const auto maxpool2x2 = c10::Dispatcher::singleton()
                                       .findSchemaOrThrow("sam2_fast_ext::maxpool2x2", "")
                                       .typed<at::Tensor(const at::Tensor&)>();
    q_map = maxpool2x2.call(q_map);
  }
  const at::Tensor out = at::scaled_dot_product_attention(
      heads_view(q_map), heads_view(qkv.narrow(3, dim, dim)), heads_view(qkv.narrow(3, 2 * dim, dim)));
  return out.transpose(1, 2).reshape({batch, q_map.size(1), q_map.size(2), dim}).contiguous();
}

}  // namespace
}  // namespace sam2_fast

TORCH_LIBRARY_IMPL(sam2_fast_ext, CPU, m) {
  m.impl("global_attention", TORCH_FN(sam2_fast::global_attention_cpu));
}
