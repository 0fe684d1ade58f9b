// The per-axis tables of the sine position encoding, shared by its CPU and CUDA kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <utility>

namespace sam2_fast {

// (y_table (height, num_pos_feats), x_table (width, num_pos_feats)), fp32 on `device`: row i holds the encoding of
// coordinate i + 1 as interleaved sin/cos pairs. Computed with the same ATen ops, in the same order, as
// sam2_fast.torch_ops.sine_position_encoding, so the values are bit-identical to it; the kernels only broadcast
// these tables over the (2 * num_pos_feats, height, width) output.
std::pair<at::Tensor, at::Tensor> sine_position_tables(
    int64_t height, int64_t width, int64_t num_pos_feats, double temperature, bool normalize, double scale,
    c10::Device device);

}  // namespace sam2_fast
