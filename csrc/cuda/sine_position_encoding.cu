// sine_position_encoding on CUDA.
//
// out: (1, 2 * num_pos_feats, height, width) fp32, contiguous. The per-axis sin/cos tables are computed on the GPU
// with the reference's own ATen ops (sine_position_tables, so the values match the torch implementation on CUDA
// bit for bit); this kernel broadcasts them over the map, one thread per output element.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/sine_position_tables.h"
#include "cuda_utils.cuh"

namespace sam2_fast {
namespace {

__global__ void sine_position_broadcast_kernel(
    const float* __restrict__ y_table, const float* __restrict__ x_table, float* __restrict__ dst, int64_t count,
    int64_t num_pos_feats, int64_t height, int64_t width) {
  CUDA_KERNEL_LOOP_TYPE(index, count, int64_t) {
    const int64_t x = index % width;
    const int64_t y = (index / width) % height;
    const int64_t channel = index / (width * height);
    dst[index] = channel < num_pos_feats ? y_table[y * num_pos_feats + channel]
                                         : x_table[x * num_pos_feats + channel - num_pos_feats];
  }
}

at::Tensor sine_position_encoding_cuda(
    int64_t height, int64_t width, int64_t num_pos_feats, double temperature, bool normalize, double scale,
    c10::Device device) {
  const c10::cuda::CUDAGuard device_guard(device);
  const auto [y_table, x_table] =
      sine_position_tables(height, width, num_pos_feats, temperature, normalize, scale, device);
  at::Tensor out = at::empty({1, 2 * num_pos_feats, height, width}, y_table.options());
  const int64_t count = out.numel();
  if (count == 0) return out;
  launch_per_item(sine_position_broadcast_kernel, count, y_table.const_data_ptr<float>(),
                  x_table.const_data_ptr<float>(), out.mutable_data_ptr<float>(), count, num_pos_feats, height, width);
  return out;
}

}  // namespace
}  // namespace sam2_fast

TORCH_LIBRARY_IMPL(sam2_fast_ext, CUDA, m) {
  m.impl("sine_position_encoding", TORCH_FN(sam2_fast::sine_position_encoding_cuda));
}
