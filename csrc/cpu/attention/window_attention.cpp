// window_attention on CPU: Hiera's windowed multi-head attention, read and written in place.
//
// qkv: (B, H, W, 3 * dim), channels split as (3, num_heads, head_dim); fp32/bf16/fp16/fp64; read with its own
// strides over B, H, W (any, 0 included), its channels made contiguous first where they are strided.
// qkv_bias: (3 * dim,) of any floating dtype, or None, the q, k and v of the padding tokens (the reference pads the
// normed input with zeros before the qkv projection); they attend unmasked, as in the reference.
// add_bias: qkv is the bare projection and qkv_bias is added to every token as it is read (rounded to qkv's dtype,
// as `qkv + qkv_bias` in that dtype would be): the GEMM then skips its bias pass over the whole qkv map.
// out: (B, H_out, W_out, dim), contiguous, qkv's dtype; (H_out, W_out) = (H, W), or (H // 2, W // 2) with q_pool.
//
// Fuses the window partition with padding, the 2x2 max-pool of q inside each window, the attention (fp32
// accumulation, scale 1 / sqrt(head_dim)) and the unpartition with its crop: no intermediate copies of the map.
// The padding tokens of a window are all the same token, so they enter its softmax as one key weighted by their
// count (exp(s + log(count)) = count * exp(s)): windows that overhang the map do only their real tokens' work.
// One task is one (window, head); the (B * rows * cols * num_heads) tasks are split between the threads by cost
// (the queries a window keeps after the crop times its keys), so that overhanging windows do not idle a thread.
// A task's attention runs on the bf16 matrix units (Bf16WindowSolver, attention_bf16.h) for bf16 inputs on CPUs
// that have them, else on the fp32 core (Fp32WindowSolver, attention_core.h).

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu/attention/attention_bf16.h"
#include "cpu/attention/attention_core.h"
#include "cpu/attention/window_tasks.h"
#include "common/cpu_utils.h"
#include "common/tensor_args.h"

namespace sam2_fast {
namespace {

constexpr int64_t kCacheLine = 64;
constexpr int kPrefetchToL2 = 2;  // __builtin_prefetch locality 2: into L2 and L3, not necessarily L1

// Asks the CPU to start fetching the `count` values at `data` into L2, for reading or (kForWrite = 1) for writing.
template <int kForWrite, typename scalar_t>
inline void prefetch_into_l2(const scalar_t* data, int64_t count) {
  const char* start = reinterpret_cast<const char*>(data);
  for (int64_t line = 0; line < count * static_cast<int64_t>(sizeof(scalar_t)); line += kCacheLine) {
    __builtin_prefetch(start + line, kForWrite, kPrefetchToL2);
  }
}

// Where each token's 3 * dim channels are: qkv[b, y, x, :] inside the map, `fill` (the qkv bias, or zeros) for the
// padding tokens a window reaches beyond it.
template <typename scalar_t>
struct TokenReader {
  const scalar_t* data;
  const scalar_t* fill;
  int64_t stride_b, stride_h, stride_w, height, width;

  const scalar_t* token(int64_t b, int64_t y, int64_t x) const {
    return (y < height && x < width) ? data + b * stride_b + y * stride_h + x * stride_w : fill;
  }

