"""Every op of the op layer, declared once: one block per op, read top to bottom.

Each block is the op's spec (:mod:`sam2_fast.ops.spec` says what each field means) and, next to it, the few lines
that map its backward kernel's results onto the op's inputs. :mod:`sam2_fast.ops.registry` derives the rest: the
custom ops and their fakes, the extension ops' fakes, the autograd formulas, the ``triton_op``s and the dispatch.
Adding an op: its spec here, its shape function in :mod:`sam2_fast.backends.shapes`, its reference in
:mod:`sam2_fast.backends.torch_ops`, its kernels, its entry point in :mod:`sam2_fast.ops` and its tests.
"""

from __future__ import annotations

from ..backends import shapes, torch_ops
from .spec import Backward, KernelSpec, OpSpec

# ----------------------------------------------------------------------------------------------------------------
# Attention. One backward kernel serves both attentions: global attention is windowed attention with window_size 0
# and no bias. It returns (grad_qkv, grad_qkv_bias); grad_qkv_bias is empty without a bias.

ATTENTION_BACKWARD = KernelSpec(
    name="attention_backward",
    schema="(Tensor grad_out, Tensor qkv, Tensor? qkv_bias, Tensor out, SymInt num_heads, SymInt window_size, "
    "bool q_pool, bool add_bias) -> (Tensor, Tensor)",
    fake=shapes.attention_backward_outputs,
    extension=True,
    triton=True,
)


def _window_attention_gradients(kernel, grad_output, inputs, output):
    qkv, qkv_bias, num_heads, window_size, q_pool, add_bias = inputs
    grad_qkv, grad_bias = kernel(grad_output, qkv, qkv_bias, output, num_heads, window_size, q_pool, add_bias)
    return grad_qkv, None if qkv_bias is None else grad_bias, None, None, None, None


WINDOW_ATTENTION = OpSpec(
    name="window_attention",
    schema="(Tensor qkv, Tensor? qkv_bias, SymInt num_heads, SymInt window_size, bool q_pool, bool add_bias) -> Tensor",
    fake=shapes.window_attention_output,
    reference=torch_ops.window_attention,
    torch_backend=torch_ops.window_attention_emulating_low_precision,
    extension=True,
    triton=True,
    differentiable=("qkv", "qkv_bias"),
    backward=Backward(kernel=ATTENTION_BACKWARD, gradients=_window_attention_gradients, saves_output=True),
)


def _global_attention_gradients(kernel, grad_output, inputs, output):
    qkv, num_heads, q_pool = inputs
    grad_qkv, _ = kernel(grad_output, qkv, None, output, num_heads, 0, q_pool, False)
    return grad_qkv, None, None


GLOBAL_ATTENTION = OpSpec(
    name="global_attention",
    schema="(Tensor qkv, SymInt num_heads, bool q_pool) -> Tensor",
    fake=shapes.global_attention_output,
    reference=torch_ops.global_attention,
    torch_backend=torch_ops.global_attention_emulating_low_precision,
    extension=True,
    triton=True,
    differentiable=("qkv",),
    backward=Backward(kernel=ATTENTION_BACKWARD, gradients=_global_attention_gradients, saves_output=True),
    # torch's flash SDPA ran 1.5-1.7x faster than the tuned Triton kernel at every config's global blocks at
    # 1024x1024 on an H200 (bf16, batch 1 and 8; ``python -m bench.tune_attention``); the kernel stays selectable.
    auto_order={"cuda": ("torch",)},
)

# ----------------------------------------------------------------------------------------------------------------
# Mask-unit max-pooling. Its backward routes each gradient to the max of its 2x2 window, read again from x: it
# does not need the output.

MAXPOOL2X2_BACKWARD = KernelSpec(
    name="maxpool2x2_backward",
    schema="(Tensor grad_out, Tensor x) -> Tensor",
    fake=shapes.maxpool2x2_backward_output,
    extension=True,
    triton=True,
)


def _maxpool2x2_gradients(kernel, grad_output, inputs, output):
    (x,) = inputs
    return (kernel(grad_output, x),)


