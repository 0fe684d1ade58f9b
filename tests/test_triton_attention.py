"""The Triton window_attention and global_attention kernels against their torch implementations, directly and
through the op layer (opcheck, torch.compile).

Runs on CUDA, or on CPU under the Triton interpreter in its own process:
``TRITON_INTERPRET=1 python -m pytest -q tests/test_triton_attention.py -m interpreter``. The interpreter takes
milliseconds per tile, so on CPU the shapes are tiny but odd on purpose (maps that are not multiples of the
window, head dims that are not powers of two, strided views); on a GPU model-sized shapes and fp16/bf16 run too.
"""

import pytest
import torch

from helpers import (
    assert_close_verbose, assert_low_precision_attention_error, emulated_low_precision_attention, max_abs_error,
    triton_test_device,
)

pytestmark = pytest.mark.interpreter
DEVICE, ON_GPU = triton_test_device()

import sam2_fast  # noqa: E402
import sam2_fast.ops  # noqa: E402
from sam2_fast.backends import torch_ops  # noqa: E402
from sam2_fast.kernels.global_attention import global_attention  # noqa: E402
from sam2_fast.kernels.window_attention import window_attention  # noqa: E402


# fp16/bf16 run on CPU too: the interpreter computes their matmuls in fp32 (see kernels.window_attention), but the
# 16-bit loads, pooling, padding fill and output casts are the kernel's own.
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# fp32: both sides accumulate in fp32 and differ only in summation order, ~1e-6 at outputs of magnitude ~1.
FP32_ATOL = FP32_RTOL = 1e-5


def _random(shape, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator).to(dtype=dtype, device=DEVICE)


def _qkv(batch, height, width, channels3, dtype, layout, seed):
    """A (B, H, W, 3 * dim) qkv map: contiguous, a strided slice of a bigger map, or with H and W strides swapped."""
    if layout == "contiguous":
        return _random((batch, height, width, channels3), dtype, seed)
    if layout == "sliced":
        return _random((batch, height + 3, width + 2, channels3 + 40), dtype, seed)[:, 2 : 2 + height, 1 : 1 + width, 8 : 8 + channels3]
    assert layout == "transposed"
    return _random((batch, width, height, channels3), dtype, seed).transpose(1, 2)


def _assert_matches(actual, reference_fn, qkv, name):
    """fp32: tight elementwise tolerance. fp16/bf16 (flash-attention's criterion, with a machine-independent
    yardstick): the error against the fp32 reference on the same rounded inputs is at most twice an emulated kernel's
    in that dtype (helpers.emulated_low_precision_attention), plus one ulp of the dtype at the output's magnitude (a
    kernel storing fp32 -> bf16 by truncation, as the interpreter does, is off by up to one ulp)."""
    assert actual.dtype == qkv.dtype, f"{name}: dtype {actual.dtype} != qkv dtype {qkv.dtype}"
    assert actual.is_contiguous(), f"{name}: output is not contiguous (strides {actual.stride()})"
    expected = reference_fn(qkv.float())
    if qkv.dtype == torch.float32:
        assert_close_verbose(actual, expected, atol=FP32_ATOL, rtol=FP32_RTOL, name=name)
        return
    ulp = torch.finfo(qkv.dtype).eps * max(1.0, expected.abs().max().item())
    assert_low_precision_attention_error(name, actual, emulated_low_precision_attention(reference_fn, qkv), expected, ulp)


# ----------------------------------------------------------------------------------------------------------------
# window_attention