  // Asks the CPU to start loading one head's q, k and v channels (head_dim values each, at `offset`, `offset + dim`
  // and `offset + 2 * dim`) of the tokens of a window_size x window_size window into L2, so that reading them later
  // does not stall on memory: the hardware prefetchers do not follow window rows, and a token's channels of one head
  // are a few cache lines out of several kilobytes.
  void prefetch_head(int64_t b, int64_t y0, int64_t x0, int64_t window_size, int64_t dim, int64_t offset,
                     int64_t head_dim) const {
    for (int64_t y = y0; y < std::min(height, y0 + window_size); ++y) {
      for (int64_t x = x0; x < std::min(width, x0 + window_size); ++x) {
        const scalar_t* q_start = token(b, y, x) + offset;
        for (int64_t part = 0; part < 3; ++part) prefetch_into_l2<0>(q_start + part * dim, head_dim);
      }
    }
  }
};

// value + bias, rounded to scalar_t as the sum of two scalar_t tensors is (a no-op round for float).
template <typename scalar_t>
inline float add_rounded(scalar_t value, scalar_t bias) {
  return static_cast<float>(static_cast<scalar_t>(static_cast<float>(value) + static_cast<float>(bias)));
}

// head_dim values of a token as floats, plus `bias` (the same channels of the qkv bias) unless it is null.
template <typename scalar_t>
inline void read_channels(const scalar_t* src, const scalar_t* bias, int64_t head_dim, float* dst) {
  if (bias == nullptr) {
    for (int64_t d = 0; d < head_dim; ++d) dst[d] = static_cast<float>(src[d]);
  } else {
    for (int64_t d = 0; d < head_dim; ++d) dst[d] = add_rounded(src[d], bias[d]);
  }
}

// q row: channels [offset, offset + head_dim) of a token, or with `pooled` the NaN-propagating max over the 2x2
// tokens (y, x), (y, x + 1), (y + 1, x), (y + 1, x + 1), as MaxPool2d(2, 2) computes it; plus `bias` (the q bias
// of the head) unless it is null. Rounding is monotonic, so pooling before the bias add equals pooling after it.
template <typename scalar_t>
inline void read_query(
    const TokenReader<scalar_t>& reader, int64_t b, int64_t y, int64_t x, bool pooled, int64_t offset,
    int64_t head_dim, const scalar_t* bias, float* dst) {
  const scalar_t* t00 = reader.token(b, y, x) + offset;
  if (!pooled) {
    read_channels(t00, bias, head_dim, dst);
    return;
  }
  const scalar_t* t01 = reader.token(b, y, x + 1) + offset;
  const scalar_t* t10 = reader.token(b, y + 1, x) + offset;
  const scalar_t* t11 = reader.token(b, y + 1, x + 1) + offset;
  for (int64_t d = 0; d < head_dim; ++d) {
    const scalar_t pooled_value = pool_max4(t00[d], t01[d], t10[d], t11[d]);
    dst[d] = bias == nullptr ? static_cast<float>(pooled_value) : add_rounded(pooled_value, bias[d]);
  }
}

// The attention of one (window, head) task on the fp32 core, for every dtype: the task's keys, values and queries
// are read as floats into the core's padded buffers (see attention_core.h), sized for a full window.
template <typename scalar_t>
class Fp32WindowSolver {
 public:
  explicit Fp32WindowSolver(const AttentionShape& window)
      : queries_(window.query_rows() * window.head_dim),
        keys_t_(window.head_dim * window.key_stride()),
        values_(window.num_keys * window.value_stride()),
        scores_(window.query_rows() * window.key_stride()),
        inverse_sums_(window.query_rows()),
        result_(window.query_rows() * window.value_stride()) {}

  // Starts a task of this shape (at most the window's).
  void begin(const AttentionShape& task) { task_ = task; }

  // Key j (keys_t[:, j], transposed) and value j from one token, plus the head's k and v biases unless null.
  void key_value(int64_t j, const scalar_t* key, const scalar_t* value, const scalar_t* key_bias,
                 const scalar_t* value_bias) {
    const int64_t key_stride = task_.key_stride(), head_dim = task_.head_dim;
    if (key_bias == nullptr) {
      for (int64_t d = 0; d < head_dim; ++d) keys_t_[d * key_stride + j] = static_cast<float>(key[d]);
    } else {
      for (int64_t d = 0; d < head_dim; ++d) keys_t_[d * key_stride + j] = add_rounded(key[d], key_bias[d]);
    }
    read_channels(value, value_bias, head_dim, values_.data() + j * task_.value_stride());
  }

  // Query row i (see read_query).
  void query(int64_t i, const TokenReader<scalar_t>& reader, int64_t b, int64_t y, int64_t x, bool pooled,
             int64_t offset, const scalar_t* bias) {
    read_query(reader, b, y, x, pooled, offset, task_.head_dim, bias, queries_.data() + i * task_.head_dim);
  }

