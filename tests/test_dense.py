"""The encoder's GEMM helpers (sam2_fast.gemm.dense) and the banded CPU block: same numbers as the plain sequence."""

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F

import sam2_fast
from sam2_fast.gemm import cpu_gemm, dense
from sam2_fast.model import hiera
from sam2_fast import ops
from sam2_fast.backends.precision import CPU_NATIVE_LOW_PRECISION

from helpers import assert_clear_of_max_pool_ties, assert_close_verbose, encoder_pair, flat_outputs, global_rng_seeded

# fp32: the folded forms add the same terms in another order (residual + bias first, then the GEMM), so they may
# differ from the plain sequence by a few ulps of the result, ~1e-6 relative at these sizes.
FP32_ATOL = 1e-5
CPU_BACKENDS = [b for b in ("torch", "extension") if ops.backend_status("cpu")[b]["bias_gelu_"] == "available"]


def _operands(rows=(3, 5, 7), in_features=24, out_features=40, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*rows, in_features, generator=generator)
    weight = torch.randn(out_features, in_features, generator=generator) / in_features**0.5
    bias = torch.randn(out_features, generator=generator)
    residual = torch.randn(*rows, out_features, generator=generator)
    return x, weight, bias, residual


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("residual_layout", ["contiguous", "permuted"])
def test_linear_add_folds_the_residual_fp32(with_bias, residual_layout):
    x, weight, bias, residual = _operands()
    bias = bias if with_bias else None
    if residual_layout == "permuted":  # a residual whose memory is not in (.., C) order still works
        residual = residual.transpose(0, 1).contiguous().transpose(0, 1)
    kept = residual.clone()
    out = dense.linear_add(x, weight, bias, residual)
    assert_close_verbose(out, residual + F.linear(x, weight, bias), atol=FP32_ATOL, name="linear_add")
    assert torch.equal(residual, kept), "linear_add must not change its residual"
    assert out.is_contiguous() and out.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_add_rounds_like_the_reference_in_low_precision(dtype):
    # Not folded: the GEMM result is rounded to the low-precision dtype before the add, exactly as
    # `residual + F.linear(x)` does (on CPUs without bf16 units, F.linear's GEMM is emulated in fp32 and rounded).
    x, weight, bias, residual = (t.to(dtype) for t in _operands())
    out = dense.linear_add(x, weight, bias, residual)
    assert out.dtype == dtype
    torch.testing.assert_close(out, residual + dense.linear(x, weight, bias), atol=0, rtol=0)


def test_linear_add_under_autocast_keeps_the_reference_dtypes():
    # Under autocast the residual stream is fp32 and the branch bf16: the sum is fp32, the branch rounded first.
    x, weight, bias, residual = _operands()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dense.linear_add(x, weight, bias, residual)
        expected = residual + F.linear(x, weight, bias)
    assert out.dtype == expected.dtype == torch.float32
    # both round the GEMM to bf16 once (ours may compute it in fp32 on bf16 operands): one bf16 ulp of the branch
    torch.testing.assert_close(out, expected, atol=2e-2, rtol=2**-7)


# The fused bias + GELU kernel's erf is within 4.1e-7 of erf (csrc/cpu/gemm/bias_gelu.cpp), so its GELU of
# these |x| < 8 pre-activations may differ from torch's by about 0.5 * 8 * 4.1e-7 plus an ulp.
FUSED_GELU_ATOL = 2e-6


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("autocast", [False, True])
def test_linear_gelu_hands_the_bias_to_a_fused_gelu_in_fp32_only(monkeypatch, backend, autocast):
    # fp32 on the BLAS: the GEMM leaves out its bias and the fused kernel adds it. Under bf16 autocast the GEMM's
    # output is rounded to bf16, so adding the bias afterwards would round twice: the GEMM keeps it and torch's GELU
    # runs. (fp32 GEMMs on oneDNN take the GELU as a post-op instead: tests/test_cpu_gemm.py.)
    monkeypatch.setattr(sam2_fast.gemm.cpu_gemm, "_setting", "blas")
    calls = []
    bias_gelu_ = ops.bias_gelu_

    def spy(x, bias):
        calls.append(bias)
        return bias_gelu_(x, bias)

    monkeypatch.setattr(ops, "bias_gelu_", spy)
    x, weight, bias, _ = _operands()
    with sam2_fast.use_backend(backend), torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        out = dense.linear_gelu(x, weight, bias)
        expected = F.gelu(F.linear(x, weight, bias))
    fused = backend == "extension" and not autocast
    assert len(calls) == fused and (not fused or calls[0] is bias)
    assert out.dtype == expected.dtype
    if not autocast:
        assert_close_verbose(out, expected, atol=FUSED_GELU_ATOL if fused else 1e-6, name=f"linear_gelu {backend}")


