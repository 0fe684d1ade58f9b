"""The C++/CUDA extension sam2_fast._C (ops torch.ops.sam2_fast_ext.*) against sam2_fast.backends.torch_ops.

Skipped, with the reason, when the extension is not built. Every op passes torch.library.opcheck (schema, fake
implementation, dynamic-shape tracing) and matches the torch implementation on odd shapes: odd channel counts,
non-square maps whose last window is mostly padding, batches of 1 to 3, non-contiguous inputs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import subprocess
import sys
from typing import Callable, Optional

import pytest
import torch
import torch.nn.functional as F

import sam2_fast
from sam2_fast.backends import extension as _extension, torch_ops
from sam2_fast import ops
from sam2_fast.ops import dispatch, registry, specs

from helpers import (
    assert_close_verbose,
    assert_low_precision_attention_error,
    brgemm_f32_usable,
    emulated_low_precision_attention,
)

if _extension.load_error() is not None:
    pytest.skip(_extension.load_error(), allow_module_level=True)

from sam2_fast import _C  # noqa: E402  (only importable once the extension is built)

EXT = torch.ops.sam2_fast_ext
DEVICES = [pytest.param("cpu")] + [
    pytest.param("cuda", marks=pytest.mark.gpu) for _ in range("cuda" in _extension.device_types())
]

# fp32 attention: the kernel sums the same products as torch's SDPA in another order (blocked dot products, its
# own exp), so it agrees to a few fp32 ulps of the O(1) outputs, as torch's own error against float64 does (~2e-6).
ATTENTION_FP32_TOL = dict(atol=2e-5, rtol=2e-5)
# Low precision: the kernel's error against the fp32 reference on the same rounded inputs is bounded by twice that
# of an emulated low-precision kernel (helpers.emulated_low_precision_attention: the same bound on every CPU), plus a
# floor for cases both compute exactly.
LOW_PRECISION_ERROR_FLOOR = 1e-6


def channels_last_map(batch: int, height: int, width: int, channels: int, device: str, layout: str,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A (B, H, W, C) map that is contiguous, has transposed H/W strides, or strided channels."""
    if layout == "contiguous":
        return torch.randn(batch, height, width, channels, device=device, dtype=dtype)
    if layout == "hw_transposed":
        return torch.randn(batch, width, height, channels, device=device, dtype=dtype).transpose(1, 2)
    if layout == "strided_channels":
        return torch.randn(batch, height, width, 2 * channels, device=device, dtype=dtype)[..., ::2]
    raise ValueError(layout)


LAYOUTS = ("contiguous", "hw_transposed", "strided_channels")

# bf16 attention runs on the CPU's bf16 matrix units (ATen's brgemm on AMX or AVX512-BF16) where it has them, else
# on the fp32 core. Each path is tested wherever it can run; the fp32 core on every CPU.
NO_MATRIX_UNITS = (
    "this CPU has no bf16 matrix units that ATen's brgemm can drive (needs AVX512-BF16, which CPUs with AMX have "
    "too): bf16 attention runs on the fp32 core here"
)
MATRIX_UNITS = pytest.param("matrix_units", marks=pytest.mark.skipif(not _C.bf16_matrix_units_usable(),
                                                                    reason=NO_MATRIX_UNITS))
# (dtype, attention path): every path each dtype can take.
DTYPE_PATHS = [
    pytest.param(torch.float32, "fp32_core", id="fp32"),
    pytest.param(torch.bfloat16, "fp32_core", id="bf16-fp32_core"),
    pytest.param(torch.bfloat16, "matrix_units", id="bf16-matrix_units", marks=MATRIX_UNITS.marks),
    pytest.param(torch.float16, "fp32_core", id="fp16"),
]
LOW_PRECISION_PATHS = DTYPE_PATHS[1:]


@contextlib.contextmanager
def attention_path(path: str):
    """Runs bf16 attention on ``path`` ("fp32_core" or "matrix_units") inside the block."""
    _C.set_bf16_matrix_attention(path == "matrix_units")
    try:
        yield
    finally:
        _C.set_bf16_matrix_attention(True)


# ---------------------------------------------------------------------------------------------------------------
# maxpool2x2

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(1, 8, 8, 3), (2, 13, 11, 7), (3, 5, 18, 33)])
def test_maxpool2x2_fp32(device, layout, shape):
    x = channels_last_map(*shape, device=device, layout=layout)
    assert_close_verbose(EXT.maxpool2x2(x), torch_ops.maxpool2x2(x).contiguous(), name="maxpool2x2")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_maxpool2x2_low_precision_is_exact(device, dtype):
    x = channels_last_map(2, 15, 9, 19, device=device, layout="hw_transposed", dtype=dtype)
    assert_close_verbose(EXT.maxpool2x2(x), torch_ops.maxpool2x2(x).contiguous(), name="maxpool2x2")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_maxpool2x2_nan_inf_and_signed_zeros_bitwise(device, dtype):
    # Values drawn from {-inf, -1, -0, +0, 1, inf, nan}: every tie, sign of zero and NaN position in a 2x2 window.
    specials = torch.tensor([float("-inf"), -1.0, -0.0, 0.0, 1.0, float("inf"), float("nan")], dtype=dtype)
    x = specials[torch.randint(len(specials), (2, 10, 12, 37))].to(device)
    ours, expected = EXT.maxpool2x2(x), torch_ops.maxpool2x2(x).contiguous()
    bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[dtype]
    same = (ours.view(bits) == expected.view(bits)) | (ours.isnan() & expected.isnan())
    assert bool(same.all()), f"{int((~same).sum())} elements differ bitwise, first at {(~same).nonzero()[:4].tolist()}"


# ---------------------------------------------------------------------------------------------------------------
# fpn_upsample_add