# (label, batch, height, width, num_heads, head_dim, window_size, q_pool, has_bias, layout)
WINDOW_CASES = [
    ("pad_h_w_w4", 1, 5, 11, 2, 12, 4, False, True, "sliced"),
    ("pad_h_w_w4_qpool_b2", 2, 5, 11, 2, 12, 4, True, True, "sliced"),
    ("w8_qpool_no_bias", 1, 8, 8, 1, 24, 8, True, False, "contiguous"),
    ("pad_w7_no_bias_b2", 2, 9, 7, 2, 12, 7, False, False, "transposed"),
    ("w14_qpool_odd_h", 1, 15, 14, 1, 24, 14, True, True, "sliced"),
    ("w16_qpool_pad_w", 1, 16, 17, 2, 20, 16, True, True, "contiguous"),
    ("map_inside_one_window", 2, 3, 5, 1, 12, 8, False, True, "transposed"),
]
if ON_GPU:  # the shapes of the configs' blocks at 1024x1024 (tiny/small: head dim 96, base_plus 56, large 72)
    WINDOW_CASES += [
        ("stage1_w8_hd56_b2", 2, 256, 256, 2, 56, 8, False, True, "contiguous"),
        ("stage2_qpool_w8_hd72", 1, 256, 256, 4, 72, 8, True, True, "sliced"),
        ("stage2_w4_hd96", 2, 128, 128, 2, 96, 4, False, True, "sliced"),
        ("stage3_qpool_w4_hd96", 1, 128, 128, 4, 96, 4, True, True, "contiguous"),
        ("stage3_w14_pad_hd96", 1, 64, 64, 4, 96, 14, False, True, "contiguous"),
        ("stage3_w16_hd72", 2, 64, 64, 8, 72, 16, False, True, "transposed"),
        ("stage4_qpool_w14_pad_hd96_b2", 2, 64, 64, 8, 96, 14, True, True, "sliced"),
        ("stage4_qpool_w16_hd72", 1, 64, 64, 16, 72, 16, True, True, "contiguous"),
        ("stage4_w7_pad_hd56", 2, 32, 32, 16, 56, 7, False, True, "contiguous"),
    ]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", WINDOW_CASES, ids=lambda case: case[0])
def test_window_attention_matches_torch(case, dtype):
    label, batch, height, width, num_heads, head_dim, window_size, q_pool, has_bias, layout = case
    channels3 = 3 * num_heads * head_dim
    qkv = _qkv(batch, height, width, channels3, dtype, layout, seed=len(label))
    bias = _random((channels3,), dtype, seed=1) if has_bias else None
    actual = window_attention(qkv, bias, num_heads, window_size, q_pool)

    def reference(qkv_in):
        return torch_ops.window_attention(
            qkv_in, None if bias is None else bias.to(qkv_in.dtype), num_heads, window_size, q_pool
        )

    _assert_matches(actual, reference, qkv, f"window_attention {label} {dtype}")


def test_window_attention_fp32_bias_on_low_precision_qkv():
    # Under autocast the qkv Linear's bias stays fp32 while its output is bf16; the reference casts it to bf16.
    qkv = _random((1, 5, 6, 36), torch.bfloat16, 30)
    bias = _random((36,), torch.float32, 31)
    expected = torch_ops.window_attention(qkv.float(), bias.to(torch.bfloat16).float(), 2, 4, False)
    actual = window_attention(qkv, bias, 2, 4, False)
    emulated = emulated_low_precision_attention(torch_ops.window_attention, qkv, bias, 2, 4, False)
    ulp = torch.finfo(torch.bfloat16).eps * max(1.0, expected.abs().max().item())
    assert_low_precision_attention_error("bf16 qkv, fp32 bias", actual, emulated, expected, ulp)


def test_window_attention_padding_is_bias_not_mask():
    # A map of one token in an 4x4 window: 15 of the 16 keys are padding; masking them would give out = v[0].
    qkv = _random((1, 1, 1, 24), torch.float32, 40)
    bias = _random((24,), torch.float32, 41)
    actual = window_attention(qkv, bias, 1, 4, False)
    assert_close_verbose(actual, torch_ops.window_attention(qkv, bias, 1, 4, False), FP32_ATOL, FP32_RTOL, "1x1 map")
    assert max_abs_error(actual[0, 0, 0], qkv[0, 0, 0, 16:]) > 1e-2


def test_window_attention_through_op_layer():
    qkv = _qkv(2, 5, 11, 72, torch.float32, "sliced", 50)
    bias = _random((72,), torch.float32, 51)
    with sam2_fast.use_backend("triton"):
        assert sam2_fast.ops.resolve_backend("window_attention", qkv.device.type) == "triton"
        actual = sam2_fast.ops.window_attention(qkv, bias, 2, 4, True)
    expected = torch_ops.window_attention(qkv, bias, 2, 4, True)
    assert_close_verbose(actual, expected, FP32_ATOL, FP32_RTOL, "ops.window_attention")


def test_window_attention_add_bias():
    # The launcher adds the bias before the kernel (on GPU the model keeps it in the qkv GEMM's epilogue instead).
    qkv = _qkv(2, 5, 11, 72, torch.float32, "sliced", 52)
    bias = _random((72,), torch.float32, 53)
    actual = window_attention(qkv, bias, 2, 4, True, add_bias=True)
    expected = torch_ops.window_attention(qkv + bias, bias, 2, 4, True)
    assert_close_verbose(actual, expected, FP32_ATOL, FP32_RTOL, "window_attention add_bias")
    with pytest.raises(ValueError, match="add_bias=True needs a qkv_bias"):
        window_attention(qkv, None, 2, 4, True, add_bias=True)