def test_linear_gelu_in_place_and_with_gradients():
    x, weight, bias, _ = _operands()
    expected = F.gelu(F.linear(x, weight, bias))
    with torch.no_grad():
        assert_close_verbose(dense.linear_gelu(x, weight, bias), expected, atol=FUSED_GELU_ATOL, name="no_grad")
    x.requires_grad_(True)
    out = dense.linear_gelu(x, weight, bias)
    assert_close_verbose(out.detach(), expected, atol=1e-6, name="with grad")
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    (expected_grad,) = torch.autograd.grad(F.gelu(F.linear(x, weight, bias)).square().sum(), x)
    assert_close_verbose(grad, expected_grad, atol=1e-5, name="grad")


def test_linear_add_gradients():
    x, weight, bias, residual = (t.requires_grad_(True) for t in _operands())
    grads = torch.autograd.grad(dense.linear_add(x, weight, bias, residual).square().sum(), (x, weight, bias, residual))
    expected = torch.autograd.grad((residual + F.linear(x, weight, bias)).square().sum(), (x, weight, bias, residual))
    for name, actual, wanted in zip(("x", "weight", "bias", "residual"), grads, expected):
        assert_close_verbose(actual, wanted, atol=1e-4, name=name)


@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
@pytest.mark.parametrize("kernel,stride,padding", [(1, 1, 0), (7, 4, 3)])
def test_conv2d_matches_torch(layout, kernel, stride, padding):
    generator = torch.Generator().manual_seed(1)
    image = torch.randn(2, 5, 12, 20, generator=generator)
    if layout == "channels_last":
        image = image.contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(7, 5, kernel, kernel, generator=generator), torch.randn(7, generator=generator)
    out = dense.conv2d(image, weight, bias, stride, padding)
    assert_close_verbose(out, F.conv2d(image, weight, bias, stride, padding), atol=1e-5, name="conv2d")


@pytest.mark.parametrize("case", ["fp32-without-training-kernels", "fp32-torch-backend", "bf16-autocast"])
def test_pointwise_conv_in_cpu_training_is_a_convolution_where_the_gemm_would_be_atens(library, monkeypatch, case):
    # Where the GEMM policy gives CPU training ATen's GEMM (no training kernels, the torch backend, autocast), a 1x1
    # convolution that needs gradients runs as ATen's convolution, which reads an NCHW loss's gradient as it lies;
    # without gradients it stays a GEMM over the pixels.
    generator = torch.Generator().manual_seed(5)
    image = torch.randn(2, 6, 5, 7, generator=generator).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(9, 6, 1, 1, generator=generator), torch.randn(9, generator=generator)
    grad = torch.randn(2, 9, 5, 7, generator=generator)
    library("blas")
    if case == "fp32-without-training-kernels":
        monkeypatch.setattr(cpu_gemm, "_use_brgemm_kernels", False)
    def backend():
        return sam2_fast.use_backend("torch") if case == "fp32-torch-backend" else contextlib.nullcontext()

    gemms = []
    linear_on = dense._linear_on  # every GEMM of dense.conv2d goes through it
    monkeypatch.setattr(dense, "_linear_on", lambda *args: gemms.append(1) or linear_on(*args))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "bf16-autocast")
    leaves = [t.clone().requires_grad_(True) for t in (image, weight, bias)]
    reference_leaves = [t.clone().requires_grad_(True) for t in (image, weight, bias)]
    with autocast, backend():
        out = dense.conv2d(*leaves, 1, 0)
        expected_out = F.conv2d(*reference_leaves, 1, 0)
    assert gemms == []
    actual = torch.autograd.grad(out, leaves, grad.to(out.dtype))
    expected = torch.autograd.grad(expected_out, reference_leaves, grad.to(expected_out.dtype))
    with torch.no_grad(), autocast, backend():
        dense.conv2d(image, weight, bias, 1, 0)
    assert gemms == [1]
    if case != "bf16-autocast":  # the same ATen convolution on the same operands: equal
        tolerance = dict(atol=0, rtol=0)
    else:  # on CPUs without bf16 units ours is emulated in fp32 and rounded once: within a bf16 rounding or two
        tolerance = dict(atol=0.1, rtol=2**-6)
    torch.testing.assert_close(out.float(), expected_out.float(), **tolerance)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a.float(), e.float(), **tolerance)