def _fpn_inputs(batch, channels, height, width, device, lateral_dtype, prev_dtype, channels_last):
    lateral = torch.randn(batch, channels, 2 * height, 2 * width, device=device).to(lateral_dtype)
    prev = torch.randn(batch, channels, height, width, device=device).to(prev_dtype)
    if channels_last:
        lateral = lateral.to(memory_format=torch.channels_last)
        prev = prev.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)  # transposed strides
    return lateral, prev


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("lateral_dtype,prev_dtype", [
    (torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
    (torch.float16, torch.bfloat16), (torch.float64, torch.float64),
])
@pytest.mark.parametrize("shape", [(1, 3, 4, 4), (2, 17, 5, 9), (3, 33, 7, 3)])
def test_fpn_upsample_add(device, channels_last, lateral_dtype, prev_dtype, shape):
    lateral, prev = _fpn_inputs(*shape, device, lateral_dtype, prev_dtype, channels_last)
    expected = torch_ops.fpn_upsample_add(lateral, prev)
    # The reference's dtype rule: the top-down term is fp32, so bf16 laterals give an fp32 result.
    assert expected.dtype == torch.promote_types(lateral_dtype, torch.float32)
    assert_close_verbose(EXT.fpn_upsample_add(lateral, prev), expected, name="fpn_upsample_add")


# ---------------------------------------------------------------------------------------------------------------
# sine_position_encoding

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("height,width,num_pos_feats,normalize", [
    (16, 16, 128, True), (7, 13, 6, True), (64, 32, 128, True), (9, 5, 16, False), (1, 3, 2, True),
])
def test_sine_position_encoding(device, height, width, num_pos_feats, normalize):
    args = (height, width, num_pos_feats, 10000.0, normalize, 2 * math.pi, torch.device(device))
    # The tables come from the reference's own ATen ops, so the values are identical, not just close.
    assert_close_verbose(EXT.sine_position_encoding(*args), torch_ops.sine_position_encoding(*args),
                         name="sine_position_encoding")


def test_sine_position_encoding_rejects_odd_num_pos_feats():
    with pytest.raises(RuntimeError, match="even"):
        EXT.sine_position_encoding(4, 4, 7, 10000.0, True, 1.0, torch.device("cpu"))


# ---------------------------------------------------------------------------------------------------------------
# window_attention and global_attention (CPU)

# (batch, height, width, num_heads, head_dim, window_size, q_pool): odd head dims and channel counts, maps that are
# not multiples of the window (the last window column or row is mostly padding), Hiera's q-pool cases.
WINDOW_CASES = [
    (1, 9, 17, 1, 12, 8, False),    # pads to 16 x 24: last window row holds 1 real row of 8
    (2, 13, 10, 3, 7, 4, False),    # odd head_dim, dim 21, qkv 63 channels
    (3, 15, 15, 2, 5, 14, False),   # one real window plus 13/14 padding windows
    (1, 16, 24, 1, 96, 8, False),   # tiny's stage-1 head_dim, no padding
    (2, 11, 9, 2, 9, 8, True),      # q_pool inside padded windows, odd output crop
    (1, 30, 22, 1, 24, 14, True),   # window 14 pooled to 7 (Hiera's stage-3 q-pool uses window 14 -> 7 output)
    (3, 9, 7, 1, 11, 4, True),
]


def _attention_inputs(batch, height, width, num_heads, head_dim, layout, with_bias, dtype=torch.float32):
    qkv = channels_last_map(batch, height, width, 3 * num_heads * head_dim, "cpu", layout, dtype)
    bias = torch.randn(3 * num_heads * head_dim, dtype=dtype) if with_bias else None
    return qkv, bias


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("case", WINDOW_CASES, ids=str)
def test_window_attention_fp32(case, with_bias, layout):
    batch, height, width, num_heads, head_dim, window_size, q_pool = case
    qkv, bias = _attention_inputs(batch, height, width, num_heads, head_dim, layout, with_bias)
    assert_close_verbose(
        EXT.window_attention(qkv, bias, num_heads, window_size, q_pool),
        torch_ops.window_attention(qkv, bias, num_heads, window_size, q_pool).contiguous(),
        name="window_attention", **ATTENTION_FP32_TOL,
    )


@pytest.mark.parametrize("dtype,path", LOW_PRECISION_PATHS)
@pytest.mark.parametrize("case", WINDOW_CASES, ids=str)
def test_window_attention_low_precision(case, dtype, path):
    batch, height, width, num_heads, head_dim, window_size, q_pool = case
    qkv, bias = _attention_inputs(batch, height, width, num_heads, head_dim, "hw_transposed", True, dtype)
    reference = torch_ops.window_attention(qkv.float(), bias.float(), num_heads, window_size, q_pool)
    with attention_path(path):
        ours = EXT.window_attention(qkv, bias, num_heads, window_size, q_pool)
    assert ours.dtype == dtype
    emulated = emulated_low_precision_attention(torch_ops.window_attention, qkv, bias, num_heads, window_size, q_pool)
    assert_low_precision_attention_error(
        f"window_attention {dtype} {path} {case}", ours, emulated, reference, LOW_PRECISION_ERROR_FLOOR
    )


@pytest.mark.parametrize("dtype,path", DTYPE_PATHS)
@pytest.mark.parametrize("case", WINDOW_CASES, ids=str)
def test_window_attention_adds_bias_as_it_reads(case, dtype, path):
    # add_bias=True on the bare projection is the same computation as add_bias=False on `qkv + bias` in qkv's dtype,
    # bit for bit: the kernel rounds each sum to the dtype, and pooling q before the add equals pooling after it
    # (rounding is monotonic). Padding tokens read as the bias either way.
    batch, height, width, num_heads, head_dim, window_size, q_pool = case
    qkv, bias = _attention_inputs(batch, height, width, num_heads, head_dim, "hw_transposed", True, dtype)
    biased = qkv + bias
    with attention_path(path):
        torch.testing.assert_close(
            EXT.window_attention(qkv, bias, num_heads, window_size, q_pool, True),
            EXT.window_attention(biased, bias, num_heads, window_size, q_pool, False),
            atol=0, rtol=0,
        )
    if dtype == torch.float32:
        assert_close_verbose(
            EXT.window_attention(qkv, bias, num_heads, window_size, q_pool, True),
            torch_ops.window_attention(qkv, bias, num_heads, window_size, q_pool, True).contiguous(),
            name="window_attention add_bias", **ATTENTION_FP32_TOL,
        )


def test_window_attention_add_bias_needs_a_bias():
    with pytest.raises(RuntimeError, match="add_bias needs a qkv_bias"):
        EXT.window_attention(torch.randn(1, 4, 4, 24), None, 2, 4, False, True)
    with pytest.raises(ValueError, match="add_bias=True needs a qkv_bias"):
        torch_ops.window_attention(torch.randn(1, 4, 4, 24), None, 2, 4, False, True)


GLOBAL_CASES = [
    (1, 8, 8, 1, 12, False), (2, 13, 7, 3, 7, False), (3, 5, 11, 2, 9, False), (1, 24, 16, 1, 96, False),
    (2, 9, 13, 2, 5, True), (1, 16, 16, 4, 24, True),
]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", GLOBAL_CASES, ids=str)
def test_global_attention_fp32(case, layout):
    batch, height, width, num_heads, head_dim, q_pool = case
    qkv, _ = _attention_inputs(batch, height, width, num_heads, head_dim, layout, False)
    assert_close_verbose(
        EXT.global_attention(qkv, num_heads, q_pool),
        torch_ops.global_attention(qkv, num_heads, q_pool).contiguous(),
        name="global_attention", **ATTENTION_FP32_TOL,
    )


# More keys than one block of the matrix-unit path's running softmax (512), an odd count of them, odd head_dim.
LONG_GLOBAL_CASES = [(1, 23, 27, 2, 8, False), (2, 25, 41, 1, 5, True)]


@pytest.mark.parametrize("dtype,path", LOW_PRECISION_PATHS)
@pytest.mark.parametrize("layout", ["contiguous", "strided_channels"])
@pytest.mark.parametrize("case", GLOBAL_CASES[1:5] + LONG_GLOBAL_CASES, ids=str)
def test_global_attention_low_precision(case, layout, dtype, path):
    batch, height, width, num_heads, head_dim, q_pool = case
    qkv, _ = _attention_inputs(batch, height, width, num_heads, head_dim, layout, False, dtype)
    reference = torch_ops.global_attention(qkv.float(), num_heads, q_pool)
    with attention_path(path):
        ours = EXT.global_attention(qkv, num_heads, q_pool)
    assert ours.dtype == dtype
    emulated = emulated_low_precision_attention(torch_ops.global_attention, qkv, num_heads, q_pool)
    assert_low_precision_attention_error(
        f"global_attention {dtype} {path} {case}", ours, emulated, reference, LOW_PRECISION_ERROR_FLOOR
    )


@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")  # mkldnn.flags sets its TF32 flag too
def test_bf16_attention_path_is_chosen_by_the_cpu():
    # The matrix-unit path is the default exactly where it can run, which needs AVX512-BF16; it steps aside for the
    # fp32 core when switched off or when ATen's oneDNN is disabled, and bf16 attention works either way.
    assert _C.bf16_matrix_attention() == _C.bf16_matrix_units_usable()
    assert not _C.bf16_matrix_units_usable() or torch.cpu._is_avx512_bf16_supported()
    with attention_path("fp32_core"):
        assert not _C.bf16_matrix_attention()
    qkv, bias = _attention_inputs(1, 9, 10, 2, 6, "contiguous", True, torch.bfloat16)
    expected = EXT.window_attention(qkv, bias, 2, 4, False)
    with torch.backends.mkldnn.flags(enabled=False):
        assert not _C.bf16_matrix_attention()
        with attention_path("fp32_core"):
            core = EXT.window_attention(qkv, bias, 2, 4, False)
        assert torch.equal(EXT.window_attention(qkv, bias, 2, 4, False), core)
    assert_low_precision_attention_error(
        "window_attention bf16 default path", expected,
        emulated_low_precision_attention(torch_ops.window_attention, qkv, bias, 2, 4, False),
        torch_ops.window_attention(qkv.float(), bias.float(), 2, 4, False), LOW_PRECISION_ERROR_FLOOR,
    )


def test_attention_rejects_bad_channels():
    with pytest.raises(RuntimeError, match="multiple of 3 \\* num_heads"):
        EXT.window_attention(torch.randn(1, 4, 4, 20), None, 2, 4, False)
    with pytest.raises(RuntimeError, match="qkv_bias"):
        EXT.window_attention(torch.randn(1, 4, 4, 24), torch.randn(12), 2, 4, False)
    # Hiera q-pools only even windows; an odd one would pool each window to fewer rows than H // 2.
    with pytest.raises(RuntimeError, match="even window_size"):
        EXT.window_attention(torch.randn(1, 14, 14, 24), None, 2, 7, True)


# ---------------------------------------------------------------------------------------------------------------
# bias_gelu_

# The kernel's erf is a rational fit within 4.1e-7 of erf when evaluated in fp32 (see csrc/cpu/gemm/bias_gelu.cpp), so its
# GELU is within 0.5 * |x| * 4.1e-7 plus two fp32 rounding steps (2 * 6e-8 relative) of the exact one: checked
# against a float64 GELU, not against torch's fp32 one, which has its own few-ulp error.
GELU_ERF_ERROR = 4.1e-7
GELU_RELATIVE_ROUNDING = 1.2e-7


def assert_gelu_accurate(ours: torch.Tensor, pre_activation: torch.Tensor, name: str) -> None:
    exact = F.gelu(pre_activation.double())
    error = (ours.double() - exact).abs()
    bound = 0.5 * GELU_ERF_ERROR * pre_activation.double().abs() + GELU_RELATIVE_ROUNDING * exact.abs()
    bad = ~(error <= bound)
    assert not bad.any(), (
        f"{name}: {int(bad.sum())} of {error.numel()} values beyond the GELU error bound; worst: x = "
        f"{pre_activation.flatten()[error.flatten().argmax()].item():.6g}, error {error.max().item():.3g}"
    )


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "strided_channels"])
@pytest.mark.parametrize("shape", [(1, 8), (3, 7, 13), (2, 5, 6, 33), (257, 3072)])
def test_bias_gelu_fp32(shape, with_bias, layout):
    generator = torch.Generator().manual_seed(0)
    storage = 4 * torch.randn(*shape[:-1], 2 * shape[-1], generator=generator)
    if layout == "strided_channels":
        x = storage[..., ::2]
    elif layout == "transposed" and len(shape) > 2:
        x = storage[..., : shape[-1]].transpose(0, 1).contiguous().transpose(0, 1)
    else:
        x = storage[..., : shape[-1]].contiguous()
    bias = torch.randn(shape[-1], generator=generator) if with_bias else None
    untouched = storage[..., 1::2].clone()
    pre_activation = x + bias if with_bias else x.clone()
    EXT.bias_gelu_(x, bias)
    assert_gelu_accurate(x, pre_activation, f"bias_gelu_ {shape} {layout}")
    if layout == "strided_channels":  # the values between x's strided channels are left alone
        assert torch.equal(storage[..., 1::2], untouched)


