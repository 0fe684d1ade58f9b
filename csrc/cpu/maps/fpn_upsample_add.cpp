// fpn_upsample_add on CPU: the FPN top-down fusion `lateral + nearest_upsample_2x(prev.float())` in one pass.
//
// lateral: (B, C, 2h, 2w), prev: (B, C, h, w), fp32, bf16, fp16 or fp64 (they may differ), read with their own
// strides, whatever they are (0 included).
// out: (B, C, 2h, 2w), contiguous, dtype promote_types(lateral.dtype, float32) as in the reference, where the
// upsampled term is float32. prev is rounded to float32 before the add, exactly as `prev.to(torch.float32)` does.

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/ScalarType.h>
#include <torch/library.h>

#include "common/cpu_utils.h"
#include "common/tensor_args.h"

namespace sam2_fast {
namespace {

constexpr int64_t kChannelBlock = 16;

template <typename out_t, typename lateral_t, typename prev_t>
void fpn_upsample_add_kernel(const at::Tensor& lateral, const at::Tensor& prev, at::Tensor& out) {
  const int64_t batch = out.size(0), channels = out.size(1), height = out.size(2), width = out.size(3);
  const lateral_t* lat = lateral.const_data_ptr<lateral_t>();
  const prev_t* pre = prev.const_data_ptr<prev_t>();
  out_t* dst = out.mutable_data_ptr<out_t>();
  const int64_t ls0 = lateral.stride(0), ls1 = lateral.stride(1), ls2 = lateral.stride(2), ls3 = lateral.stride(3);
  const int64_t ps0 = prev.stride(0), ps1 = prev.stride(1), ps2 = prev.stride(2), ps3 = prev.stride(3);
  auto upsampled = [&](int64_t b, int64_t c, int64_t y, int64_t x) {
    return static_cast<out_t>(static_cast<float>(pre[b * ps0 + c * ps1 + (y / 2) * ps2 + (x / 2) * ps3]));
  };

  if (ls3 == 1 || channels == 1) {
    // Rows of lateral are contiguous: one task item is one output row (b, c, y).
    at::parallel_for(0, batch * channels * height, grain_for(width), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t y = row % height, c = (row / height) % channels, b = row / (height * channels);
        const lateral_t* lat_row = lat + b * ls0 + c * ls1 + y * ls2;
        const prev_t* prev_row = pre + b * ps0 + c * ps1 + (y / 2) * ps2;
        out_t* out_row = dst + row * width;
        for (int64_t px = 0; px < width / 2; ++px) {
          const out_t up = static_cast<out_t>(static_cast<float>(prev_row[px * ps3]));
          out_row[2 * px] = static_cast<out_t>(lat_row[(2 * px) * ls3]) + up;
          out_row[2 * px + 1] = static_cast<out_t>(lat_row[(2 * px + 1) * ls3]) + up;
        }
      }
    });
    return;
  }
  // Channels-last lateral (the output of a 1x1 conv on a channels-last map): read a block of channels per pixel
  // so that the reads stay contiguous while each of the block's output rows is written in order.
  const int64_t channel_blocks = (channels + kChannelBlock - 1) / kChannelBlock;
  at::parallel_for(0, batch * height * channel_blocks, grain_for(width * kChannelBlock), [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t block = item % channel_blocks, y = (item / channel_blocks) % height;
      const int64_t b = item / (channel_blocks * height);
      const int64_t c_begin = block * kChannelBlock, c_end = std::min(channels, c_begin + kChannelBlock);
      for (int64_t x = 0; x < width; ++x) {
        for (int64_t c = c_begin; c < c_end; ++c) {
          dst[((b * channels + c) * height + y) * width + x] =
              static_cast<out_t>(lat[b * ls0 + c * ls1 + y * ls2 + x * ls3]) + upsampled(b, c, y, x);
        }
      }
    }
  });
}

at::Tensor fpn_upsample_add_cpu(const at::Tensor& lateral, const at::Tensor& prev) {
  check_fpn_upsample_add_args(lateral, prev);
  const at::ScalarType out_dtype = c10::promoteTypes(lateral.scalar_type(), at::kFloat);
  at::Tensor out = at::empty(lateral.sizes(), lateral.options().dtype(out_dtype));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, lateral.scalar_type(), "fpn_upsample_add_cpu", [&] {
    using lateral_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, prev.scalar_type(), "fpn_upsample_add_cpu", [&] {
      using prev_t = scalar_t;
      if (out_dtype == at::kDouble) {
        fpn_upsample_add_kernel<double, lateral_t, prev_t>(lateral, prev, out);
      } else {
        fpn_upsample_add_kernel<float, lateral_t, prev_t>(lateral, prev, out);
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace sam2_fast

TORCH_LIBRARY_IMPL(sam2_fast_ext, CPU, m) {
  m.impl("fpn_upsample_add", TORCH_FN(sam2_fast::fpn_upsample_add_cpu));
}