@pytest.mark.skipif(not cpu_gemm.brgemm_kernels(), reason="needs the extension and ATen's fp32 brgemm")
@pytest.mark.parametrize("fp32_library", ["onednn", "blas"])
def test_pointwise_conv_in_fp32_cpu_training_is_a_gemm_on_the_training_kernels(library, monkeypatch, fp32_library):
    # fp32 CPU training takes the extension's kernels whatever the inference library; a 1x1 convolution is then a
    # GEMM over the pixels, whose gradient from an NCHW loss is read per image as it lies (cpu_gemm._Linear).
    generator = torch.Generator().manual_seed(5)
    image = torch.randn(2, 6, 5, 7, generator=generator).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(9, 6, 1, 1, generator=generator), torch.randn(9, generator=generator)
    grad = torch.randn(2, 9, 5, 7, generator=generator)
    library(fp32_library)
    calls = []
    training_linear = cpu_gemm.training_linear
    monkeypatch.setattr(cpu_gemm, "training_linear", lambda *args: calls.append(1) or training_linear(*args))
    leaves = [t.clone().double().requires_grad_(True) for t in (image, weight, bias)]
    ours = [t.clone().requires_grad_(True) for t in (image, weight, bias)]
    out = dense.conv2d(*ours, 1, 0)
    assert calls == [1]
    actual = torch.autograd.grad(out, ours, grad)
    exact_out = F.conv2d(*leaves, 1, 0)
    exact = torch.autograd.grad(exact_out, leaves, grad.double())
    # fp32 sums of at most 70 O(1) products against float64: a few fp32 ulps of the largest.
    torch.testing.assert_close(out.double(), exact_out, atol=1e-5, rtol=1e-5)
    for a, e in zip(actual, exact):
        torch.testing.assert_close(a.double(), e, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["autocast", "cast"])
@pytest.mark.parametrize("kernel,stride,padding", [(1, 1, 0), (7, 4, 3)])
def test_low_precision_dense_layers_match_native(mode, kernel, stride, padding):
    # On CPUs without bf16 units GEMMs/convolutions run in fp32 on bf16-rounded operands and the result is rounded;
    # either way the result must be the native bf16 result to within bf16 rounding.
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 48, generator=generator)
    weight, bias = torch.randn(40, 48, generator=generator), torch.randn(40, generator=generator)
    image = torch.randn(1, 3, 16, 16, generator=generator).contiguous(memory_format=torch.channels_last)
    kernel_weight = torch.randn(8, 3, kernel, kernel, generator=generator)
    if mode == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, expected = dense.linear(x, weight, bias), F.linear(x, weight, bias)
            conv = dense.conv2d(image, kernel_weight, None, stride, padding)
            conv_expected = F.conv2d(image, kernel_weight, None, stride, padding)
    else:
        x, weight, bias, image, kernel_weight = (t.bfloat16() for t in (x, weight, bias, image, kernel_weight))
        out, expected = dense.linear(x, weight, bias), F.linear(x, weight, bias)
        conv = dense.conv2d(image, kernel_weight, None, stride, padding)
        conv_expected = F.conv2d(image, kernel_weight, None, stride, padding)
    for actual, native in ((out, expected), (conv, conv_expected)):
        assert actual.dtype == native.dtype == torch.bfloat16
        # both accumulate in fp32 and round once: at most one bf16 ulp (2^-7 relative) apart
        torch.testing.assert_close(actual.float(), native.float(), atol=1e-2, rtol=2**-7)


NO_BF16_UNITS = "this CPU has no bf16 units (AVX512-BF16 or AMX): its bf16 GEMMs are emulated in fp32 instead"
needs_bf16_units = pytest.mark.skipif(not CPU_NATIVE_LOW_PRECISION[torch.bfloat16], reason=NO_BF16_UNITS)


@needs_bf16_units
def test_bf16_inference_gemms_run_on_prepacked_weights(monkeypatch):
    # bf16 weights or bf16 autocast, in CPU inference: every GEMM (linear, linear + GELU, 1x1 convolution) takes the
    # prepacked weight; fp32 and anything that needs gradients keep F.linear.
    packed = []
    packed_linear = dense._packed_linear
    monkeypatch.setattr(dense, "_packed_linear", lambda *args, **kwargs: packed.append(1) or packed_linear(*args, **kwargs))
    x, weight, bias, _ = _operands()
    generator = torch.Generator().manual_seed(6)
    image = torch.randn(1, 24, 6, 10, generator=generator).contiguous(memory_format=torch.channels_last)
    conv_weight = torch.randn(40, 24, 1, 1, generator=generator)
    with torch.no_grad():
        dense.linear(x.bfloat16(), weight.bfloat16(), bias.bfloat16())
        dense.linear_gelu(x.bfloat16(), weight.bfloat16(), bias.bfloat16())
        dense.conv2d(image.bfloat16(), conv_weight.bfloat16(), None, 1, 0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            dense.linear(x, weight, bias)
        assert len(packed) == 4
        dense.linear(x, weight, bias)
    dense.linear(x.bfloat16(), weight.bfloat16().requires_grad_(True), bias.bfloat16())
    assert len(packed) == 4


@needs_bf16_units
def test_prepacked_weights_follow_in_place_updates_and_moves():
    x, weight, bias, _ = (t.bfloat16() for t in _operands())
    layer = sam2_fast.model.layers.Linear(24, 40).bfloat16()
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
        first = layer(x)
        layer.weight.mul_(2)  # in place: the packed copy must be rebuilt
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), atol=0, rtol=0)
        layer.float().bfloat16()  # new storage
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), atol=0, rtol=0)
    torch.testing.assert_close(first, F.linear(x, weight, bias), atol=0, rtol=0)