def test_bias_gelu_over_the_whole_range_and_special_values():
    # Every region of the fit, the clamp at |x| = 5.55 (beyond it erf rounds to +-1) and far beyond it.
    x = torch.cat([torch.linspace(-12, 12, 240_001), torch.tensor([5.5507, 5.5508, 5.551, -5.5508, 1e-30, -1e-30])])
    out = x.clone()
    EXT.bias_gelu_(out, None)
    assert_gelu_accurate(out, x, "bias_gelu_ range")



# The special values of gelu(x) = x * Phi(x) itself, bit for bit (the sign of zero included), not those of one CPU's
# ATen: F.gelu's results for them differ between CPUs and vector paths (seen: NaN or inf for +inf, inf or 3.4e38 for
# 3.4e38, +0.0 or -0.0 for -1e30), so they are no reference. A large finite x has Phi(x) = 1 in fp32 (x, never inf);
# a large negative x, and -inf, have Phi(x) = +0 (-0.0, never NaN).
GELU_SPECIAL_VALUES = [
    (float("nan"), float("nan")), (float("inf"), float("inf")), (-float("inf"), -0.0), (0.0, 0.0), (-0.0, -0.0),
    (1e30, 1e30), (-1e30, -0.0), (3.4e38, 3.4e38), (-3.4e38, -0.0), (6.0, 6.0), (-6.0, -0.0), (20.0, 20.0),
    (-20.0, -0.0),
]


