// maxpool2x2 on CPU: 2x2 max-pool, stride 2, floor, of a channels-last map.
//
// x: (B, H, W, C), any strides over B, H, W (channels are made contiguous if they are not); fp32, bf16 or fp16.
// out: (B, H // 2, W // 2, C), contiguous, x's dtype. NaN propagates as in torch.nn.functional.max_pool2d.

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "cpu_utils.h"

namespace sam2_fast {
namespace {

at::Tensor maxpool2x2_cpu(const at::Tensor& x_in) {
  TORCH_CHECK(x_in.dim() == 4, "maxpool2x2: expected a (B, H, W, C) map, got shape ", x_in.sizes());
  const at::Tensor x = x_in.stride(3) == 1 ? x_in : x_in.contiguous();
  const int64_t batch = x.size(0), height = x.size(1), width = x.size(2), channels = x.size(3);
  const int64_t out_h = height / 2, out_w = width / 2;
  at::Tensor out = at::empty({batch, out_h, out_w, channels}, x.options());
  if (out.numel() == 0) return out;
  const int64_t stride_b = x.stride(0), stride_h = x.stride(1), stride_w = x.stride(2);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "maxpool2x2_cpu", [&] {
    const scalar_t* src = x.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    // One task item is one output row (b, oy).
    at::parallel_for(0, batch * out_h, grain_for(out_w * channels * 4), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / out_h, oy = row % out_h;
        const scalar_t* top = src + b * stride_b + 2 * oy * stride_h;
        const scalar_t* bottom = top + stride_h;
        scalar_t* out_row = dst + row * out_w * channels;
        for (int64_t ox = 0; ox < out_w; ++ox) {
          const scalar_t* a = top + 2 * ox * stride_w;
          const scalar_t* b2 = bottom + 2 * ox * stride_w;
          scalar_t* o = out_row + ox * channels;
          for (int64_t c = 0; c < channels; ++c) {
            o[c] = nan_max(nan_max(a[c], a[c + stride_w]), nan_max(b2[c], b2[c + stride_w]));
          }
        }
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace sam2_fast

TORCH_LIBRARY_IMPL(sam2_fast_ext, CPU, m) {
  m.impl("maxpool2x2", TORCH_FN(sam2_fast::maxpool2x2_cpu));
}