@pytest.mark.parametrize(
    "dtype, has_bias", [(torch.float32, True), (torch.float32, False), (torch.bfloat16, True)], ids=str
)
def test_window_attention_opcheck(dtype, has_bias):
    # Tiny on purpose: opcheck runs the op dozens of times (schema, fake, autograd, aot dispatch).
    requires_grad = dtype == torch.float32
    qkv = _qkv(1, 5, 3, 36, dtype, "sliced", 60).requires_grad_(requires_grad)
    bias = _random((36,), dtype, 61).requires_grad_(requires_grad) if has_bias else None
    torch.library.opcheck(torch.ops.sam2_fast.window_attention.default, (qkv, bias, 2, 4, True, False, "triton"))


def test_window_attention_compiles_fullgraph():
    def attention_block(qkv, bias):
        return sam2_fast.ops.window_attention(qkv * 2.0, bias, 2, 4, True) + 1.0

    qkv = _random((2, 5, 7, 36), torch.float32, 70)
    bias = _random((36,), torch.float32, 71)
    # On CPU, inductor's C++ codegen costs ~40 s here and adds nothing about the op: aot_eager traces the same
    # graph through the op's fake implementation, which is what fullgraph needs.
    compile_backend = "inductor" if ON_GPU else "aot_eager"
    torch._dynamo.reset()
    with sam2_fast.use_backend("triton"):
        actual = torch.compile(attention_block, backend=compile_backend, fullgraph=True, dynamic=False)(qkv, bias)
    expected = torch_ops.window_attention(qkv * 2.0, bias, 2, 4, True) + 1.0
    assert_close_verbose(actual, expected, FP32_ATOL, FP32_RTOL, "compiled window_attention")


# ----------------------------------------------------------------------------------------------------------------
# global_attention

# (label, batch, height, width, num_heads, head_dim, q_pool, layout)
GLOBAL_CASES = [
    ("b1_5x11", 1, 5, 11, 2, 12, False, "sliced"),
    ("b2_5x11_qpool", 2, 5, 11, 2, 12, True, "sliced"),
    ("b1_9x9_qpool_hd24", 1, 9, 9, 1, 24, True, "transposed"),
    ("b2_7x10_hd20", 2, 7, 10, 2, 20, False, "contiguous"),
]
if ON_GPU:  # the configs' global blocks at 1024x1024 (64x64 tokens), and pooling over an odd map
    GLOBAL_CASES += [
        ("tiny_stage3_hd96", 1, 64, 64, 4, 96, False, "contiguous"),
        ("bplus_stage3_hd56_b2", 2, 64, 64, 8, 56, False, "sliced"),
        ("large_stage3_hd72", 1, 64, 64, 8, 72, False, "transposed"),
        ("qpool_63x62_hd96", 1, 63, 62, 2, 96, True, "sliced"),
    ]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", GLOBAL_CASES, ids=lambda case: case[0])
def test_global_attention_matches_torch(case, dtype):
    label, batch, height, width, num_heads, head_dim, q_pool, layout = case
    qkv = _qkv(batch, height, width, 3 * num_heads * head_dim, dtype, layout, seed=len(label))
    actual = global_attention(qkv, num_heads, q_pool)
    _assert_matches(
        actual, lambda qkv_in: torch_ops.global_attention(qkv_in, num_heads, q_pool), qkv,
        f"global_attention {label} {dtype}",
    )


def test_global_attention_through_op_layer():
    qkv = _qkv(2, 5, 7, 72, torch.float32, "transposed", 80)
    with sam2_fast.use_backend("triton"):
        assert sam2_fast.ops.resolve_backend("global_attention", qkv.device.type) == "triton"
        actual = sam2_fast.ops.global_attention(qkv, 2, True)
    assert_close_verbose(actual, torch_ops.global_attention(qkv, 2, True), FP32_ATOL, FP32_RTOL, "ops.global_attention")


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_global_attention_opcheck(dtype):
    qkv = _qkv(1, 5, 3, 36, dtype, "sliced", 90).requires_grad_(dtype == torch.float32)
    torch.library.opcheck(torch.ops.sam2_fast.global_attention.default, (qkv, 2, True, "triton"))
