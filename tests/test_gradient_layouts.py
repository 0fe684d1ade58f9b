"""Gradients in every layout a loss can make, on every CPU backend and both fp32 GEMM libraries.

A loss hands autograd's output gradients to the backward in whatever layout its last op leaves them:
``out.sum((2, 3))`` and ``out.mean()`` broadcast them (stride 0), a loss on a ``(B, HW, C)`` view or on a permuted
map transposes them, a loss on a slice leaves them strided. Each op with a backward, and the whole encoder, is fed
each of these here, with inputs that are themselves non-contiguous, at batch 1 and 2, on 1, 2 and 3 threads (3 makes
more than two row ranges on these 2-core machines).

Truth is float64. The criterion is the one tests/test_training.py applies to the whole encoder: each gradient's
error, relative to its largest element, at most twice plain PyTorch's own fp32 error on the same values (fed a
contiguous gradient) plus a floor for gradients that both get within a few ulps.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

import sam2_fast
from sam2_fast.gemm import dense
from sam2_fast import ops
from sam2_fast.backends import torch_ops
from sam2_fast.testing.reference import build_reference_encoder

from helpers import (
    FP32_GRADIENT_ERROR_FLOOR, FP32_GRADIENT_ERROR_RATIO, assert_clear_of_max_pool_ties, check_gradients,
    recorded_max_pool_inputs, seeded_state,
)

CPU_BACKENDS = [b for b in ("torch", "extension") if ops.backend_status("cpu")[b]["window_attention"] == "available"]
LIBRARIES = ("onednn", "blas")

# bf16 autocast: twice the reference's own bf16-autocast error, with a floor of 1% of the gradient's magnitude
# (tests/test_training.py: gradients the reference happens to get almost exactly).
BF16_ERROR_RATIO, BF16_ERROR_FLOOR = 2.0, 1e-2

# The layouts of an output gradient of shape (B, d1, d2, d3), each made from float64 values that the truth gets too.
GRAD_LAYOUTS = (
    "contiguous",
    "broadcast_12",    # from a sum over dims 1 and 2 (the spatial dims of a channels-last map): strides (d3, 0, 0, 1)
    "broadcast_23",    # from a sum over dims 2 and 3 (the spatial dims of an NCHW map): strides (d1, 1, 0, 0)
    "scalar",          # from mean(): every stride 0
    "channels_first",  # a permuted map: the gradient of a loss on x.permute(0, 3, 1, 2)
    "transposed",      # dims 1 and 2 swapped in memory: a loss on a (B, W, H, C) view
    "sliced",          # every other element of the last dim of a larger tensor
    "batch_sliced",    # every other image of a larger batch
)


def _grad_in_layout(shape, layout: str, seed: int) -> torch.Tensor:
    """A float64 gradient of ``shape`` laid out as ``layout`` names (values from a seeded generator)."""
    generator = torch.Generator().manual_seed(seed)
    batch, d1, d2, d3 = shape

    def draw(*size):
        return torch.randn(size, generator=generator, dtype=torch.float64)

    if layout == "contiguous":
        grad = draw(*shape)
    elif layout == "broadcast_12":
        grad = draw(batch, 1, 1, d3).expand(shape)
    elif layout == "broadcast_23":
        grad = draw(batch, d1, 1, 1).expand(shape)
    elif layout == "scalar":
        grad = draw(1).reshape(()).expand(shape)
    elif layout == "channels_first":
        grad = draw(batch, d3, d1, d2).permute(0, 2, 3, 1)
    elif layout == "transposed":
        grad = draw(batch, d2, d1, d3).transpose(1, 2)
    elif layout == "sliced":
        grad = draw(batch, d1, d2, 2 * d3 + 1)[..., 1::2]
    elif layout == "batch_sliced":
        grad = draw(2 * batch, d1, d2, d3)[1::2]
    else:
        raise ValueError(f"unknown gradient layout {layout!r}")
    assert grad.shape == torch.Size(shape)
    return grad


def _cast_keep_layout(grad: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``grad`` in ``dtype`` with the same strides: a broadcast stays a broadcast (``Tensor.to`` would make it
    contiguous)."""
    if 0 in grad.stride():
        base = grad
        for dim, stride in enumerate(grad.stride()):
            if stride == 0:
                base = base.narrow(dim, 0, 1)
        return base.to(dtype).expand(grad.shape)
    out = torch.empty_strided(grad.shape, grad.stride(), dtype=dtype)
    return out.copy_(grad)