@needs_bf16_units
def test_bf16_gelu_post_op_rounds_once():
    # The GELU runs on the GEMM's fp32 accumulator and its output is rounded to bf16 once: within a bf16 ulp (2^-8
    # relative; half of it from the rounding, the rest where fp32 summation order crosses a rounding boundary) of the
    # exact GELU, and no farther from it than the reference's sequence, which rounds the GEMM and then the GELU.
    x, weight, bias, _ = (t.bfloat16() for t in _operands(rows=(257,), in_features=96, out_features=80))
    with torch.no_grad():
        out = dense.linear_gelu(x, weight, bias)
        two_roundings = F.gelu(F.linear(x, weight, bias))
    exact = F.gelu(F.linear(x.double(), weight.double(), bias.double()))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), exact, atol=1e-5, rtol=2**-8)
    assert (out.double() - exact).abs().max() <= (two_roundings.double() - exact).abs().max()


# The banded CPU path must give the whole-map result: bands of whole window rows, per image, the last band padded
# by the attention op exactly where the whole map is, q-pooled bands landing on their output rows, and the MLP of a
# global block in token chunks. A tiny band size makes every block of a small input run in several bands.
@pytest.mark.parametrize("band_tokens", [1, 100])
@pytest.mark.parametrize("name", ["sam2.1_hiera_tiny", "sam2_hiera_small"])
def test_banded_blocks_match_reference(monkeypatch, name, band_tokens):
    reference, ours = encoder_pair(name)
    x = torch.randn(2, 3, 96, 160, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = reference(x)
        monkeypatch.setattr(hiera, "CPU_BAND_TOKENS", band_tokens)
        actual = ours(x)
    for (label, wanted), (_, got) in zip(flat_outputs(expected), flat_outputs(actual)):
        assert got.dtype == wanted.dtype
        assert_close_verbose(got, wanted, atol=1e-4 * max(wanted.abs().max().item(), 1.0), name=label)


def test_banded_blocks_pass_gradients(monkeypatch):
    # Fine-tuning on CPU goes through the banded path too (bands are written into the output with copy_). Each band
    # runs the same kernels on its rows as the whole map does (equal bit for bit on x86 with MKL); the tolerances
    # leave room for a BLAS whose rounding of a row depends on the row count. That rounding must not swap the two
    # largest values of a window of the q-pool or the shortcut pool (the gradient would go to another pixel): what
    # the block pools, computed in fp32 and float64 from its own layers, is clear of such ties.
    monkeypatch.setattr(hiera, "CPU_BAND_TOKENS", 64)
    with global_rng_seeded(0):
        block = hiera.MultiScaleBlock(dim=16, dim_out=32, num_heads=2, q_stride=(2, 2), window_size=4).eval()
    x = torch.randn(2, 11, 9, 16, generator=torch.Generator().manual_seed(7), requires_grad=True)
    pooled = []
    with torch.no_grad():
        for dtype in (torch.float32, torch.float64):
            layers = copy.deepcopy(block).to(dtype)
            normed = layers.norm1(x.detach().to(dtype))
            q, shortcut = layers.attn.qkv(normed)[..., :32], layers.proj(normed)
            pooled.append([t.permute(0, 3, 1, 2) for t in (q, shortcut)])
    assert_clear_of_max_pool_ties(pooled[1], pooled[0], "seed of x")
    banded = block(x)
    grads = torch.autograd.grad(banded.square().sum(), [x, *block.parameters()])
    whole = block._forward_map(x)
    expected = torch.autograd.grad(whole.square().sum(), [x, *block.parameters()])
    assert_close_verbose(banded.detach(), whole.detach(), atol=1e-5, name="output")
    for actual, wanted in zip(grads, expected):
        assert_close_verbose(actual, wanted, atol=1e-4, name="grad")
