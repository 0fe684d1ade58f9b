// fpn_upsample_add on CUDA: the FPN top-down fusion `lateral + nearest_upsample_2x(prev.float())` in one pass.
//
// lateral: (B, C, 2h, 2w), prev: (B, C, h, w), fp32, bf16, fp16 or fp64 (they may differ), read with their own
// strides, whatever they are (0 included).
// out: (B, C, 2h, 2w), contiguous, dtype promote_types(lateral.dtype, float32) as in the reference; prev is rounded
// to float32 before the add. One thread per output element, in output order.

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/ScalarType.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/tensor_args.h"
#include "cuda_utils.cuh"

namespace sam2_fast {
namespace {

struct Strides4 {
  int64_t s0, s1, s2, s3;
};

template <typename out_t, typename lateral_t, typename prev_t>
__global__ void fpn_upsample_add_kernel(
    const lateral_t* __restrict__ lateral, const prev_t* __restrict__ prev, out_t* __restrict__ dst, int64_t count,
    int64_t channels, int64_t height, int64_t width, Strides4 ls, Strides4 ps) {
  CUDA_KERNEL_LOOP_TYPE(index, count, int64_t) {
    const int64_t x = index % width;
    const int64_t y = (index / width) % height;
    const int64_t c = (index / (width * height)) % channels;
    const int64_t b = index / (width * height * channels);
    const float up = static_cast<float>(prev[b * ps.s0 + c * ps.s1 + (y / 2) * ps.s2 + (x / 2) * ps.s3]);
    dst[index] = static_cast<out_t>(lateral[b * ls.s0 + c * ls.s1 + y * ls.s2 + x * ls.s3]) + static_cast<out_t>(up);
  }
}

at::Tensor fpn_upsample_add_cuda(const at::Tensor& lateral, const at::Tensor& prev) {
  check_fpn_upsample_add_args(lateral, prev);
  const c10::cuda::CUDAGuard device_guard(lateral.device());
  const at::ScalarType out_dtype = c10::promoteTypes(lateral.scalar_type(), at::kFloat);
  at::Tensor out = at::empty(lateral.sizes(), lateral.options().dtype(out_dtype));
  const int64_t count = out.numel();
  if (count == 0) return out;
  const Strides4 ls{lateral.stride(0), lateral.stride(1), lateral.stride(2), lateral.stride(3)};
  const Strides4 ps{prev.stride(0), prev.stride(1), prev.stride(2), prev.stride(3)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, lateral.scalar_type(), "fpn_upsample_add_cuda", [&] {
    using lateral_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, prev.scalar_type(), "fpn_upsample_add_cuda", [&] {
      using prev_t = scalar_t;
      auto launch = [&](auto* dst) {
        using out_t = std::remove_pointer_t<decltype(dst)>;
        launch_per_item(fpn_upsample_add_kernel<out_t, lateral_t, prev_t>, count, lateral.const_data_ptr<lateral_t>(),
                        prev.const_data_ptr<prev_t>(), dst, count, out.size(1), out.size(2), out.size(3), ls, ps);
      };
      if (out_dtype == at::kDouble) {
        launch(out.mutable_data_ptr<double>());
      } else {
        launch(out.mutable_data_ptr<float>());
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace sam2_fast

TORCH_LIBRARY_IMPL(sam2_fast_ext, CUDA, m) {
  m.impl("fpn_upsample_add", TORCH_FN(sam2_fast::fpn_upsample_add_cuda));
}