@pytest.fixture
def gemm_library(request, library):
    """The eager fp32 CPU GEMM library ``request.param`` for one test, the setting restored after it."""
    library(request.param)
    return request.param


# ----------------------------------------------------------------------------------------------------------------
# Ops. Each case: (name, the call through sam2_fast, the plain-PyTorch truth, input shapes, which inputs take a
# gradient). Inputs are non-contiguous views of larger tensors where ``strided_inputs``.

def _window_case(q_pool: bool, add_bias: bool):
    num_heads, window_size = 2, 4

    def ours(qkv, bias):
        return ops.window_attention(qkv, bias, num_heads, window_size, q_pool, add_bias)

    def truth(qkv, bias):
        return torch_ops.window_attention(qkv, bias, num_heads, window_size, q_pool, add_bias)

    # 9 x 7 pads both ways to 12 x 8 (2 heads of 4 channels); q-pooling inside padded windows floors to 4 x 3.
    return ours, truth, {"qkv": (9, 7, 24), "bias": (24,)}


def _global_case(q_pool: bool):
    def ours(qkv):
        return ops.global_attention(qkv, 2, q_pool)

    def truth(qkv):
        return torch_ops.global_attention(qkv, 2, q_pool)

    return ours, truth, {"qkv": (5, 7, 24)}


def _maxpool_case():
    return ops.maxpool2x2, torch_ops.maxpool2x2, {"x": (7, 9, 6)}


def _fpn_case():
    def ours(lateral, prev):
        return ops.fpn_upsample_add(lateral, prev)

    return ours, torch_ops.fpn_upsample_add, {"lateral": (5, 6, 10), "prev": (5, 3, 5)}


def _linear_case():
    def truth(x, weight, bias):
        return torch.nn.functional.linear(x, weight, bias)

    # 12 x 20 pixels a map: 480 rows at batch 2, so the extension's 64-row tiles fall into three thread ranges.
    return dense.linear, truth, {"x": (12, 20, 40), "weight": (36, 40), "bias": (36,)}


def _conv1x1_case():
    def ours(x, weight, bias):
        return dense.conv2d(x.contiguous(memory_format=torch.channels_last), weight, bias, 1, 0)

    def truth(x, weight, bias):
        return torch.nn.functional.conv2d(x, weight, bias)

    return ours, truth, {"x": (40, 12, 20), "weight": (36, 40, 1, 1), "bias": (36,)}


OP_CASES = {
    "window_attention": _window_case(q_pool=False, add_bias=False),
    "window_attention_q_pool": _window_case(q_pool=True, add_bias=False),
    "window_attention_add_bias": _window_case(q_pool=False, add_bias=True),
    "global_attention": _global_case(q_pool=False),
    "global_attention_q_pool": _global_case(q_pool=True),
    "maxpool2x2": _maxpool_case(),
    "fpn_upsample_add": _fpn_case(),
    "linear": _linear_case(),
    "conv1x1": _conv1x1_case(),
}
# Per-op inputs that are batched (the rest, weights and biases, are not).
_BATCHED = {"qkv", "x", "lateral", "prev"}


def _op_inputs(case: str, batch: int, strided: bool):
    """float64 inputs of ``case``: batched ones (B, ...), each a non-contiguous view of a larger tensor if
    ``strided`` (every other element of a wider last dim)."""
    _, _, shapes = OP_CASES[case]
    generator = torch.Generator().manual_seed(1000 + batch)
    inputs = {}
    for name, shape in shapes.items():
        shape = (batch, *shape) if name in _BATCHED else shape
        if strided:
            wide = torch.randn(*shape[:-1], 2 * shape[-1], generator=generator, dtype=torch.float64)
            inputs[name] = wide[..., ::2]
        else:
            inputs[name] = torch.randn(shape, generator=generator, dtype=torch.float64)
    return inputs