@pytest.mark.parametrize("with_bias", [False, True])
def test_bias_gelu_special_values_are_the_functions(with_bias):
    x, expected = (torch.tensor(column, dtype=torch.float32) for column in zip(*GELU_SPECIAL_VALUES))
    # Rows of 13 values: one full 8-lane vector and a partial one, so both the vector body and the tail are checked.
    out = x.repeat(3, 1)
    bias = torch.zeros(x.shape[0]) if with_bias else None  # +0.0 keeps every value, -0.0 included (-0 + 0 = +0)
    if with_bias:
        out[:, x == 0] = 0.0  # x + 0.0 turns -0.0 into +0.0 before the GELU: compare signed zeros without a bias only
        expected = torch.where(x == 0, torch.zeros_like(x), expected)
    EXT.bias_gelu_(out, bias)
    bits_equal = out.view(torch.int32) == expected.repeat(3, 1).view(torch.int32)
    same = bits_equal | (out.isnan() & expected.repeat(3, 1).isnan())
    assert bool(same.all()), (
        f"bias_gelu_ special values: got {out[0].tolist()}, expected {expected.tolist()} (inputs {x.tolist()})"
    )




# ---------------------------------------------------------------------------------------------------------------
# The kernel boundary: every op takes operands of any strides, and names what was wrong with a bad argument

def relayout(values: torch.Tensor, kind: str) -> torch.Tensor:
    """``values`` laid out as ``kind``: a view of new memory holding them (for "broadcast", a view of ``values``
    whose rows all repeat its first one)."""
    if kind == "broadcast":
        # Stride 0 along the rows (the dimension before the last; a 1-D tensor's only one): the layout of an expanded
        # gradient, such as a loss over pooled features hands back.
        dim = max(values.dim() - 2, 0)
        return values.narrow(dim, 0, 1).expand(values.shape)
    if kind == "transposed":  # the last dimension outermost: a matrix's transpose, an NCHW map read as NHWC
        return values.movedim(-1, 0).contiguous().movedim(0, -1)
    if kind == "sliced":  # every other element of a tensor twice as large along every dimension
        storage = values.new_zeros([2 * size for size in values.shape])
        return storage[(slice(None, None, 2),) * values.dim()].copy_(values)
    if kind == "padded":  # gaps between rows, unit stride along the last dimension
        storage = values.new_zeros(*values.shape[:-1], values.shape[-1] + 3)
        return storage[..., : values.shape[-1]].copy_(values)
    if kind == "channels_last":  # torch's channels_last memory format (4-D)
        return values.contiguous(memory_format=torch.channels_last)
    if kind == "size1_strides":  # odd strides on the dimensions of size 1, which are never stepped over
        contiguous = values.contiguous()
        return contiguous.as_strided(values.shape, [7 if size == 1 else stride
                                                    for size, stride in zip(values.shape, contiguous.stride())])
    raise ValueError(kind)


def layout_kinds(dims: int) -> tuple:
    """The layouts of relayout that differ from the contiguous one for a tensor of ``dims`` dimensions."""
    if dims == 1:
        return ("broadcast", "sliced")
    return ("broadcast", "transposed", "sliced", "padded", "size1_strides") + (("channels_last",) if dims == 4 else ())


@contextlib.contextmanager
def num_threads(count: int):
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def randn(generator: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=generator).to(dtype)


@dataclasses.dataclass(frozen=True)
class BoundaryCase:
    """One op on small operands: make(batch, generator) gives its tensor arguments (contiguous, by name) and
    run(args) its outputs. Without ``truth`` the kernel only normalises layouts, and its outputs for any operand
    layout must be bit-identical to those for the contiguous copies; with it, truth(args) gives float64 outputs the
    kernel must be within ``atol`` of (its rounding may depend on the layout: ATen's attention picks its kernel by
    strides; brgemm's blocking by leading dimension, the partial sums by thread count)."""

    id: str
    op: str
    make: Callable
    run: Callable
    truth: Optional[Callable] = None
    atol: float = 0.0
    marks: tuple = ()


def _qkv_case_args(batch, generator, height, width, dtype=torch.float32, with_bias=True):
    args = {"qkv": randn(generator, batch, height, width, 30, dtype=dtype)}  # 2 heads of head_dim 5
    if with_bias:
        args["qkv_bias"] = randn(generator, 30, dtype=dtype)
    return args


def _matrix_units(run):
    def on_matrix_units(args):
        with attention_path("matrix_units"):
            return run(args)
    return on_matrix_units


NEEDS_BRGEMM = (pytest.mark.skipif(not brgemm_f32_usable(), reason="needs ATen's fp32 brgemm with oneDNN enabled in "
                                   "torch (see csrc/common/brgemm_f32.h)"),)

