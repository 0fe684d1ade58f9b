"""Every Triton launcher, forward and backward, on operands in the layouts users' code hands it, against the same
launcher on contiguous copies of them: gradients that arrive broadcast (stride 0, from a sum or a mean over dims),
transposed views (a (B, H, W, C) view of a (B, C, H, W) map), strided slices, channels-last maps, size-1 dims with
arbitrary strides. A layout changes which addresses a kernel reads, not the values nor the order it computes in,
so the results agree bit for bit.

Runs on CUDA, or on CPU under the Triton interpreter in its own process:
``TRITON_INTERPRET=1 python -m pytest -q tests/test_triton_operand_layouts.py -m interpreter``. Tiny shapes, each
with a size-1 map dim, so that the size-1 case is there at batch 2 too.
"""

from typing import Sequence

import pytest
import torch

from helpers import assert_close_verbose, triton_test_device

pytestmark = pytest.mark.interpreter
DEVICE, ON_GPU = triton_test_device()

from sam2_fast.kernels.attention_backward import attention_backward  # noqa: E402
from sam2_fast.kernels.fpn_upsample_add import fpn_upsample_add  # noqa: E402
from sam2_fast.kernels.fpn_upsample_add_backward import fpn_upsample_add_backward  # noqa: E402
from sam2_fast.kernels.global_attention import global_attention  # noqa: E402
from sam2_fast.kernels.maxpool2x2 import maxpool2x2  # noqa: E402
from sam2_fast.kernels.maxpool2x2_backward import maxpool2x2_backward  # noqa: E402
from sam2_fast.kernels.window_attention import window_attention  # noqa: E402

LAYOUTS = ("expanded", "expanded_scalar", "permuted", "transposed", "channels_last", "sliced", "size_one_strides")
BATCHES = (1, 2)
# An arbitrary stride for size-1 dims: one a kernel would get wrong if it multiplied it by anything but 0.
SIZE_ONE_STRIDE = 4099
# Exact everywhere but one place: on a GPU the padding keys' qkv-bias gradients meet in fp32 atomic adds, whose
# order varies from run to run (a few fp32 ulps of the sum); the interpreter runs programs in order.
GRAD_BIAS_TOLERANCE = 1e-5 if ON_GPU else 0.0


def _operand(shape: Sequence[int], dtype: torch.dtype, layout: str, generator: torch.Generator) -> torch.Tensor:
    """Random values of ``shape`` in ``layout``:
    - expanded: drawn with dims 0 and 2 of size 1, expanded to ``shape`` (stride 0), as the gradient of a mean over
      those dims arrives;
    - expanded_scalar: one value expanded to every element (every stride 0), as the gradient of a sum arrives;
    - permuted: the last dim stored right after the first (a (B, H, W, C) view of a (B, C, H, W) map; for an NCHW
      operand, W stored before C, H);
    - transposed: dims 1 and 2 swapped in memory;
    - channels_last: torch.channels_last (dim 1 innermost);
    - sliced: every other index of each dim but the last (of the only dim of a 1-D operand), offset by one, of a
      NaN-filled tensor, so that any read outside the view shows;
    - size_one_strides: contiguous, but with an arbitrary stride on every size-1 dim.
    1-D operands are contiguous in the layouts that reorder dims.
    """
    rank = len(shape)

    def draw(drawn_shape):
        return torch.randn(tuple(drawn_shape), generator=generator).to(dtype=dtype, device=DEVICE)

    if layout == "expanded":
        return draw([1 if dim in (0, 2) else size for dim, size in enumerate(shape)]).expand(*shape)
    if layout == "expanded_scalar":
        return draw(()).expand(*shape)
    if layout == "permuted" and rank >= 3:
        stored = (0, rank - 1, *range(1, rank - 1))
        return draw([shape[dim] for dim in stored]).permute(*[stored.index(dim) for dim in range(rank)])
    if layout == "transposed" and rank >= 3:
        return draw([shape[0], shape[2], shape[1], *shape[3:]]).transpose(1, 2)
    if layout == "channels_last" and rank == 4:
        return draw(shape).contiguous(memory_format=torch.channels_last)
    if layout == "sliced":
        steps = [2] * (rank - 1) + [1] if rank > 1 else [2]
        storage = torch.full([1 + step * size for step, size in zip(steps, shape)], float("nan"), dtype=dtype,
                             device=DEVICE)
        view = storage[tuple(slice(1, 1 + step * size, step) for step, size in zip(steps, shape))]
        view.copy_(draw(shape))
        return view
    if layout == "size_one_strides":
        values = draw(shape)
        return values.as_strided(shape, [SIZE_ONE_STRIDE if size == 1 else stride
                                         for size, stride in zip(shape, values.stride())])
    return draw(shape)


def _contiguous(*tensors):
    return [None if tensor is None else tensor.contiguous() for tensor in tensors]


def _assert_same(actual: torch.Tensor, expected: torch.Tensor, name: str, tolerance: float = 0.0) -> None:
    """Bit for bit, or within ``tolerance`` times the largest magnitude of ``expected``."""
    assert_close_verbose(actual, expected, atol=tolerance * expected.abs().max().item(), name=name)


# ----------------------------------------------------------------------------------------------------------------
# Attention: qkv (B, H, W, 3 * dim) with heads of dim 6, its bias (3 * dim,), the output and its gradient. fp32:
# the interpreter computes every dtype's products in fp32 anyway, and the layout code does not depend on it.

# (label, map (H, W), heads, window_size (0: global attention), q_pool, with_bias, add_bias); few heads and
# windows, because the interpreter takes a while per program.
ATTENTION_CASES = [
    ("window4_h1_bias", (1, 7), 2, 4, False, True, False),
    ("window4_qpool_add_bias", (3, 6), 1, 4, True, True, True),
    ("global_h1", (1, 6), 1, 0, False, False, False),
]
HEAD_DIM = 6


