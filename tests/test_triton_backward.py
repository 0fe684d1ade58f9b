"""The Triton backward kernels (attention, max-pool, FPN fusion) against autograd of the torch implementations,
directly and through the op layer's autograd formulas.

Runs on CUDA, or on CPU under the Triton interpreter in its own process:
``TRITON_INTERPRET=1 python -m pytest -q tests/test_triton_backward.py -m interpreter``. Under the interpreter
(milliseconds per tile) the shapes are tiny but odd: maps that are not multiples of the window, padded windows
that pool q, a window that pools to nothing, head dims that are not powers of two. Triton has no fp64, so the
gradients are checked in fp32 against float64 autograd instead of by finite differences.
"""

import pytest
import torch

from helpers import assert_close_verbose, max_abs_error, triton_test_device

pytestmark = pytest.mark.interpreter
DEVICE, ON_GPU = triton_test_device()

import sam2_fast  # noqa: E402
from sam2_fast import ops
from sam2_fast.backends import torch_ops  # noqa: E402
from sam2_fast.kernels.attention_backward import attention_backward  # noqa: E402
from sam2_fast.kernels.fpn_upsample_add_backward import fpn_upsample_add_backward  # noqa: E402
from sam2_fast.kernels.maxpool2x2_backward import maxpool2x2_backward  # noqa: E402

# Worst error relative to the gradient's magnitude, against float64 autograd on the same rounded inputs: fp32 sums
# in another order (~1e-6); 16-bit kernels round q, k, v (the bias-added ones too), dO, the probabilities fed to the
# products and the stored gradient, and take D from the rounded output (a few units of 2^-8 bf16, 2^-11 fp16;
# under the interpreter stores truncate, one more unit).
RELATIVE_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2**-6, torch.float16: 2**-8}
DTYPES = list(RELATIVE_TOLERANCE)

# (B, H, W, heads, head_dim, window, q_pool, add_bias, with_bias); window 0: global attention (no bias).
CASES = [
    (2, 5, 11, 2, 12, 4, False, False, True),
    (1, 10, 6, 2, 8, 4, True, False, True),
    (1, 7, 9, 1, 12, 14, True, True, True),
    (2, 9, 5, 1, 16, 4, True, False, False),
    (1, 5, 5, 1, 8, 4, True, False, True),  # the last window row holds one map row: it pools to nothing
    (2, 3, 5, 2, 12, 0, False, False, False),
    (1, 5, 4, 1, 16, 0, True, False, False),
]
if ON_GPU:  # model-sized windows and global blocks
    CASES += [(2, 64, 64, 2, 56, 14, False, False, True), (1, 32, 32, 4, 96, 8, True, False, True),
              (2, 32, 32, 4, 72, 0, False, False, False)]


def _inputs(case, dtype, seed=0):
    batch, height, width, heads, head_dim, window, q_pool, add_bias, with_bias = case
    generator = torch.Generator().manual_seed(seed)
    channels3 = 3 * heads * head_dim
    qkv = torch.randn(batch, height, width, channels3, generator=generator).to(dtype=dtype, device=DEVICE)
    bias = torch.randn(channels3, generator=generator).to(dtype=dtype, device=DEVICE) if with_bias else None
    return qkv, bias, heads, window, q_pool, add_bias


def _forward(qkv, bias, heads, window, q_pool, add_bias):
    if window:
        return torch_ops.window_attention(qkv, bias, heads, window, q_pool, add_bias)
    return torch_ops.global_attention(qkv, heads, q_pool)


def _exact_gradients(qkv, bias, heads, window, q_pool, add_bias, grad_out):
    leaves = [t.detach().double().requires_grad_(True) for t in (qkv, bias) if t is not None]
    out = _forward(leaves[0], leaves[1] if bias is not None else None, heads, window, q_pool, add_bias)
    return out.detach(), torch.autograd.grad(out, leaves, grad_out.double())


def _check(name, actual, expected, dtype):
    assert actual.dtype == dtype, f"{name}: dtype {actual.dtype} != {dtype}"
    scale = expected.abs().max().item()
    if scale == 0:  # e.g. a bias no kept query attends through
        assert actual.abs().max().item() == 0, f"{name}: expected zeros"
        return
    error = max_abs_error(actual, expected) / scale
    assert error <= RELATIVE_TOLERANCE[dtype], f"{name}: relative error {error:.3g} > {RELATIVE_TOLERANCE[dtype]}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_attention_backward_kernels(case, dtype):
    qkv, bias, heads, window, q_pool, add_bias = _inputs(case, dtype)
    out = _forward(qkv.float(), None if bias is None else bias.float(), heads, window, q_pool, add_bias).to(dtype)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype=dtype, device=DEVICE)
    grad_qkv, grad_bias = attention_backward(grad_out, qkv, bias, out, heads, window, q_pool, add_bias)
    _, expected = _exact_gradients(qkv, bias, heads, window, q_pool, add_bias, grad_out)
    assert grad_qkv.shape == qkv.shape and grad_qkv.is_contiguous()
    _check("grad qkv", grad_qkv, expected[0], dtype)
    if bias is None:
        assert grad_bias.shape == (0,)
    else:
        _check("grad qkv_bias", grad_bias, expected[1], dtype)