BOUNDARY_CASES = [
    BoundaryCase("maxpool2x2", "maxpool2x2",
                 lambda b, g: {"x": randn(g, b, 7, 10, 5)},
                 lambda a: (EXT.maxpool2x2(a["x"]),)),
    BoundaryCase("maxpool2x2_backward", "maxpool2x2_backward",
                 lambda b, g: {"grad_out": randn(g, b, 3, 5, 5), "x": randn(g, b, 7, 10, 5)},
                 lambda a: (EXT.maxpool2x2_backward(a["grad_out"], a["x"]),)),
    BoundaryCase("fpn_upsample_add", "fpn_upsample_add",
                 lambda b, g: {"lateral": randn(g, b, 5, 6, 8, dtype=torch.bfloat16), "prev": randn(g, b, 5, 3, 4)},
                 lambda a: (EXT.fpn_upsample_add(a["lateral"], a["prev"]),)),
    BoundaryCase("bias_gelu_", "bias_gelu_",
                 lambda b, g: {"x": randn(g, b, 3, 13), "bias": randn(g, 13)},
                 lambda a: (EXT.bias_gelu_(a["x"], a["bias"]), a["x"])[1:]),
    BoundaryCase("window_attention-fp32", "window_attention",
                 lambda b, g: _qkv_case_args(b, g, 9, 6),
                 lambda a: (EXT.window_attention(a["qkv"], a["qkv_bias"], 2, 4, True, True),)),
    BoundaryCase("window_attention-bf16", "window_attention",
                 lambda b, g: _qkv_case_args(b, g, 9, 6, torch.bfloat16),
                 lambda a: (EXT.window_attention(a["qkv"], a["qkv_bias"], 2, 4, False),)),
    BoundaryCase("global_attention-fp32", "global_attention",
                 lambda b, g: _qkv_case_args(b, g, 5, 6, with_bias=False),
                 lambda a: (EXT.global_attention(a["qkv"], 2, True),),
                 truth=lambda a: (torch_ops.global_attention(a["qkv"].double(), 2, True),),
                 atol=ATTENTION_FP32_TOL["atol"]),
    BoundaryCase("global_attention-bf16-matrix_units", "global_attention",
                 lambda b, g: _qkv_case_args(b, g, 5, 7, torch.bfloat16, with_bias=False),
                 _matrix_units(lambda a: (EXT.global_attention(a["qkv"], 2, False),)),
                 marks=MATRIX_UNITS.marks),
    BoundaryCase("attention_backward-window", "attention_backward",
                 lambda b, g: {"grad_out": randn(g, b, 4, 3, 10), **_qkv_case_args(b, g, 9, 6),
                               "out": randn(g, b, 4, 3, 10)},
                 lambda a: EXT.attention_backward(a["grad_out"], a["qkv"], a["qkv_bias"], a["out"], 2, 4, True, True)),
    BoundaryCase("attention_backward-global", "attention_backward",
                 lambda b, g: {"grad_out": randn(g, b, 5, 6, 10), **_qkv_case_args(b, g, 5, 6),
                               "out": randn(g, b, 5, 6, 10)},
                 lambda a: EXT.attention_backward(a["grad_out"], a["qkv"], a["qkv_bias"], a["out"], 2, 0, False, True)),
    # The GEMMs on the rows of `batch` maps of 5 x 7 tokens: fp32 sums of 40 O(1) products (linear) or of up to 70
    # (the weight's gradient), in chains of at most 128: within fp32 rounding of the largest partial sums.
    BoundaryCase("linear", "linear",
                 lambda b, g: {"input": randn(g, 35 * b, 40), "weight": randn(g, 30, 40), "bias": randn(g, 30)},
                 lambda a: (EXT.linear(a["input"], a["weight"], a["bias"]),),
                 truth=lambda a: (a["input"].double() @ a["weight"].double().t() + a["bias"].double(),),
                 atol=2e-5 * 40 ** 0.5, marks=NEEDS_BRGEMM),
    BoundaryCase("linear_weight_grad", "linear_weight_grad",
                 lambda b, g: {"grad": randn(g, 35 * b, 30), "input": randn(g, 35 * b, 40)},
                 lambda a: EXT.linear_weight_grad(a["grad"], a["input"], True),
                 truth=lambda a: (a["grad"].double().t() @ a["input"].double(), a["grad"].double().sum(0)),
                 atol=2e-5 * 70 ** 0.5, marks=NEEDS_BRGEMM),
]


def _boundary_params():
    params = []
    for case in BOUNDARY_CASES:
        for arg, values in case.make(1, torch.Generator().manual_seed(0)).items():
            params += [pytest.param(case, arg, kind, id=f"{case.id}-{arg}-{kind}", marks=case.marks)
                       for kind in layout_kinds(values.dim())]
    return params


_BITS = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    assert_close_verbose(actual, expected, name=name)  # shape, dtype, and a report of the values that differ
    same_bits = actual.contiguous().view(_BITS[actual.dtype]) == expected.contiguous().view(_BITS[expected.dtype])
    assert bool(same_bits.all()), f"{name}: {int((~same_bits).sum())} values equal but with other bits (signed zeros)"


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("case,arg,kind", _boundary_params())
def test_any_operand_layout_gives_the_contiguous_result(case, arg, kind, batch, threads):
    args = case.make(batch, torch.Generator().manual_seed(batch))
    args[arg] = relayout(args[arg], kind)
    contiguous = {name: t.clone(memory_format=torch.contiguous_format) for name, t in args.items()}
    if case.op == "bias_gelu_" and arg == "x" and kind == "broadcast":
        # Elements of an expanded x share memory: an in-place op cannot write them, and says so.
        with pytest.raises(RuntimeError, match="bias_gelu_: x has elements that share memory"):
            case.run(args)
        return
    storage = args[arg]._base
    storage_before = None if storage is None else storage.clone()
    with num_threads(threads):
        actual = case.run(args)
        expected = case.run(contiguous) if case.truth is None else case.truth(contiguous)
    name = f"{case.id} with {kind} {arg}, batch {batch}, {threads} threads"
    for index, (ours, wanted) in enumerate(zip(actual, expected, strict=True)):
        if case.truth is None:
            assert_bitwise_equal(ours, wanted, f"{name}: output {index}")
        else:
            assert_close_verbose(ours, wanted.to(ours.dtype), atol=case.atol, name=f"{name}: output {index}")
    if storage is not None and case.op == "bias_gelu_" and arg == "x":
        # Written into x itself, and nowhere else in the memory x is a view of.
        storage_before.as_strided(args["x"].shape, args["x"].stride(), args["x"].storage_offset()).copy_(actual[0])
        assert actual[0] is args["x"] and torch.equal(storage, storage_before)


def test_the_boundary_cases_cover_every_op_with_tensor_arguments():
    registered = {name.split("::")[1] for name in torch._C._dispatch_get_all_op_names()
                  if name.startswith("sam2_fast_ext::")}
    assert {case.op for case in BOUNDARY_CASES} == registered - {"sine_position_encoding"}


def _int_map(*shape):
    return torch.zeros(*shape, dtype=torch.int32)