def _op_gradients(fn, inputs: dict, grad_out_of) -> dict:
    """{input name: d(sum(out * grad))/d input} with the output gradient ``grad_out_of(out)`` handed to autograd
    as it is laid out."""
    leaves = {name: t.detach().requires_grad_(True) for name, t in inputs.items()}
    out = fn(*leaves.values())
    grads = torch.autograd.grad(out, list(leaves.values()), grad_out_of(out))
    return dict(zip(leaves, grads))


def _op_truth_and_reference(case: str, batch: int, strided: bool, layout: str):
    """(float64 truth, plain PyTorch's fp32 gradients fed the same values contiguous) of ``case``, on the current
    thread count."""
    return _op_truth_and_reference_on(case, batch, strided, layout, torch.get_num_threads())


# Keyed by the thread count too: ATen's own rounding depends on it (oneDNN's convolution sums a bias gradient in
# other chains on 2 threads than on 1: 5.1e-6 against 1.0e-7 from float64 for a broadcast gradient), so the
# yardstick is plain PyTorch on the threads ours runs on.
@functools.lru_cache(maxsize=None)
def _op_truth_and_reference_on(case: str, batch: int, strided: bool, layout: str, num_threads: int):
    _, truth_fn, _ = OP_CASES[case]
    inputs = _op_inputs(case, batch, strided)

    def grad64(out):
        return _grad_in_layout(out.shape, layout, seed=7)

    truth = _op_gradients(truth_fn, inputs, grad64)
    inputs32 = {name: t.float() for name, t in inputs.items()}
    reference = _op_gradients(truth_fn, inputs32, lambda out: grad64(out).float().contiguous())
    return truth, reference


def _check_op(case: str, backend: str, batch: int, strided: bool, layout: str) -> None:
    ours_fn, _, _ = OP_CASES[case]
    truth, reference = _op_truth_and_reference(case, batch, strided, layout)
    inputs32 = {name: t.float() for name, t in _op_inputs(case, batch, strided).items()}
    if strided:  # .float() made them contiguous: the same values, strided again
        inputs32 = {name: _strided_view(t) for name, t in inputs32.items()}

    def grad32(out):
        grad = _grad_in_layout(out.shape, layout, seed=7)
        return _cast_keep_layout(grad, torch.float32)

    with sam2_fast.use_backend(backend):
        ours = _op_gradients(ours_fn, inputs32, grad32)
    check_gradients(ours, reference, truth, FP32_GRADIENT_ERROR_RATIO, FP32_GRADIENT_ERROR_FLOOR)


