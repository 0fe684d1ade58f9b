// maxpool2x2 on CUDA: 2x2 max-pool, stride 2, floor, of a channels-last map.
//
// x: (B, H, W, C), fp32, bf16, fp16 or fp64, read with its own strides over B, H, W (any, 0 included), its channels
// made contiguous first where they are strided.
// out: (B, H // 2, W // 2, C), contiguous, x's dtype. One thread per output element, consecutive threads along C
// so that reads and writes coalesce. NaN propagates as in torch.nn.functional.max_pool2d.

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/tensor_args.h"
#include "cuda_utils.cuh"

namespace sam2_fast {
namespace {

template <typename scalar_t>
__global__ void maxpool2x2_kernel(
    const scalar_t* __restrict__ src, scalar_t* __restrict__ dst, int64_t count, int64_t out_h, int64_t out_w,
    int64_t channels, int64_t stride_b, int64_t stride_h, int64_t stride_w) {
  CUDA_KERNEL_LOOP_TYPE(index, count, int64_t) {
    const int64_t c = index % channels;
    const int64_t ox = (index / channels) % out_w;
    const int64_t oy = (index / (channels * out_w)) % out_h;
    const int64_t b = index / (channels * out_w * out_h);
    const scalar_t* top = src + b * stride_b + 2 * oy * stride_h + 2 * ox * stride_w + c;
    const scalar_t* bottom = top + stride_h;
    dst[index] = pool_max(pool_max(pool_max(top[0], top[stride_w]), bottom[0]), bottom[stride_w]);
  }
}

at::Tensor maxpool2x2_cuda(const at::Tensor& x_in) {
  check_dims("maxpool2x2", "x", x_in, 4, "(B, H, W, C)");
  check_dtype("maxpool2x2", "x", x_in, kFloatingDtypes);
  const at::Tensor x = with_unit_channel_stride(x_in);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const int64_t out_h = x.size(1) / 2, out_w = x.size(2) / 2, channels = x.size(3);
  at::Tensor out = at::empty({x.size(0), out_h, out_w, channels}, x.options());
  const int64_t count = out.numel();
  if (count == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "maxpool2x2_cuda", [&] {
    launch_per_item(maxpool2x2_kernel<scalar_t>, count, x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                    count, out_h, out_w, channels, x.stride(0), x.stride(1), x.stride(2));
  });
  return out;
}

}  // namespace
}  // namespace sam2_fast

TORCH_LIBRARY_IMPL(sam2_fast_ext, CUDA, m) {
  m.impl("maxpool2x2", TORCH_FN(sam2_fast::maxpool2x2_cuda));
}