QKV_DTYPES = "Float, BFloat16, Half or Double"
BAD_ARGUMENTS = [
    (lambda: EXT.window_attention(_int_map(1, 4, 4, 24), None, 2, 4, False),
     rf"window_attention: expected qkv of dtype {QKV_DTYPES}, got Int"),
    (lambda: EXT.window_attention(torch.randn(4, 4, 24), None, 2, 4, False),
     r"window_attention: expected qkv of shape \(B, H, W, 3 \* dim\), got \[4, 4, 24\]"),
    (lambda: EXT.window_attention(torch.randn(1, 4, 4, 24), torch.randn(12), 2, 4, False),
     r"window_attention: expected qkv_bias of shape \[24\], got \[12\]"),
    (lambda: EXT.window_attention(torch.randn(1, 4, 4, 24), torch.zeros(24, dtype=torch.long), 2, 4, False),
     rf"window_attention: expected qkv_bias of dtype {QKV_DTYPES}, got Long"),
    (lambda: EXT.global_attention(_int_map(1, 4, 4, 24), 2, False),
     rf"global_attention: expected qkv of dtype {QKV_DTYPES}, got Int"),
    (lambda: EXT.attention_backward(torch.randn(1, 4, 4, 10), torch.randn(1, 4, 4, 30), torch.randn(29),
                                    torch.randn(1, 4, 4, 10), 2, 4, False, True),
     r"attention_backward: expected qkv_bias of shape \[30\], got \[29\]"),
    (lambda: EXT.attention_backward(torch.randn(1, 4, 4, 10), torch.randn(1, 4, 4, 30), _int_map(30),
                                    torch.randn(1, 4, 4, 10), 2, 4, False, True),
     rf"attention_backward: expected qkv_bias of dtype {QKV_DTYPES}, got Int"),
    (lambda: EXT.attention_backward(torch.randn(1, 4, 4, 9), torch.randn(1, 4, 4, 30), None,
                                    torch.randn(1, 4, 4, 10), 2, 4, False, False),
     r"attention_backward: expected grad_out of shape \[1, 4, 4, 10\], got \[1, 4, 4, 9\]"),
    (lambda: EXT.attention_backward(torch.randn(1, 4, 4, 10), torch.randn(1, 4, 4, 30), None,
                                    torch.randn(1, 4, 4, 10, dtype=torch.float64), 2, 4, False, False),
     r"attention_backward: expected out of dtype Float, got Double"),
    (lambda: EXT.maxpool2x2(torch.randn(4, 4, 3)), r"maxpool2x2: expected x of shape \(B, H, W, C\), got \[4, 4, 3\]"),
    (lambda: EXT.maxpool2x2(_int_map(1, 4, 4, 3)), rf"maxpool2x2: expected x of dtype {QKV_DTYPES}, got Int"),
    (lambda: EXT.maxpool2x2_backward(torch.randn(1, 2, 3, 3), torch.randn(1, 4, 4, 3)),
     r"maxpool2x2_backward: expected grad_out of shape \[1, 2, 2, 3\], got \[1, 2, 3, 3\]"),
    (lambda: EXT.maxpool2x2_backward(torch.randn(1, 2, 2, 3).half(), torch.randn(1, 4, 4, 3)),
     r"maxpool2x2_backward: expected grad_out of dtype Float, got Half"),
    (lambda: EXT.fpn_upsample_add(torch.randn(1, 3, 8, 9), torch.randn(1, 3, 4, 5)),
     r"fpn_upsample_add: expected lateral of shape \[1, 3, 8, 10\], got \[1, 3, 8, 9\]"),
    (lambda: EXT.fpn_upsample_add(torch.randn(1, 3, 8, 10), _int_map(1, 3, 4, 5)),
     rf"fpn_upsample_add: expected prev of dtype {QKV_DTYPES}, got Int"),
    (lambda: EXT.bias_gelu_(torch.randn(2, 8, dtype=torch.bfloat16), None),
     r"bias_gelu_: expected x of dtype Float, got BFloat16"),
    (lambda: EXT.bias_gelu_(torch.tensor(1.0), None), r"bias_gelu_: expected x of shape \(\.\.\., C\), got a scalar"),
    (lambda: EXT.bias_gelu_(torch.randn(2, 8), torch.randn(7)), r"bias_gelu_: expected bias of shape \[8\], got \[7\]"),
    (lambda: EXT.bias_gelu_(torch.randn(2, 8), torch.randn(8, dtype=torch.float64)),
     r"bias_gelu_: expected bias of dtype Float, got Double"),
    (lambda: EXT.bias_gelu_(torch.randn(1, 8).expand(3, 8), None),
     r"bias_gelu_: x has elements that share memory \(an expanded tensor, strides \[0, 1\]\)"),
]


@pytest.mark.parametrize("call,message", [pytest.param(*bad, id=bad[1].split(":")[0] + f"-{index}")
                                          for index, bad in enumerate(BAD_ARGUMENTS)])
def test_bad_arguments_are_named(call, message):
    with pytest.raises(RuntimeError, match=message):
        call()


@pytest.mark.gpu
@pytest.mark.skipif("cuda" not in _extension.device_types(), reason="the extension is built without CUDA kernels")
def test_cuda_kernels_name_an_argument_on_another_device():
    lateral = torch.randn(1, 3, 4, 4, device="cuda")
    with pytest.raises(RuntimeError, match=r"expected prev on the device of lateral \(cuda:0\), got cpu"):
        EXT.fpn_upsample_add(lateral, torch.randn(1, 3, 2, 2))


def test_capped_aten_runs_what_an_avx2_cpu_runs(tmp_path):
    # Capped to AVX2 (ATEN_CPU_CAPABILITY=avx2, and oneDNN alike) an AVX-512 CPU runs what an AVX2 CPU runs: the bf16
    # matrix-unit attention (its row kernels are AVX-512) steps aside for the fp32 core, whose output is then the
    # uncapped fp32 core's bit for bit. ATen's fp32 brgemm stays usable: oneDNN runs its micro-kernels on AVX2 (and
    # ATen its BLAS gemm below AVX2), so linear stays within fp32 rounding of float64.
    generator = torch.Generator().manual_seed(5)
    qkv, bias = randn(generator, 1, 9, 10, 30, dtype=torch.bfloat16), randn(generator, 30, dtype=torch.bfloat16)
    rows, weight = randn(generator, 70, 40), randn(generator, 30, 40)
    torch.save({"qkv": qkv, "bias": bias, "rows": rows, "weight": weight}, tmp_path / "inputs.pt")
    code = (
        "import sys, torch\n"
        "from sam2_fast import _C\n"
        "ops = torch.ops.sam2_fast_ext\n"
        f"inputs = torch.load({str(tmp_path / 'inputs.pt')!r})\n"
        "results = {'flags': (torch.backends.cpu.get_cpu_capability(), _C.bf16_matrix_units_usable(), "
        "_C.bf16_matrix_attention(), _C.brgemm_f32_usable()), "
        "'attention': ops.window_attention(inputs['qkv'], inputs['bias'], 2, 4, True)}\n"
        "if _C.brgemm_f32_usable():\n"
        "    results['linear'] = ops.linear(inputs['rows'], inputs['weight'], None)\n"
        f"torch.save(results, {str(tmp_path / 'results.pt')!r})\n"
    )
    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    results = torch.load(tmp_path / "results.pt")
    capability, units, matrix_attention, brgemm = results["flags"]
    assert capability in ("AVX2", "DEFAULT")  # DEFAULT: a CPU without AVX2
    assert not units and not matrix_attention
    assert brgemm == _C.brgemm_f32_usable()
    with attention_path("fp32_core"):
        assert_bitwise_equal(results["attention"], EXT.window_attention(qkv, bias, 2, 4, True), "capped attention")
    if brgemm:
        # fp32 sums of 40 O(1) products, in one chain: within fp32 rounding of the largest partial sums.
        assert_close_verbose(results["linear"], (rows.double() @ weight.double().t()).float(), atol=2e-5 * 40 ** 0.5,
                             name="capped linear")