def _strided_view(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values as every other element of a last dim twice as wide."""
    wide = t.new_zeros(*t.shape[:-1], 2 * t.shape[-1])
    wide[..., ::2] = t
    return wide[..., ::2]


@pytest.mark.parametrize("layout", GRAD_LAYOUTS)
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", [c for c in OP_CASES if c not in ("linear", "conv1x1")])
def test_op_gradients_in_every_layout(case, backend, batch, layout):
    _check_op(case, backend, batch, strided=False, layout=layout)


@pytest.mark.parametrize("layout", ["contiguous", "broadcast_12", "channels_first", "sliced"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", [c for c in OP_CASES if c not in ("linear", "conv1x1")])
def test_op_gradients_of_strided_inputs(case, backend, layout):
    _check_op(case, backend, 2, strided=True, layout=layout)


@pytest.mark.parametrize("layout", GRAD_LAYOUTS)
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("gemm_library", LIBRARIES, indirect=True)
@pytest.mark.parametrize("case", ["linear", "conv1x1"])
def test_gemm_gradients_in_every_layout(case, gemm_library, batch, layout):
    _check_op(case, "extension" if "extension" in CPU_BACKENDS else "torch", batch, strided=False, layout=layout)


@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("num_threads", [1, 2, 3])
@pytest.mark.parametrize("layout", ["broadcast_12", "broadcast_23", "scalar", "channels_first"])
@pytest.mark.parametrize("case", list(OP_CASES))
def test_op_gradients_on_1_2_3_threads(case, layout, num_threads, strided, threads):
    """Default settings (the CPU's default GEMM library and backend), batch 1 and 2 in one go."""
    threads(num_threads)
    backend = "extension" if "extension" in CPU_BACKENDS else "torch"
    for batch in (1, 2):
        _check_op(case, backend, batch, strided=strided, layout=layout)


# ----------------------------------------------------------------------------------------------------------------
# The whole encoder.

ENCODER = "sam2.1_hiera_tiny"
# 64 x 96: stage maps 16x24, 8x12, 4x6, 2x3, so windows overhang the map and q-pooling pools inside padded windows
# (as in tests/test_training.py).
IMAGE_HW = (64, 96)


def _image(batch: int, dtype=torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(22)  # clear of max-pool ties (see below); 17-21 are not
    return torch.randn(batch, 3, *IMAGE_HW, generator=generator, dtype=torch.float64).to(dtype)


def _features(out: dict):
    return [out["vision_features"], *out["backbone_fpn"]]


def _pooled_loss(features) -> torch.Tensor:
    """The fine-tuning loss that found the NaN gradients: squared sums over each feature map's pixels, so that
    every map's gradient arrives broadcast over H and W."""
    return sum(f.sum((2, 3)).square().sum() for f in features)


def _mean_loss(features) -> torch.Tensor:
    return sum(f.mean() for f in features)


def _fixed_weight(like: torch.Tensor, scale: float) -> torch.Tensor:
    """Deterministic weights of ``like``'s shape, exact in fp32, in ``like``'s dtype."""
    values = torch.linspace(-1, 1, like.numel(), dtype=torch.float32).view(like.shape)
    return (scale * values).to(like.dtype)


def _token_loss(features) -> torch.Tensor:
    """A loss on the (B, HW, C) token view of each map, as a head that takes tokens sees it."""
    total = 0
    for index, f in enumerate(features):
        tokens = f.flatten(2).transpose(1, 2)
        total = total + (tokens * _fixed_weight(tokens, index + 1)).sum()
    return total


def _channels_last_loss(features) -> torch.Tensor:
    """A loss on the channels-last copy of each map: its gradient arrives in that layout."""
    total = 0
    for index, f in enumerate(features):
        last = f.contiguous(memory_format=torch.channels_last)
        weight = _fixed_weight(last, index + 1).contiguous(memory_format=torch.channels_last)
        total = total + (last * weight).sum()
    return total


# Losses a user writes; their gradients reach the maps broadcast (pooled, mean) or transposed (tokens,
# channels_last).
LOSSES = {"pooled": _pooled_loss, "mean": _mean_loss, "tokens": _token_loss, "channels_last": _channels_last_loss}
# Output gradients handed to autograd as they lie (a loss on a slice gets a contiguous gradient from autograd's
# SliceBackward, so strided ones are sent explicitly).
EXPLICIT_LAYOUTS = ("sliced", "batch_sliced", "transposed")
ENCODER_CASES = list(LOSSES) + [f"grad:{layout}" for layout in EXPLICIT_LAYOUTS]


@functools.lru_cache(maxsize=2)
def _reference_model(dtype: torch.dtype) -> torch.nn.Module:
    model = build_reference_encoder(ENCODER)
    model.load_state_dict(seeded_state(ENCODER))
    return model.to(dtype).train()


@functools.lru_cache(maxsize=1)
def _our_model() -> torch.nn.Module:
    model = sam2_fast.build_image_encoder(ENCODER)
    model.load_state_dict(seeded_state(ENCODER))
    return model.train()


def _encoder_gradients(model, loss_name: str, batch: int, dtype=torch.float32, autocast: bool = False) -> dict:
    image = _image(batch, dtype).requires_grad_(True)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(image)
    features = _features(out)
    if loss_name in LOSSES:
        LOSSES[loss_name](features).backward()
    else:
        layout = loss_name.split(":")[1]
        grads = [_cast_keep_layout(_grad_in_layout(f.shape, layout, seed=50 + i), f.dtype)
                 for i, f in enumerate(features)]
        torch.autograd.backward(features, grads)
    grads = {"input": image.grad}
    grads.update({name: p.grad for name, p in model.named_parameters()})
    return {name: None if g is None else g.detach().clone() for name, g in grads.items()}


@functools.lru_cache(maxsize=None)
def _encoder_truth(loss_name: str, batch: int) -> dict:
    return _encoder_gradients(_reference_model(torch.float64), loss_name, batch, torch.float64)


@functools.lru_cache(maxsize=None)
def _assert_image_clear_of_max_pool_ties(batch: int) -> None:
    """The image (seed 22) keeps every max-pool window's two largest values further apart than fp32 rounding can
    move them, so that fp32 paths route each pooled gradient to the pixel the float64 truth does."""
    pools = []
    for dtype in (torch.float64, torch.float32):
        with torch.no_grad(), recorded_max_pool_inputs(_reference_model(dtype)) as captured:
            _reference_model(dtype)(_image(batch, dtype))
        pools.append(captured)
    assert_clear_of_max_pool_ties(pools[0], pools[1], "the seed of _image")


def _encoder_reference(loss_name: str, batch: int, autocast: bool) -> dict:
    """The reference's gradients on the current thread count (see _op_truth_and_reference)."""
    return _encoder_reference_on(loss_name, batch, autocast, torch.get_num_threads())


@functools.lru_cache(maxsize=None)
def _encoder_reference_on(loss_name: str, batch: int, autocast: bool, num_threads: int) -> dict:
    return _encoder_gradients(_reference_model(torch.float32), loss_name, batch, autocast=autocast)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("loss_name", ENCODER_CASES)
@pytest.mark.parametrize("gemm_library", LIBRARIES, indirect=True)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_encoder_gradients_for_every_loss_layout(backend, gemm_library, loss_name, batch):
    _assert_image_clear_of_max_pool_ties(batch)
    with sam2_fast.use_backend(backend):
        ours = _encoder_gradients(_our_model(), loss_name, batch)
    check_gradients(ours, _encoder_reference(loss_name, batch, False), _encoder_truth(loss_name, batch),
                        FP32_GRADIENT_ERROR_RATIO, FP32_GRADIENT_ERROR_FLOOR)


@pytest.mark.parametrize("num_threads", [1, 3])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_encoder_pooled_loss_gradients_on_1_and_3_threads(backend, num_threads, threads):
    """The default GEMM library on other thread counts than the suite's (2 on these machines)."""
    threads(num_threads)
    _assert_image_clear_of_max_pool_ties(1)
    with sam2_fast.use_backend(backend):
        ours = _encoder_gradients(_our_model(), "pooled", 1)
    check_gradients(ours, _encoder_reference("pooled", 1, False), _encoder_truth("pooled", 1),
                        FP32_GRADIENT_ERROR_RATIO, FP32_GRADIENT_ERROR_FLOOR)


@pytest.mark.skipif("ATEN_CPU_CAPABILITY" in os.environ,
                    reason="ATen's CPU capability is capped: on AMX CPUs the reference's bf16 SDPA then raises")
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_encoder_pooled_loss_gradients_under_bf16_autocast(backend):
    # No pool-margin check: bf16 rounding moves pooled values by more than many of their gaps, in the reference too;
    # the criterion is tests/test_training.py's for bf16 autocast, relative to the reference's own bf16 error.
    with sam2_fast.use_backend(backend):
        ours = _encoder_gradients(_our_model(), "pooled", 1, autocast=True)
    check_gradients(ours, _encoder_reference("pooled", 1, True), _encoder_truth("pooled", 1),
                        BF16_ERROR_RATIO, BF16_ERROR_FLOOR)