def _attention_operands(batch, case, layout, seed):
    _, (height, width), heads, window_size, q_pool, with_bias, _ = case
    dim = heads * HEAD_DIM
    generator = torch.Generator().manual_seed(seed)
    qkv = _operand((batch, height, width, 3 * dim), torch.float32, layout, generator)
    bias = _operand((3 * dim,), torch.float32, layout, generator) if with_bias else None
    out_shape = (batch, height // 2, width // 2, dim) if q_pool else (batch, height, width, dim)
    return qkv, bias, out_shape, generator


def _attention(qkv, bias, case):
    _, _, heads, window_size, q_pool, _, add_bias = case
    if window_size:
        return window_attention(qkv, bias, heads, window_size, q_pool, add_bias)
    return global_attention(qkv, heads, q_pool)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda case: case[0])
def test_attention_layouts(case, batch, layout):
    qkv, bias, _, _ = _attention_operands(batch, case, layout, seed=batch)
    _assert_same(_attention(qkv, bias, case), _attention(*_contiguous(qkv, bias), case), f"{case[0]} {layout}")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda case: case[0])
def test_attention_backward_layouts(case, batch, layout):
    label, _, heads, window_size, q_pool, _, add_bias = case
    qkv, bias, out_shape, generator = _attention_operands(batch, case, layout, seed=10 + batch)
    # The kernels take any output and gradient: no need for them to come from a forward here. The output takes the
    # next layout, so that a kernel reading one with the other's strides shows.
    grad_out = _operand(out_shape, torch.float32, layout, generator)
    out = _operand(out_shape, torch.float32, LAYOUTS[(LAYOUTS.index(layout) + 1) % len(LAYOUTS)], generator)

    def backward(grad_out, qkv, bias, out):
        return attention_backward(grad_out, qkv, bias, out, heads, window_size, q_pool, add_bias)

    grad_qkv, grad_bias = backward(grad_out, qkv, bias, out)
    expected_qkv, expected_bias = backward(*_contiguous(grad_out, qkv, bias, out))
    _assert_same(grad_qkv, expected_qkv, f"{label} {layout}: grad qkv")
    if bias is None:
        assert grad_bias.shape == expected_bias.shape == (0,)
    else:
        _assert_same(grad_bias, expected_bias, f"{label} {layout}: grad qkv_bias", GRAD_BIAS_TOLERANCE)


# ----------------------------------------------------------------------------------------------------------------
# Max-pool: a channels-last (B, H, W, C) map and the gradient of its pooled output.

# (H, W, C): a size-1 channel dim, and an odd map with a few channels.
POOL_SHAPES = [(4, 6, 1), (5, 7, 3)]
DTYPES = (torch.float32, torch.bfloat16)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_maxpool2x2_layouts(dtype, batch, layout):
    generator = torch.Generator().manual_seed(20 + batch)
    for height, width, channels in POOL_SHAPES:
        x = _operand((batch, height, width, channels), dtype, layout, generator)
        _assert_same(maxpool2x2(x), maxpool2x2(x.contiguous()), f"maxpool2x2 {tuple(x.shape)} {layout}")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_maxpool2x2_backward_layouts(dtype, batch, layout):
    generator = torch.Generator().manual_seed(30 + batch)
    for height, width, channels in POOL_SHAPES:
        x = _operand((batch, height, width, channels), dtype, layout, generator)
        grad_out = _operand((batch, height // 2, width // 2, channels), dtype, layout, generator)
        _assert_same(maxpool2x2_backward(grad_out, x), maxpool2x2_backward(*_contiguous(grad_out, x)),
                     f"maxpool2x2_backward {tuple(x.shape)} {layout}")


# ----------------------------------------------------------------------------------------------------------------
# FPN fusion: lateral (B, C, 2h, 2w) and prev (B, C, h, w) in the neck's dtypes, and the fp32 output's gradient.

# (C, h, w): a map one row high, and one of a few rows and channels.
FPN_SHAPES = [(3, 1, 5), (5, 3, 4)]
# (lateral dtype, prev dtype): fp32 throughout, and the neck under bf16 autocast (bf16 conv output, fp32 sum).
FPN_DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.float32)]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("dtypes", FPN_DTYPES, ids=lambda dtypes: f"{dtypes[0]}-{dtypes[1]}")
def test_fpn_upsample_add_layouts(dtypes, batch, layout):
    lateral_dtype, prev_dtype = dtypes
    generator = torch.Generator().manual_seed(40 + batch)
    for channels, height, width in FPN_SHAPES:
        lateral = _operand((batch, channels, 2 * height, 2 * width), lateral_dtype, layout, generator)
        prev = _operand((batch, channels, height, width), prev_dtype, layout, generator)
        _assert_same(fpn_upsample_add(lateral, prev), fpn_upsample_add(*_contiguous(lateral, prev)),
                     f"fpn_upsample_add {tuple(lateral.shape)} {layout}")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("prev_dtype", DTYPES, ids=str)
def test_fpn_upsample_add_backward_layouts(prev_dtype, batch, layout):
    generator = torch.Generator().manual_seed(50 + batch)
    for channels, height, width in FPN_SHAPES:
        grad = _operand((batch, channels, 2 * height, 2 * width), torch.float32, layout, generator)
        prev = _operand((batch, channels, height, width), prev_dtype, layout, generator)
        _assert_same(fpn_upsample_add_backward(grad, prev), fpn_upsample_add_backward(*_contiguous(grad, prev)),
                     f"fpn_upsample_add_backward {tuple(grad.shape)} {layout}")