# ---------------------------------------------------------------------------------------------------------------
# opcheck: schema, fake implementation, autograd registration and dynamic-shape tracing of every op

def _opcheck_samples():
    bias = torch.randn(3 * 2 * 5)
    return [
        pytest.param(EXT.maxpool2x2, (channels_last_map(2, 7, 6, 5, "cpu", "hw_transposed"),), id="maxpool2x2"),
        pytest.param(EXT.fpn_upsample_add, _fpn_inputs(2, 3, 4, 5, "cpu", torch.bfloat16, torch.float32, True),
                     id="fpn_upsample_add"),
        pytest.param(EXT.sine_position_encoding, (5, 7, 8, 10000.0, True, 2 * math.pi, torch.device("cpu")),
                     id="sine_position_encoding"),
        pytest.param(EXT.window_attention, (torch.randn(2, 9, 6, 30), bias, 2, 4, False), id="window_attention"),
        pytest.param(EXT.window_attention, (torch.randn(1, 9, 10, 30), None, 2, 4, True), id="window_attention_q_pool"),
        pytest.param(EXT.window_attention, (torch.randn(1, 9, 10, 30), bias, 2, 4, True, True),
                     id="window_attention_add_bias"),
        pytest.param(EXT.bias_gelu_, (torch.randn(2, 5, 13), torch.randn(13)), id="bias_gelu_"),
        pytest.param(EXT.global_attention, (torch.randn(2, 5, 6, 30), 2, False), id="global_attention"),
        pytest.param(EXT.global_attention, (torch.randn(1, 7, 6, 30), 2, True), id="global_attention_q_pool"),
    ]


@pytest.mark.parametrize("op,args", _opcheck_samples())
def test_opcheck(op, args):
    torch.library.opcheck(op, args)


def test_every_op_has_a_cpu_kernel_and_opcheck_sample():
    ids = {sample.id.removesuffix("_q_pool").removesuffix("_add_bias") for sample in _opcheck_samples()}
    assert ids == {spec.name for spec in specs.OP_SPECS if spec.extension} == set(ops.OPS)
    for name in ops.OPS:
        assert "cpu" in _extension.kernel_device_types(name), name


def test_export_traces_through_the_fakes():
    class Neck(torch.nn.Module):
        def forward(self, lateral, prev):
            fused = torch.ops.sam2_fast_ext.fpn_upsample_add(lateral, prev)
            pos = torch.ops.sam2_fast_ext.sine_position_encoding(
                fused.shape[2], fused.shape[3], 4, 10000.0, True, 2 * math.pi, torch.device("cpu"))
            return torch.ops.sam2_fast_ext.maxpool2x2(fused.permute(0, 2, 3, 1)), pos

    lateral, prev = _fpn_inputs(1, 3, 4, 6, "cpu", torch.float32, torch.float32, False)
    exported = torch.export.export(Neck(), (lateral, prev))
    for actual, expected in zip(exported.module()(lateral, prev), Neck()(lateral, prev)):
        assert_close_verbose(actual, expected, name="exported")


# ---------------------------------------------------------------------------------------------------------------
# Through the op layer

def test_extension_kernels_are_known_per_device(monkeypatch):
    # The dispatcher says which device kernels were registered: this build has CPU kernels for every op.
    for op in ops.OPS:
        assert _extension.kernel_device_types(op) == dispatch._EXTENSION_KERNEL_DEVICES[op] == ("cpu",), op
    # A CUDA build has no CUDA attention kernels (Triton's job): under an explicit "extension" those ops run on
    # torch, the ones it has run on the extension, and the backend still runs the whole encoder.
    monkeypatch.setattr(dispatch, "_EXTENSION_DEVICES", ("cpu", "cuda"))
    monkeypatch.setattr(dispatch, "_EXTENSION_KERNEL_DEVICES",
                        {op: ("cpu",) if op.endswith("attention") else ("cpu", "cuda") for op in ops.OPS})
    with sam2_fast.use_backend("extension"):
        assert ops.resolve_backend("window_attention", "cuda") == "torch"
        assert ops.resolve_backend("maxpool2x2", "cuda") == "extension"
        assert ops.resolve_backend("window_attention", "cpu") == "extension"
    assert ops.backend_status("cuda")["extension"]["global_attention"] == "the C++ extension has no cuda kernel for global_attention"
    assert ops.runs_whole_encoder("extension", "cuda")


def test_cpu_only_build_cannot_run_on_cuda(monkeypatch):
    monkeypatch.setattr(dispatch, "_EXTENSION_DEVICES", ("cpu",))
    with sam2_fast.use_backend("extension"), pytest.raises(sam2_fast.BackendUnavailableError,
                                                           match="built for cpu, not cuda"):
        ops.resolve_backend("maxpool2x2", "cuda")
    assert not ops.runs_whole_encoder("extension", "cuda")