  // The task's attention (its output rows then go out through write_output).
  void solve(float scale, const float* key_logit_offsets) {
    const int64_t head_dim = task_.head_dim;
    for (int64_t d = 0; d < head_dim; ++d) {
      float* key_row = keys_t_.data() + d * task_.key_stride();
      std::fill(key_row + task_.num_keys, key_row + task_.key_stride(), 0.0f);
    }
    std::fill(queries_.begin() + task_.num_queries * head_dim, queries_.begin() + task_.query_rows() * head_dim,
              0.0f);
    attention_f32(task_, scale, queries_.data(), keys_t_.data(), values_.data(), key_logit_offsets,
                  scores_.data(), inverse_sums_.data(), result_.data());
  }

  // Output row i of the task (head_dim values), rounded to scalar_t, at dst.
  void write_output(int64_t i, scalar_t* dst) const {
    const float* src = result_.data() + i * task_.value_stride();
    for (int64_t d = 0; d < task_.head_dim; ++d) dst[d] = static_cast<scalar_t>(src[d]);
  }

 private:
  AttentionShape task_{0, 0, 0};
  std::vector<float> queries_, keys_t_, values_, scores_, inverse_sums_, result_;
};

// The attention of one (window, head) task of bf16 inputs on the bf16 matrix units (see attention_bf16.h): the
// keys and values are packed into their VNNI operands straight from the bf16 channels, the queries copied.
class Bf16WindowSolver {
  using bf16 = c10::BFloat16;

 public:
  explicit Bf16WindowSolver(const AttentionShape& window)
      : Bf16WindowSolver(Bf16AttentionShape{window.num_queries, window.num_keys, window.head_dim}) {}

  void begin(const AttentionShape& task) { task_ = {task.num_queries, task.num_keys, task.head_dim}; }

  // Packed in solve(); with biases, the sums (rounded to bf16, as `qkv + bias` in bf16) are staged first.
  void key_value(int64_t j, const bf16* key, const bf16* value, const bf16* key_bias, const bf16* value_bias) {
    key_rows_[j] = with_bias(key, key_bias, 2 * j);
    value_rows_[j] = with_bias(value, value_bias, 2 * j + 1);
  }

  void query(int64_t i, const TokenReader<bf16>& reader, int64_t b, int64_t y, int64_t x, bool pooled,
             int64_t offset, const bf16* bias) {
    const int64_t head_dim = task_.head_dim, depth = task_.depth();
    bf16* row = queries_.data() + i * depth;
    if (!pooled && bias == nullptr) {
      copy_bf16_row(reader.token(b, y, x) + offset, head_dim, row);
    } else {
      // Pooled and biased values are bf16 values (see read_query), so converting them back is exact.
      read_query(reader, b, y, x, pooled, offset, head_dim, bias, pooled_.data());
      for (int64_t d = 0; d < head_dim; ++d) row[d] = static_cast<bf16>(pooled_[d]);
    }
    if (depth > head_dim) row[head_dim] = bf16(0.0f);
  }

  void solve(float scale, const float* key_logit_offsets) {
    pack_keys(task_, 0, task_.num_keys, key_rows_.data(), keys_vnni_.data());
    pack_values(task_, 0, task_.num_keys, value_rows_.data(), values_vnni_.data());
    attention_bf16(task_, scale, queries_.data(), keys_vnni_.data(), values_vnni_.data(), key_logit_offsets,
                   scratch_, out_.data(), inverse_sums_.data());
  }

  void write_output(int64_t i, bf16* dst) const {
    store_bf16_row(out_.data() + i * task_.value_columns(), task_.head_dim, inverse_sums_[i], dst);
  }

 private:
  explicit Bf16WindowSolver(const Bf16AttentionShape& window)
      : queries_(window.num_queries * window.depth()),
        keys_vnni_(window.depth() * window.key_columns()),
        values_vnni_(window.padded_keys() * window.value_columns()),
        out_(window.num_queries * window.value_columns()),
        inverse_sums_(window.num_queries),
        key_rows_(window.num_keys),
        value_rows_(window.num_keys),
        biased_(2 * window.num_keys * window.head_dim),
        pooled_(window.head_dim),
        scratch_(window.num_queries, window.num_keys) {}

  // The channels themselves without a bias; else their sum with it in staging row `slot`.
  const bf16* with_bias(const bf16* channels, const bf16* bias, int64_t slot) {
    if (bias == nullptr) return channels;
    bf16* sum = biased_.data() + slot * task_.head_dim;
    for (int64_t d = 0; d < task_.head_dim; ++d) sum[d] = static_cast<bf16>(add_rounded(channels[d], bias[d]));
    return sum;
  }

