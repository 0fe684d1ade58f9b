"""The Triton maxpool2x2 and fpn_upsample_add kernels against their torch implementations, directly and through the
op layer (opcheck, torch.compile).

Runs on CUDA, or on CPU under the Triton interpreter in its own process:
``TRITON_INTERPRET=1 python -m pytest -q tests/test_triton_pool_fpn.py -m interpreter``.

Both ops are exact in every dtype, so every comparison is bit for bit: max-pool only selects elements, and
fpn_upsample_add widens both operands to float32 (exact) and does one float32 add, as the reference does.
"""

import pytest
import torch

from helpers import assert_close_verbose, triton_test_device

pytestmark = pytest.mark.interpreter
DEVICE, ON_GPU = triton_test_device()

import sam2_fast  # noqa: E402
import sam2_fast.ops  # noqa: E402
from sam2_fast.backends import torch_ops  # noqa: E402
from sam2_fast.kernels.fpn_upsample_add import fpn_upsample_add  # noqa: E402
from sam2_fast.kernels.maxpool2x2 import maxpool2x2  # noqa: E402


DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _random(shape, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator).to(dtype=dtype, device=DEVICE)


def _assert_exact(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != expected {expected.dtype}"
    assert actual.is_contiguous(), f"{name}: output is not contiguous (strides {actual.stride()})"
    assert_close_verbose(actual, expected, atol=0.0, name=name)


# ----------------------------------------------------------------------------------------------------------------
# maxpool2x2: (B, H, W, C) channels-last.

def _maxpool_inputs(dtype):
    """(label, x) pairs: odd channel counts and spatial sizes, and non-contiguous views of each stride."""
    cases = [
        ("b1_7x5_c3", _random((1, 7, 5, 3), dtype, 0)),
        ("b2_9x12_c13", _random((2, 9, 12, 13), dtype, 1)),
        ("b3_4x6_c192", _random((3, 4, 6, 192), dtype, 2)),
        ("channel_slice_c96", _random((2, 5, 6, 200), dtype, 3)[..., 3:99]),
        ("spatial_slice", _random((2, 11, 14, 16), dtype, 4)[:, 1:10, ::2]),
        ("nchw_permuted_c13", _random((2, 13, 6, 7), dtype, 5).permute(0, 2, 3, 1)),
    ]
    if ON_GPU:
        cases += [
            ("b2_256x256_c192", _random((2, 256, 256, 192), dtype, 6)),
            ("b1_63x64_c1152", _random((1, 63, 64, 1152), dtype, 7)),
            ("b4_64x64_c224_slice", _random((4, 64, 64, 448), dtype, 8)[..., 224:]),
        ]
    return cases


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_maxpool2x2_matches_torch(dtype):
    for label, x in _maxpool_inputs(dtype):
        _assert_exact(maxpool2x2(x), torch_ops.maxpool2x2(x), f"maxpool2x2 {label} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_maxpool2x2_nan_inf_and_ties(dtype):
    x = _random((2, 6, 7, 13), dtype, 10)
    x[0, 0, 0, :4] = float("nan")  # first in its window
    x[0, 3, 3, 5] = float("nan")  # last in its window
    x[1, 2, 4, 0] = float("inf")
    x[1, 4:6, 0:2, 1] = float("-inf")  # a whole window of -inf
    x[1, 0:2, 2:4, 2] = 0.5  # a four-way tie
    expected = torch_ops.maxpool2x2(x)
    assert expected.isnan().sum() == 5
    _assert_exact(maxpool2x2(x), expected, f"maxpool2x2 nan/inf {dtype}")


def test_maxpool2x2_through_op_layer():
    x = _random((2, 9, 12, 13), torch.bfloat16, 11)
    with sam2_fast.use_backend("triton"):
        assert sam2_fast.ops.resolve_backend("maxpool2x2", x.device.type) == "triton"
        actual = sam2_fast.ops.maxpool2x2(x)
    _assert_exact(actual, torch_ops.maxpool2x2(x), "ops.maxpool2x2")


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_maxpool2x2_opcheck(dtype):
    x = _random((2, 5, 7, 13), dtype, 12).requires_grad_(dtype == torch.float32)
    torch.library.opcheck(torch.ops.sam2_fast.maxpool2x2.default, (x, "triton"))


def test_maxpool2x2_compiles_fullgraph():
    def shortcut(x):
        return sam2_fast.ops.maxpool2x2(x * 2.0) + 1.0

    x = _random((2, 6, 5, 13), torch.float32, 13)
    # On CPU, inductor's C++ codegen costs ~40 s here and adds nothing about the op: aot_eager traces the same
    # graph through the op's fake implementation, which is what fullgraph needs.
    compile_backend = "inductor" if ON_GPU else "aot_eager"
    torch._dynamo.reset()
    with sam2_fast.use_backend("triton"):
        actual = torch.compile(shortcut, backend=compile_backend, fullgraph=True, dynamic=False)(x)
    _assert_exact(actual, torch_ops.maxpool2x2(x * 2.0) + 1.0, "compiled maxpool2x2")


def test_maxpool2x2_empty_output():
    x = _random((2, 1, 5, 8), torch.float32, 0)
    assert maxpool2x2(x).shape == (2, 0, 2, 8)


# ----------------------------------------------------------------------------------------------------------------
# fpn_upsample_add: lateral (B, C, 2h, 2w) + upsample(prev (B, C, h, w)).

def _layout(tensor: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values in another memory layout: NCHW contiguous, channels_last, or a strided slice."""
    if layout == "contiguous":
        return tensor.contiguous()
    if layout == "channels_last":
        return tensor.contiguous(memory_format=torch.channels_last)
    padded = torch.zeros(
        (tensor.shape[0], tensor.shape[1] + 5, tensor.shape[2], tensor.shape[3] + 3),
        dtype=tensor.dtype, device=tensor.device,
    )
    padded[:, 2 : 2 + tensor.shape[1], :, 1 : 1 + tensor.shape[3]] = tensor
    return padded[:, 2 : 2 + tensor.shape[1], :, 1 : 1 + tensor.shape[3]]


def _fpn_shapes():
    """(B, C, h, w) of prev; lateral is (B, C, 2h, 2w)."""
    shapes = [(1, 3, 7, 5), (2, 13, 9, 12), (3, 40, 2, 3)]
    if ON_GPU:
        shapes += [(2, 256, 128, 128), (1, 256, 32, 48)]
    return shapes


@pytest.mark.parametrize(
    "lateral_layout, prev_layout",
    [
        ("contiguous", "contiguous"),
        ("channels_last", "channels_last"),
        ("sliced", "contiguous"),
        ("contiguous", "sliced"),
    ],
)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fpn_upsample_add_matches_torch(dtype, lateral_layout, prev_layout):
    for index, (batch, channels, height, width) in enumerate(_fpn_shapes()):
        lateral = _layout(_random((batch, channels, 2 * height, 2 * width), dtype, index), lateral_layout)
        prev_same_dtype = _random((batch, channels, height, width), dtype, 100 + index)
        # In the neck, prev is the coarser level's conv output (same dtype) or an earlier fused sum (float32).
        for prev_dtype in dict.fromkeys((dtype, torch.float32)):
            prev = _layout(prev_same_dtype.to(prev_dtype), prev_layout)
            _assert_exact(
                fpn_upsample_add(lateral, prev),
                torch_ops.fpn_upsample_add(lateral, prev),
                f"fpn_upsample_add {tuple(lateral.shape)} lateral {dtype} {lateral_layout}, "
                f"prev {prev_dtype} {prev_layout}",
            )


def test_fpn_upsample_add_through_op_layer():
    lateral = _layout(_random((2, 13, 18, 24), torch.bfloat16, 20), "channels_last")
    prev = _random((2, 13, 9, 12), torch.bfloat16, 21)
    with sam2_fast.use_backend("triton"):
        actual = sam2_fast.ops.fpn_upsample_add(lateral, prev)
    _assert_exact(actual, torch_ops.fpn_upsample_add(lateral, prev), "ops.fpn_upsample_add")


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_fpn_upsample_add_opcheck(dtype):
    requires_grad = dtype == torch.float32
    lateral = _layout(_random((2, 5, 6, 10), dtype, 22), "channels_last").requires_grad_(requires_grad)
    prev = _random((2, 5, 3, 5), dtype, 23).requires_grad_(requires_grad)
    torch.library.opcheck(torch.ops.sam2_fast.fpn_upsample_add.default, (lateral, prev, "triton"))