def test_op_layer_runs_the_extension():
    with sam2_fast.use_backend("extension"):
        assert set(ops.active_backends("cpu").values()) == {"extension"}
        qkv = channels_last_map(2, 11, 9, 3 * 2 * 9, "cpu", "hw_transposed")
        bias = torch.randn(3 * 2 * 9)
        assert_close_verbose(ops.window_attention(qkv, bias, 2, 8, True),
                             torch_ops.window_attention(qkv, bias, 2, 8, True).contiguous(),
                             name="ops.window_attention", **ATTENTION_FP32_TOL)
        assert_close_verbose(ops.global_attention(qkv, 2, False),
                             torch_ops.global_attention(qkv, 2, False).contiguous(),
                             name="ops.global_attention", **ATTENTION_FP32_TOL)
        x = channels_last_map(3, 9, 14, 11, "cpu", "strided_channels")
        assert_close_verbose(ops.maxpool2x2(x), torch_ops.maxpool2x2(x).contiguous(), name="ops.maxpool2x2")
        lateral, prev = _fpn_inputs(2, 5, 3, 4, "cpu", torch.bfloat16, torch.bfloat16, True)
        assert_close_verbose(ops.fpn_upsample_add(lateral, prev), torch_ops.fpn_upsample_add(lateral, prev),
                             name="ops.fpn_upsample_add")
        x = torch.randn(3, 7, 29)
        bias = torch.randn(29)
        expected = torch_ops.bias_gelu_(x.clone(), bias)
        out = ops.bias_gelu_(x, bias)
        assert out is x
        assert_close_verbose(out, expected, atol=1e-5, name="ops.bias_gelu_")
        args = (12, 20, 64, 10000.0, True, 2 * math.pi, "cpu")
        assert_close_verbose(ops.sine_position_encoding(*args),
                             torch_ops.sine_position_encoding(*args[:-1], torch.device("cpu")),
                             name="ops.sine_position_encoding")


@pytest.mark.parametrize("backend", ["torch", "extension"])
def test_op_layer_bias_gelu_refuses_tensors_that_need_gradients(backend):
    with sam2_fast.use_backend(backend), pytest.raises(ValueError, match="has no backward"):
        ops.bias_gelu_(torch.randn(2, 5), torch.randn(5, requires_grad=True))


@pytest.mark.parametrize("add_bias", [False, True])
def test_op_layer_gradients_flow_through_the_extension(add_bias):
    qkv = torch.randn(1, 9, 6, 3 * 2 * 5, requires_grad=True)
    bias = torch.randn(3 * 2 * 5, requires_grad=True)
    with sam2_fast.use_backend("extension"):
        ops.window_attention(qkv, bias, 2, 4, False, add_bias).sum().backward()
    expected_qkv, expected_bias = torch.autograd.grad(
        torch_ops.window_attention(qkv, bias, 2, 4, False, add_bias).sum(), [qkv, bias])
    assert_close_verbose(qkv.grad, expected_qkv, atol=1e-5, rtol=1e-5, name="qkv.grad")
    assert_close_verbose(bias.grad, expected_bias, atol=1e-5, rtol=1e-5, name="qkv_bias.grad")


@pytest.mark.parametrize("backend", ["torch", "extension"])
def test_op_layer_add_bias_on_every_cpu_backend(backend):
    qkv = channels_last_map(2, 11, 9, 3 * 2 * 9, "cpu", "hw_transposed")
    bias = torch.randn(3 * 2 * 9)
    with sam2_fast.use_backend(backend):
        assert ops.window_attention_adds_bias("cpu") == (backend == "extension")
        assert_close_verbose(ops.window_attention(qkv, bias, 2, 8, True, add_bias=True),
                             torch_ops.window_attention(qkv + bias, bias, 2, 8, True).contiguous(),
                             name=f"ops.window_attention add_bias ({backend})", **ATTENTION_FP32_TOL)


@pytest.mark.parametrize("autocast", [False, True])
def test_windowed_block_hands_the_qkv_bias_to_the_extension_in_fp32_only(monkeypatch, autocast):
    # fp32: the qkv GEMM leaves out its bias and the attention op adds it. Under bf16 autocast the GEMM's output is
    # rounded to bf16, so adding the bias afterwards would round twice: the GEMM keeps it.
    from sam2_fast.model.hiera import MultiScaleAttention

    calls = []
    window_attention = ops.window_attention

    def spy(qkv, qkv_bias, num_heads, window_size, q_pool, add_bias=False):
        calls.append(add_bias)
        return window_attention(qkv, qkv_bias, num_heads, window_size, q_pool, add_bias)

    monkeypatch.setattr(ops, "window_attention", spy)
    attention = MultiScaleAttention(24, 24, num_heads=2).eval()
    x = torch.randn(1, 9, 10, 24)
    with sam2_fast.use_backend("extension"), torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        out = attention(x, window_size=4)
        expected_qkv = F.linear(x, attention.qkv.weight, attention.qkv.bias)
        expected = F.linear(torch_ops.window_attention(expected_qkv, attention.qkv.bias, 2, 4, False),
                            attention.proj.weight, attention.proj.bias)
    assert calls == [not autocast]
    if not autocast:
        assert_close_verbose(out, expected, name="windowed attention block", **ATTENTION_FP32_TOL)


class _WindowAttention(torch.nn.Module):
    def forward(self, qkv, bias):
        return ops.window_attention(qkv, bias, 2, 4, True)


def test_the_model_calls_the_extension_ops_themselves_with_their_autograd(monkeypatch):
    # Eager, traced and differentiated calls all go to the sam2_fast_ext ops (their fakes and autograd formulas are
    # registered in Python), never to the opaque custom op: an exported graph then holds the compiled ops.
    def custom_op(*args):
        raise AssertionError("custom op called")

    monkeypatch.setitem(registry._CUSTOM_OPS, "window_attention", custom_op)
    qkv = torch.randn(1, 9, 6, 3 * 2 * 5, requires_grad=True)
    bias = torch.nn.Parameter(torch.randn(3 * 2 * 5))  # as the model passes its qkv bias
    grad_out = torch.randn(1, 4, 3, 2 * 5)
    expected = torch_ops.window_attention(qkv, bias, 2, 4, True)
    expected_grads = torch.autograd.grad(expected, (qkv, bias), grad_out)
    with sam2_fast.use_backend("extension"):
        with torch.no_grad():
            assert_close_verbose(ops.window_attention(qkv, bias, 2, 4, True), expected.detach().contiguous(),
                                 name="eager window_attention", **ATTENTION_FP32_TOL)
        actual = ops.window_attention(qkv, bias, 2, 4, True)
        assert actual.grad_fn is not None
        for name, grad, wanted in zip(("qkv", "bias"), torch.autograd.grad(actual, (qkv, bias), grad_out),
                                      expected_grads):
            assert_close_verbose(grad, wanted, name=f"grad {name}", **ATTENTION_FP32_TOL)
        graph = torch.export.export(_WindowAttention(), (qkv.detach(), bias.detach())).graph
    targets = {str(node.target) for node in graph.nodes if node.op == "call_function"}
    assert "sam2_fast_ext.window_attention.default" in targets, targets