  Bf16AttentionShape task_{0, 0, 0};
  std::vector<bf16> queries_, keys_vnni_, values_vnni_;
  std::vector<float> out_, inverse_sums_;
  std::vector<const bf16*> key_rows_, value_rows_;
  std::vector<bf16> biased_;
  std::vector<float> pooled_;
  Bf16AttentionScratch scratch_;
  Bf16MatrixUnitsRelease release_;  // when the thread's solver goes, after its last task
};

// How many tasks ahead each thread prefetches the q, k and v it will read. Against prefetching the whole next
// window at its first head, on a 2-core AMD EPYC at tiny's seven window shapes (in-model sizes, 8 rotating inputs,
// interleaved): 1 task ahead took 5-8% less time per forward, 2 ahead 7-11%, 4 ahead 9-13%; also prefetching the
// task's output slices for writing took 4-5% off that.
constexpr int64_t kPrefetchTasksAhead = 4;

at::Tensor window_attention_cpu(
    const at::Tensor& qkv_in, const std::optional<at::Tensor>& qkv_bias, int64_t num_heads, int64_t window_size,
    bool q_pool, bool add_bias) {
  check_qkv("window_attention", qkv_in, num_heads);
  TORCH_CHECK(window_size > 0, "window_attention: expected a positive window_size, got ", window_size);
  // An odd window would pool to fewer rows than H // 2 (each window drops its last row), a case Hiera never has.
  TORCH_CHECK(!q_pool || window_size % 2 == 0, "window_attention: q_pool needs an even window_size, got ",
              window_size);
  TORCH_CHECK(!add_bias || qkv_bias.has_value(), "window_attention: add_bias needs a qkv_bias, got None");
  const at::Tensor qkv = with_unit_channel_stride(qkv_in);
  const int64_t batch = qkv.size(0), height = qkv.size(1), width = qkv.size(2), dim = qkv.size(3) / 3;
  const int64_t head_dim = dim / num_heads;
  // The padding tokens read as `fill`; with add_bias they read as zeros and get the bias added like every token.
  at::Tensor fill, bias;
  if (qkv_bias.has_value()) {
    check_qkv_bias("window_attention", *qkv_bias, qkv);
    bias = qkv_bias->to(qkv.scalar_type()).contiguous();  // rounded to qkv's dtype, as the reference pads
  }
  fill = (bias.defined() && !add_bias) ? bias : at::zeros({3 * dim}, qkv.options());
  const WindowTasks tasks = WindowTasks::of(batch, height, width, num_heads, window_size, q_pool);
  const int64_t out_h = tasks.out_h, out_w = tasks.out_w;
  at::Tensor out = at::empty({batch, out_h, out_w, dim}, qkv.options());
  if (out.numel() == 0) return out;

  const AttentionShape shape{tasks.max_queries(), tasks.max_keys(), head_dim};
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(head_dim)));
  const auto task_cost = [&](int64_t task) { return tasks.cost(task, head_dim); };

