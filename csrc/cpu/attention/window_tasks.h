// The tasks of the CPU attention kernels, forward (window_attention.cpp) and backward (attention_backward.cpp): one
// per (image, window, head), numbered head-fastest, then the windows row-major over each image, images in order. A
// window of global attention is the whole map. Both kernels take a task's geometry and its cost from here, so that
// the backward walks exactly the windows the forward computed.
#pragma once

#include <algorithm>
#include <cstdint>

namespace sam2_fast {

// Where one task's problem sits in the map and in the output.
struct TaskWindow {
  int64_t b, head;
  int64_t y0, x0;              // the window's first token
  int64_t in_h, in_w;          // its tokens inside the map
  int64_t padding;             // its tokens beyond the map (all equal: one key weighted by the count)
  int64_t kept_h, kept_w;      // its queries that survive the crop (<= 0: none)
  int64_t out_y0, out_x0;      // where its first query lands in the output
  int64_t num_keys() const { return in_h * in_w + (padding > 0 ? 1 : 0); }
  int64_t num_queries() const { return kept_h > 0 && kept_w > 0 ? kept_h * kept_w : 0; }
};

// The windows of a (batch, height, width) map: window_size 0 is global attention (one window, no padding); with
// q_pool the output is (height // 2, width // 2) and each window keeps window_size / 2 rows and columns of it. With
// q_pool, a window holding a single row or column of the map pools to nothing.
struct WindowTasks {
  int64_t height, width, num_heads;
  int64_t window_h, window_w;          // a window's extent in the map
  int64_t out_window_h, out_window_w;  // and in the output
  int64_t out_h, out_w;
  int64_t rows, cols;                  // windows per map column and per map row
  int64_t count;                       // batch * rows * cols * num_heads

  static WindowTasks of(int64_t batch, int64_t height, int64_t width, int64_t num_heads, int64_t window_size,
                        bool q_pool) {
    const bool global = window_size == 0;
    const int64_t step = q_pool ? 2 : 1;
    const int64_t out_h = height / step, out_w = width / step;
    const int64_t rows = global ? 1 : (height + window_size - 1) / window_size;
    const int64_t cols = global ? 1 : (width + window_size - 1) / window_size;
    return {height,
            width,
            num_heads,
            global ? height : window_size,
            global ? width : window_size,
            global ? out_h : window_size / step,
            global ? out_w : window_size / step,
            out_h,
            out_w,
            rows,
            cols,
            batch * rows * cols * num_heads};
  }

  int64_t max_keys() const { return window_h * window_w; }
  int64_t max_queries() const { return out_window_h * out_window_w; }

  TaskWindow window(int64_t task) const {
    const int64_t window = task / num_heads, row = (window / cols) % rows, col = window % cols;
    const int64_t y0 = row * window_h, x0 = col * window_w;
    const int64_t in_h = std::min(window_h, height - y0), in_w = std::min(window_w, width - x0);
    const int64_t out_y0 = row * out_window_h, out_x0 = col * out_window_w;
    return {window / (rows * cols), task % num_heads, y0, x0, in_h, in_w, window_h * window_w - in_h * in_w,
            std::min(out_window_h, out_h - out_y0), std::min(out_window_w, out_w - out_x0), out_y0, out_x0};
  }

  // What parallel_for_balanced splits the tasks by: the kept queries' attention plus reading the window's keys and
  // values, so that windows overhanging the map (fewer queries and keys) do not leave a thread idle.
  int64_t cost(int64_t task, int64_t head_dim) const {
    const TaskWindow w = window(task);
    return (w.num_queries() + 2) * w.num_keys() * head_dim;
  }
};

}  // namespace sam2_fast
