// maxpool2x2_backward on CPU: the gradient of maxpool2x2 (2x2 max-pool, stride 2, floor, channels-last).
//
// grad_out: (B, H // 2, W // 2, C), any strides (read from a contiguous copy where it is not contiguous); x: (B, H,
// W, C), the forward's input, read with its own strides over B, H, W (any, 0 included), its channels made contiguous
// first where they are strided; fp32, bf16, fp16 or fp64, both of one dtype.
// Returns grad_x (B, H, W, C), contiguous, x's dtype: each pooled gradient goes to the token max_pool2d takes in its
// 2x2 window (the first maximum in scan order: top-left, top-right, bottom-left, bottom-right; the last NaN if there
// is one), every other token gets zero. The winner is found again from x, so no indices are saved in the forward.

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "common/cpu_utils.h"
#include "common/tensor_args.h"

namespace sam2_fast {
namespace {

at::Tensor maxpool2x2_backward_cpu(const at::Tensor& grad_out_in, const at::Tensor& x_in) {
  check_dims("maxpool2x2_backward", "x", x_in, 4, "(B, H, W, C)");
  check_dtype("maxpool2x2_backward", "x", x_in, kFloatingDtypes);
  const at::Tensor x = with_unit_channel_stride(x_in);
  const int64_t batch = x.size(0), height = x.size(1), width = x.size(2), channels = x.size(3);
  const int64_t out_h = height / 2, out_w = width / 2;
  check_sizes("maxpool2x2_backward", "grad_out", grad_out_in, {batch, out_h, out_w, channels});
  check_dtype("maxpool2x2_backward", "grad_out", grad_out_in, {x.scalar_type()});
  check_same_device("maxpool2x2_backward", "grad_out", grad_out_in, "x", x);
  if (grad_out_in.numel() == 0) return at::zeros(x.sizes(), x.options());
  const at::Tensor grad_out = grad_out_in.contiguous();
  at::Tensor grad_x = at::empty(x.sizes(), x.options());
  const int64_t stride_b = x.stride(0), stride_h = x.stride(1), stride_w = x.stride(2);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "maxpool2x2_backward_cpu", [&] {
    const scalar_t* src = x.const_data_ptr<scalar_t>();
    const scalar_t* grad = grad_out.const_data_ptr<scalar_t>();
    scalar_t* dst = grad_x.mutable_data_ptr<scalar_t>();
    const auto grad_row = [&](int64_t b, int64_t y) { return dst + (b * height + y) * width * channels; };
    // One item is one output row (b, oy): input rows 2 oy and 2 oy + 1, and a last odd input row after the last.
    at::parallel_for(0, batch * out_h, grain_for(out_w * channels * 8), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / out_h, oy = row % out_h;
        const scalar_t* top = src + b * stride_b + 2 * oy * stride_h;
        const scalar_t* bottom = top + stride_h;
        scalar_t* grad_top = grad_row(b, 2 * oy);
        scalar_t* grad_bottom = grad_row(b, 2 * oy + 1);
        for (int64_t ox = 0; ox < out_w; ++ox) {
          const scalar_t* corners[4] = {top + 2 * ox * stride_w, top + (2 * ox + 1) * stride_w,
                                        bottom + 2 * ox * stride_w, bottom + (2 * ox + 1) * stride_w};
          scalar_t* grad_corners[4] = {grad_top + 2 * ox * channels, grad_top + (2 * ox + 1) * channels,
                                       grad_bottom + 2 * ox * channels, grad_bottom + (2 * ox + 1) * channels};
          const scalar_t* g = grad + (row * out_w + ox) * channels;
          for (int64_t c = 0; c < channels; ++c) {
            int winner = 0;
            for (int corner = 1; corner < 4; ++corner) {
              if (pool_takes(corners[winner][c], corners[corner][c])) winner = corner;
            }
            for (int corner = 0; corner < 4; ++corner) grad_corners[corner][c] = corner == winner ? g[c] : scalar_t(0);
          }
        }
        if (width % 2) {  // the last column pools into nothing
          std::fill(grad_top + (width - 1) * channels, grad_top + width * channels, scalar_t(0));
          std::fill(grad_bottom + (width - 1) * channels, grad_bottom + width * channels, scalar_t(0));
        }
        if (height % 2 && oy == out_h - 1) {  // nor does the last row
          scalar_t* last = grad_row(b, height - 1);
          std::fill(last, last + width * channels, scalar_t(0));
        }
      }
    });
  });
  return grad_x;
}

}  // namespace
}  // namespace sam2_fast

TORCH_LIBRARY_IMPL(sam2_fast_ext, CPU, m) {
  m.impl("maxpool2x2_backward", TORCH_FN(sam2_fast::maxpool2x2_backward_cpu));
}