  // Runs every task with a Solver (Fp32WindowSolver or Bf16WindowSolver), one per thread.
  const auto run_tasks = [&](auto solver_type, auto scalar) {
    using Solver = typename decltype(solver_type)::type;
    using scalar_t = typename decltype(scalar)::type;
    const TokenReader<scalar_t> reader{qkv.const_data_ptr<scalar_t>(), fill.const_data_ptr<scalar_t>(),
                                       qkv.stride(0), qkv.stride(1), qkv.stride(2), height, width};
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    // Unpartition: query (qy, qx) of window w lands at (w.out_y0 + qy, w.out_x0 + qx); the head's channels start
    // at `channel`.
    const auto output_slice = [&](const TaskWindow& w, int64_t qy, int64_t qx, int64_t channel) {
      return dst + ((w.b * out_h + w.out_y0 + qy) * out_w + w.out_x0 + qx) * dim + channel;
    };
    const scalar_t* added_bias = add_bias ? bias.const_data_ptr<scalar_t>() : nullptr;
    parallel_for_balanced(tasks.count, 1 << 18, task_cost, [&](int64_t, int64_t begin, int64_t end) {
      Solver solver(shape);
      std::vector<float> key_logit_offsets(shape.num_keys, 0.0f);
      for (int64_t task = begin; task < end; ++task) {
        const TaskWindow w = tasks.window(task);
        const int64_t q_offset = w.head * head_dim, k_offset = dim + q_offset, v_offset = 2 * dim + q_offset;
        const scalar_t* q_bias = added_bias == nullptr ? nullptr : added_bias + q_offset;
        const scalar_t* k_bias = added_bias == nullptr ? nullptr : added_bias + k_offset;
        const scalar_t* v_bias = added_bias == nullptr ? nullptr : added_bias + v_offset;
        // The task kPrefetchTasksAhead later in this thread's range (with a few heads: the next window's same
        // head) has its inputs fetched while this one computes; one task ahead leaves too little time.
        if (task + kPrefetchTasksAhead < end) {
          const TaskWindow ahead = tasks.window(task + kPrefetchTasksAhead);
          const int64_t ahead_offset = ahead.head * head_dim;
          reader.prefetch_head(ahead.b, ahead.y0, ahead.x0, window_size, dim, ahead_offset, head_dim);
          // Its output slices too, for writing: the unpartition's scattered stores otherwise stall on their misses.
          for (int64_t qy = 0; qy < ahead.kept_h; ++qy) {
            for (int64_t qx = 0; qx < ahead.kept_w; ++qx) {
              prefetch_into_l2<1>(output_slice(ahead, qy, qx, ahead_offset), head_dim);
            }
          }
        }
        // Only the queries that survive the crop are computed (padding tokens still attend as keys): in a window
        // that overhangs the map, query (qy, qx) is row qy * valid_w + qx of the packed problem.
        if (w.num_queries() == 0) continue;
        const int64_t valid_w = w.kept_w, in_w = w.in_w, padding = w.padding;
        // Keys: the window's in_h x in_w tokens inside the map, row by row, then its padding tokens as one key.
        const AttentionShape task_shape{w.num_queries(), w.num_keys(), head_dim};
        solver.begin(task_shape);
        for (int64_t wy = 0; wy < w.in_h; ++wy) {
          for (int64_t wx = 0; wx < in_w; ++wx) {
            const scalar_t* token = reader.token(w.b, w.y0 + wy, w.x0 + wx);
            solver.key_value(wy * in_w + wx, token + k_offset, token + v_offset, k_bias, v_bias);
          }
        }
        if (padding > 0) {
          solver.key_value(task_shape.num_keys - 1, reader.fill + k_offset, reader.fill + v_offset, k_bias, v_bias);
          key_logit_offsets[task_shape.num_keys - 1] = std::log(static_cast<float>(padding));
        }
        const int64_t step = q_pool ? 2 : 1;
        for (int64_t qy = 0; qy < w.kept_h; ++qy) {
          for (int64_t qx = 0; qx < valid_w; ++qx) {
            solver.query(qy * valid_w + qx, reader, w.b, w.y0 + step * qy, w.x0 + step * qx, q_pool, q_offset, q_bias);
          }
        }
        solver.solve(scale, padding > 0 ? key_logit_offsets.data() : nullptr);
        if (padding > 0) key_logit_offsets[task_shape.num_keys - 1] = 0.0f;
        for (int64_t qy = 0; qy < w.kept_h; ++qy) {
          for (int64_t qx = 0; qx < valid_w; ++qx) {
            solver.write_output(qy * valid_w + qx, output_slice(w, qy, qx, q_offset));
          }
        }
      }
    });
  };

  if (qkv.scalar_type() == at::kBFloat16 && bf16_matrix_attention()) {
    run_tasks(std::type_identity<Bf16WindowSolver>{}, std::type_identity<at::BFloat16>{});
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv.scalar_type(), "window_attention_cpu", [&] {
    run_tasks(std::type_identity<Fp32WindowSolver<scalar_t>>{}, std::type_identity<scalar_t>{});
  });
  return out;
}

}  // namespace
}  // namespace sam2_fast

TORCH_LIBRARY_IMPL(sam2_fast_ext, CPU, m) {
  m.impl("window_attention", TORCH_FN(sam2_fast::window_attention_cpu));
}
