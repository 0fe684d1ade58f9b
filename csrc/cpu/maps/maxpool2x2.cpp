// maxpool2x2 on CPU: 2x2 max-pool, stride 2, floor, of a channels-last map.
//
// x: (B, H, W, C), fp32, bf16, fp16 or fp64, read with its own strides over B, H, W (any, 0 included), its channels
// made contiguous first where they are strided.
// out: (B, H // 2, W // 2, C), contiguous, x's dtype. NaN propagates as in torch.nn.functional.max_pool2d.

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common/cpu_utils.h"
#include "common/tensor_args.h"

namespace sam2_fast {
namespace {

// out[i] = pool_max4 of the four rows at i (top-left, top-right, bottom-left, bottom-right), vectorized. bf16 and
// fp16 are compared as bit patterns: for non-NaN values, the sign-magnitude bits mapped to a signed integer (-0 and
// +0 both to 0) order exactly as the values do, and a magnitude above infinity's bits is a NaN, so no per-element
// conversion is needed.
SAM2_FAST_MULTIVERSION
void max4_rows_f32(const float* a, const float* b, const float* c, const float* d, float* out, int64_t count) {
  for (int64_t i = 0; i < count; ++i) out[i] = pool_max4(a[i], b[i], c[i], d[i]);
}

// pool_max on bit patterns of a 16-bit float type whose infinity has the bits kInfinityBits, for a scalar or a
// vector of int16 lanes. Vector extensions because the compiler does not vectorize the scalar form's 16-bit selects.
typedef int16_t int16x16 __attribute__((vector_size(32)));
// The vector type only lives inside this file, so the ABI note on passing it by value does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

template <int16_t kInfinityBits, typename T>
inline __attribute__((always_inline)) T pool_max_bits(T current, T candidate) {
  const T magnitude = candidate & 0x7FFF, current_magnitude = current & 0x7FFF;
  const T key = candidate < 0 ? -magnitude : magnitude;  // the sign bit is the int16 sign
  const T current_key = current < 0 ? -current_magnitude : current_magnitude;
  // Take a NaN candidate; else a larger one, unless current is NaN (nothing is larger than a NaN).
  return (magnitude > kInfinityBits) | ((current_magnitude <= kInfinityBits) & (key > current_key)) ? candidate
                                                                                                    : current;
}

template <int16_t kInfinityBits>
inline __attribute__((always_inline)) void max4_rows_16bit(
    const int16_t* a, const int16_t* b, const int16_t* c, const int16_t* d, int16_t* out, int64_t count) {
  constexpr int64_t kLanes = sizeof(int16x16) / sizeof(int16_t);
  auto load = [](const int16_t* p) {
    int16x16 v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  };
  int64_t i = 0;
  for (; i + kLanes <= count; i += kLanes) {
    const int16x16 m = pool_max_bits<kInfinityBits>(
        pool_max_bits<kInfinityBits>(pool_max_bits<kInfinityBits>(load(a + i), load(b + i)), load(c + i)),
        load(d + i));
    std::memcpy(out + i, &m, sizeof(m));
  }
  for (; i < count; ++i) {
    out[i] = static_cast<int16_t>(pool_max_bits<kInfinityBits, int32_t>(
        pool_max_bits<kInfinityBits, int32_t>(pool_max_bits<kInfinityBits, int32_t>(a[i], b[i]), c[i]), d[i]));
  }
}

SAM2_FAST_MULTIVERSION
void max4_rows_bf16(const int16_t* a, const int16_t* b, const int16_t* c, const int16_t* d, int16_t* out,
                    int64_t count) {
  max4_rows_16bit<0x7F80>(a, b, c, d, out, count);
}

SAM2_FAST_MULTIVERSION
void max4_rows_f16(const int16_t* a, const int16_t* b, const int16_t* c, const int16_t* d, int16_t* out,
                   int64_t count) {
  max4_rows_16bit<0x7C00>(a, b, c, d, out, count);
}

template <typename scalar_t>
void max4_rows(const scalar_t* a, const scalar_t* b, const scalar_t* c, const scalar_t* d, scalar_t* out,
               int64_t count) {
  auto bits = [](const scalar_t* p) { return reinterpret_cast<const int16_t*>(p); };
  if constexpr (std::is_same_v<scalar_t, float>) {
    max4_rows_f32(a, b, c, d, out, count);
  } else if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    max4_rows_bf16(bits(a), bits(b), bits(c), bits(d), reinterpret_cast<int16_t*>(out), count);
  } else if constexpr (std::is_same_v<scalar_t, at::Half>) {
    max4_rows_f16(bits(a), bits(b), bits(c), bits(d), reinterpret_cast<int16_t*>(out), count);
  } else {
    for (int64_t i = 0; i < count; ++i) out[i] = pool_max4(a[i], b[i], c[i], d[i]);
  }
}

at::Tensor maxpool2x2_cpu(const at::Tensor& x_in) {
  check_dims("maxpool2x2", "x", x_in, 4, "(B, H, W, C)");
  check_dtype("maxpool2x2", "x", x_in, kFloatingDtypes);
  const at::Tensor x = with_unit_channel_stride(x_in);
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
          max4_rows(a, a + stride_w, b2, b2 + stride_w, o, channels);
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
