// sine_position_encoding on CPU, and the per-axis tables its CPU and CUDA kernels broadcast.
//
// out: (1, 2 * num_pos_feats, height, width) fp32, contiguous; channel c < num_pos_feats encodes y (constant along
// each row), channel num_pos_feats + c encodes x (the same row for every y), as PositionEmbeddingSine does.

#include <ATen/core/Tensor.h>
#include <ATen/ops/add.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/cos.h>
#include <ATen/ops/div.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/floor_divide.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/pow.h>
#include <ATen/ops/sin.h>
#include <ATen/ops/stack.h>
#include <torch/library.h>

#include <cstring>

#include "common/cpu_utils.h"
#include "common/sine_position_tables.h"

namespace sam2_fast {

std::pair<at::Tensor, at::Tensor> sine_position_tables(
    int64_t height, int64_t width, int64_t num_pos_feats, double temperature, bool normalize, double scale,
    c10::Device device) {
  TORCH_CHECK(height > 0 && width > 0, "sine_position_encoding: expected a positive size, got ", height, "x", width);
  TORCH_CHECK(
      num_pos_feats > 0 && num_pos_feats % 2 == 0,
      "sine_position_encoding: expected an even, positive num_pos_feats (sin/cos pairs), got ", num_pos_feats);
  const auto options = at::TensorOptions().dtype(at::kFloat).device(device);
  const at::Tensor dim_t = at::pow(
      temperature, at::div(at::mul(at::floor_divide(at::arange(num_pos_feats, options), 2), 2), num_pos_feats));
  auto table = [&](int64_t length) {
    at::Tensor embed = at::arange(1, length + 1, options);
    if (normalize) {
      const double eps = 1e-6;
      embed = at::mul(at::div(embed, at::add(embed.slice(0, length - 1), eps)), scale);
    }
    const at::Tensor pos = at::div(embed.unsqueeze(1), dim_t);
    return at::stack({at::sin(pos.slice(1, 0, num_pos_feats, 2)), at::cos(pos.slice(1, 1, num_pos_feats, 2))}, 2)
        .flatten(1);
  };
  return {table(height), table(width)};
}

namespace {

at::Tensor sine_position_encoding_cpu(
    int64_t height, int64_t width, int64_t num_pos_feats, double temperature, bool normalize, double scale,
    c10::Device device) {
  const auto [y_table, x_table] =
      sine_position_tables(height, width, num_pos_feats, temperature, normalize, scale, device);
  const at::Tensor x_rows = x_table.t().contiguous();  // (num_pos_feats, width): channel c's row of x codes
  at::Tensor out = at::empty({1, 2 * num_pos_feats, height, width}, x_table.options());
  const float* y_codes = y_table.const_data_ptr<float>();
  const float* x_codes = x_rows.const_data_ptr<float>();
  float* dst = out.mutable_data_ptr<float>();
  // One task item is one output row (channel, y).
  at::parallel_for(0, 2 * num_pos_feats * height, grain_for(width), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t channel = row / height, y = row % height;
      float* out_row = dst + row * width;
      if (channel < num_pos_feats) {
        std::fill(out_row, out_row + width, y_codes[y * num_pos_feats + channel]);
      } else {
        std::memcpy(out_row, x_codes + (channel - num_pos_feats) * width, width * sizeof(float));
      }
    }
  });
  return out;
}

}  // namespace
}  // namespace sam2_fast

TORCH_LIBRARY_IMPL(sam2_fast_ext, CPU, m) {
  m.impl("sine_position_encoding", TORCH_FN(sam2_fast::sine_position_encoding_cpu));
}