@pytest.mark.parametrize("case", [CASES[1], CASES[5]])
def test_op_layer_takes_the_triton_backward(case):
    # The op layer's autograd formula for the Triton backend runs these kernels (not the recompute fallback).
    qkv, bias, heads, window, q_pool, add_bias = _inputs(case, torch.float32, seed=2)
    leaves = [t.requires_grad_(True) for t in (qkv, bias) if t is not None]
    op = "window_attention" if window else "global_attention"
    with sam2_fast.use_backend("triton"):
        assert sam2_fast.active_backward(DEVICE)[op] == "triton kernel"
        out = ops.window_attention(qkv, bias, heads, window, q_pool) if window else ops.global_attention(qkv, heads, q_pool)
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
        actual = torch.autograd.grad(out, leaves, grad_out)
    _, expected = _exact_gradients(qkv, bias, heads, window, q_pool, add_bias, grad_out)
    for name, a, e in zip(("qkv", "qkv_bias"), actual, expected):
        _check(f"grad {name}", a, e, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 5, 7, 3), (1, 8, 6, 33)])
def test_maxpool2x2_backward_kernel(shape, dtype):
    # Few distinct values, so that most 2x2 windows tie: the gradient goes to max_pool2d's choice (the first max).
    generator = torch.Generator().manual_seed(4)
    x = torch.randint(0, 3, shape, generator=generator).to(dtype=dtype, device=DEVICE)
    grad_out = torch.randn(shape[0], shape[1] // 2, shape[2] // 2, shape[3], generator=generator).to(dtype=dtype,
                                                                                                    device=DEVICE)
    leaf = x.detach().double().requires_grad_(True)
    expected = torch.autograd.grad(torch_ops.maxpool2x2(leaf), leaf, grad_out.double())[0]
    assert_close_verbose(maxpool2x2_backward(grad_out, x), expected.to(dtype), name="grad x")


@pytest.mark.parametrize("prev_dtype", DTYPES, ids=str)
def test_fpn_upsample_add_backward_kernel(prev_dtype):
    generator = torch.Generator().manual_seed(5)
    lateral = torch.randn(2, 5, 6, 8, generator=generator).to(dtype=torch.bfloat16, device=DEVICE)
    prev = torch.randn(2, 5, 3, 4, generator=generator).to(dtype=prev_dtype, device=DEVICE)
    grad = torch.randn(2, 5, 6, 8, generator=generator).to(DEVICE).contiguous(memory_format=torch.channels_last)
    grad_prev = fpn_upsample_add_backward(grad, prev)
    leaves = [lateral.detach().requires_grad_(True), prev.detach().requires_grad_(True)]
    expected = torch.autograd.grad(torch_ops.fpn_upsample_add(*leaves), leaves, grad)
    # Four fp32 values summed in another order than autograd's, then rounded (truncated under the interpreter) to
    # prev's dtype: one unit of it.
    unit = {torch.float32: 1e-6, torch.bfloat16: 2**-7, torch.float16: 2**-10}[prev_dtype]
    assert_close_verbose(grad_prev.float(), expected[1].float(), atol=1e-6, rtol=unit, name="grad prev")


def test_op_layer_takes_the_triton_pool_and_fpn_backward():
    generator = torch.Generator().manual_seed(6)
    x = torch.randn(2, 5, 7, 3, generator=generator).to(DEVICE).requires_grad_(True)
    lateral = torch.randn(1, 4, 6, 8, generator=generator).to(DEVICE).requires_grad_(True)
    prev = torch.randn(1, 4, 3, 4, generator=generator).to(DEVICE).requires_grad_(True)
    with sam2_fast.use_backend("triton"):
        status = sam2_fast.active_backward(DEVICE)
        assert status["maxpool2x2"] == status["fpn_upsample_add"] == "triton kernel"
        pooled, fused = ops.maxpool2x2(x), ops.fpn_upsample_add(lateral, prev)
        actual = torch.autograd.grad((pooled * pooled).sum() + (fused * fused).sum(), (x, lateral, prev))
    expected = torch.autograd.grad(
        (torch_ops.maxpool2x2(x) ** 2).sum() + (torch_ops.fpn_upsample_add(lateral, prev) ** 2).sum(), (x, lateral, prev)
    )
    for name, a, e in zip(("x", "lateral", "prev"), actual, expected):
        assert_close_verbose(a, e, atol=1e-5, rtol=1e-5, name=f"grad {name}")