MAXPOOL2X2 = OpSpec(
    name="maxpool2x2",
    schema="(Tensor x) -> Tensor",
    fake=shapes.maxpool2x2_output,
    reference=torch_ops.maxpool2x2,
    extension=True,
    triton=True,
    differentiable=("x",),
    backward=Backward(kernel=MAXPOOL2X2_BACKWARD, gradients=_maxpool2x2_gradients),
)

# ----------------------------------------------------------------------------------------------------------------
# FPN top-down fusion. Its gradient is an exact formula on every backend; a Triton kernel computes prev's part (the
# 2x2 sums) where it runs. The extension has no backward kernel: it takes the formula.

FPN_UPSAMPLE_ADD_BACKWARD = KernelSpec(
    name="fpn_upsample_add_backward",
    schema="(Tensor grad, Tensor prev) -> Tensor",
    fake=shapes.fpn_upsample_add_backward_output,
    triton=True,
)


def _fpn_upsample_add_formula(grad_output, inputs, output):
    """lateral's gradient is grad_output; prev's, the 2x2 sums of it (each prev pixel fed four output pixels)."""
    lateral, prev = inputs
    batch, channels, height, width = prev.shape
    grad_prev = grad_output.reshape(batch, channels, height, 2, width, 2).sum(dim=(3, 5))
    return grad_output.to(lateral.dtype), grad_prev.to(prev.dtype)


def _fpn_upsample_add_gradients(kernel, grad_output, inputs, output):
    lateral, prev = inputs
    return grad_output.to(lateral.dtype), kernel(grad_output, prev)


FPN_UPSAMPLE_ADD = OpSpec(
    name="fpn_upsample_add",
    schema="(Tensor lateral, Tensor prev) -> Tensor",
    fake=shapes.fpn_upsample_add_output,
    reference=torch_ops.fpn_upsample_add,
    extension=True,
    triton=True,
    differentiable=("lateral", "prev"),
    backward=Backward(
        kernel=FPN_UPSAMPLE_ADD_BACKWARD, gradients=_fpn_upsample_add_gradients, formula=_fpn_upsample_add_formula
    ),
)

# ----------------------------------------------------------------------------------------------------------------
# Bias + GELU in place, for a GEMM's fresh output that no gradient needs: CPU kernels only (on CUDA torch's GELU is
# already one memory-bound pass, so auto takes torch there without the fallback warning).

BIAS_GELU_ = OpSpec(
    name="bias_gelu_",
    schema="(Tensor(a!) x, Tensor? bias) -> ()",
    fake=shapes.check_bias_gelu,
    reference=torch_ops.bias_gelu_,
    extension=True,
    auto_order={"cuda": ("torch",)},
)

# ----------------------------------------------------------------------------------------------------------------
# Sine position encoding: no tensor input, computed once per size and cached.

SINE_POSITION_ENCODING = OpSpec(
    name="sine_position_encoding",
    schema="(SymInt height, SymInt width, SymInt num_pos_feats, float temperature, bool normalize, float scale, "
    "Device device) -> Tensor",
    fake=shapes.sine_position_encoding_output,
    reference=torch_ops.sine_position_encoding,
    extension=True,
)

# ----------------------------------------------------------------------------------------------------------------
# The extension's fp32 training GEMMs on CPU, called by the GEMM layer (sam2_fast.gemm.cpu_gemm), not dispatched
# here: declared so that their fakes are registered with the others.

LINEAR = KernelSpec(
    name="linear",
    schema="(Tensor input, Tensor weight, Tensor? bias) -> Tensor",
    fake=shapes.linear_output,
    extension=True,
)

LINEAR_WEIGHT_GRAD = KernelSpec(
    name="linear_weight_grad",
    schema="(Tensor grad, Tensor input, bool with_bias) -> (Tensor, Tensor)",
    fake=shapes.linear_weight_grad_outputs,
    extension=True,
)

# The ops the model calls, in the order backend_status lists them, and every kernel-level op.
OP_SPECS = (WINDOW_ATTENTION, GLOBAL_ATTENTION, MAXPOOL2X2, FPN_UPSAMPLE_ADD, BIAS_GELU_, SINE_POSITION_ENCODING)
KERNEL_SPECS = (ATTENTION_BACKWARD, MAXPOOL2X2_BACKWARD, FPN_UPSAMPLE_ADD_BACKWARD, LINEAR, LINEAR_WEIGHT_GRAD)
