// The sam2_fast_ext operator library: schemas of every op, and the Python module stub sam2_fast._C.
//
// Each op takes exactly the arguments of its plain-PyTorch reference in sam2_fast/backends/torch_ops.py, in that
// order; its spec in sam2_fast/ops/specs.py writes the same schema (a Python-defined op says SymInt for int), and
// tests/test_op_specs.py checks that the two agree. Kernels live one file per op per device: csrc/cpu/<family>/<op>.cpp
// (CPU) and csrc/cuda/<op>.cu (CUDA).

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/TensorOptions.h>
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include "cpu/attention/attention_backward.h"
#include "cpu/attention/attention_bf16.h"
#include "common/brgemm_f32.h"

namespace sam2_fast {
namespace {

// sine_position_encoding has no tensor argument, so the dispatcher cannot tell its device from its inputs. Like
// ATen's factory functions, it goes through a BackendSelect kernel that redispatches on the `device` argument.
at::Tensor sine_position_encoding_backend_select(
    c10::DispatchKeySet, int64_t height, int64_t width, int64_t num_pos_feats, double temperature, bool normalize,
    double scale, c10::Device device) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("sam2_fast_ext::sine_position_encoding", "")
                             .typed<at::Tensor(int64_t, int64_t, int64_t, double, bool, double, c10::Device)>();
  const c10::DispatchKey key = c10::computeDispatchKey(at::kFloat, at::kStrided, device);
  return op.redispatch(
      c10::DispatchKeySet(key), height, width, num_pos_feats, temperature, normalize, scale, device);
}

}  // namespace
}  // namespace sam2_fast

TORCH_LIBRARY(sam2_fast_ext, m) {
  m.def(
      "window_attention(Tensor qkv, Tensor? qkv_bias, int num_heads, int window_size, bool q_pool, "
      "bool add_bias=False) -> Tensor");
  m.def("global_attention(Tensor qkv, int num_heads, bool q_pool) -> Tensor");
  // The gradients of window_attention (and of global_attention with window_size 0): (grad_qkv, grad_qkv_bias).
  m.def(
      "attention_backward(Tensor grad_out, Tensor qkv, Tensor? qkv_bias, Tensor out, int num_heads, "
      "int window_size, bool q_pool, bool add_bias) -> (Tensor, Tensor)");
  m.def("maxpool2x2(Tensor x) -> Tensor");
  m.def("maxpool2x2_backward(Tensor grad_out, Tensor x) -> Tensor");
  m.def("fpn_upsample_add(Tensor lateral, Tensor prev) -> Tensor");
  m.def("bias_gelu_(Tensor(a!) x, Tensor? bias) -> ()");
  // A linear layer's product input @ weight^T + bias, and its weight and bias gradients, on CPU in fp32.
  m.def("linear(Tensor input, Tensor weight, Tensor? bias) -> Tensor");
  m.def("linear_weight_grad(Tensor grad, Tensor input, bool with_bias) -> (Tensor, Tensor)");
  m.def(
      "sine_position_encoding(int height, int width, int num_pos_feats, float temperature, bool normalize, "
      "float scale, Device device) -> Tensor");
}

TORCH_LIBRARY_IMPL(sam2_fast_ext, BackendSelect, m) {
  m.impl("sine_position_encoding", TORCH_FN(sam2_fast::sine_position_encoding_backend_select));
}

// Importing sam2_fast._C loads this library, which registers the ops above with the dispatcher.
PYBIND11_MODULE(_C, m) {
  m.doc() = "sam2_fast's C++/CUDA kernels, registered as torch.ops.sam2_fast_ext.*";
  m.def("built_with_cuda", []() {
#ifdef SAM2_FAST_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "Whether the extension has CUDA kernels (else CPU only).");
  m.def("bf16_matrix_attention", &sam2_fast::bf16_matrix_attention,
        "Whether bf16 window and global attention on CPU run on the CPU's bf16 matrix units (AMX or AVX512-BF16, "
        "through ATen's brgemm); else on the fp32 core.");
  m.def("bf16_matrix_units_usable", &sam2_fast::bf16_matrix_units_usable,
        "Whether this CPU and ATen can run the bf16 matrix-unit attention at all (AVX512-BF16, and neither ATen nor "
        "oneDNN capped below AVX-512 by ATEN_CPU_CAPABILITY or ONEDNN_MAX_CPU_ISA).");
  m.def("set_bf16_matrix_attention", &sam2_fast::set_bf16_matrix_attention, pybind11::arg("enabled"),
        "Allow (the default) or forbid the bf16 matrix-unit attention, e.g. to compare it with the fp32 core.");
  m.def("brgemm_attention_backward", &sam2_fast::brgemm_attention_backward,
        "Whether the CPU attention backward (fp32, bf16, fp16) runs its products on ATen's brgemm (oneDNN's "
        "micro-kernels); else on the BLAS torch links.");
  m.def("brgemm_f32_usable", &sam2_fast::brgemm_f32_usable,
        "Whether ATen's fp32 brgemm works here and oneDNN is enabled in torch: the attention backward's products, "
        "linear and linear_weight_grad need it. ATen runs it on oneDNN's micro-kernels where oneDNN's ISA is AVX2 or "
        "above (ONEDNN_MAX_CPU_ISA caps it), else on its BLAS gemm.");
  m.def("set_brgemm_attention_backward", &sam2_fast::set_brgemm_attention_backward, pybind11::arg("enabled"),
        "Allow (the default) or forbid the brgemm products of the CPU attention backward, e.g. to compare them with "
        "the BLAS's.");
}
