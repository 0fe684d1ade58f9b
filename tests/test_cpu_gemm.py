"""Eager fp32 CPU GEMMs on oneDNN (sam2_fast.gemm.cpu_gemm): the choice of library, the numbers and gradients of each
GEMM form against ATen's, which calls take the path, and the whole encoder on either library.

Every test that runs oneDNN forces it, so it is checked on every CPU, also where ``auto`` keeps the BLAS.
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import sam2_fast
from sam2_fast.gemm import cpu_gemm, dense

from helpers import assert_close_verbose, brgemm_f32_usable, encoder_pair, flat_outputs, relative_error

needs_onednn = pytest.mark.skipif(not cpu_gemm.onednn_available(), reason="torch has no oneDNN here")

# fp32 products of the same operands summed in another order: a few ulps of the largest partial sums. The operands
# below are O(1) with 24-96 terms per dot product, so results are O(10) and their ulps ~1e-6.
FP32_ATOL = 2e-5


@pytest.fixture
def products(monkeypatch):
    """Count the calls that reach oneDNN."""
    calls = []
    product = cpu_gemm._product
    monkeypatch.setattr(cpu_gemm, "_product", lambda *args, **kwargs: calls.append(1) or product(*args, **kwargs))
    return calls


def _operands(rows=(3, 5, 7), in_features=24, out_features=40, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*rows, in_features, generator=generator)
    weight = torch.randn(out_features, in_features, generator=generator)
    bias = torch.randn(out_features, generator=generator)
    residual = torch.randn(*rows, out_features, generator=generator)
    return x, weight, bias, residual


def test_auto_takes_onednn_only_on_non_intel_avx512_cpus(library):
    capabilities = torch._C._cpu._get_cpu_capability()
    intel = "intel" in str(capabilities.get("cpu_name", "")).lower()
    expected = bool(capabilities.get("avx512_f")) and not intel and cpu_gemm.onednn_available()
    library("auto")
    assert (cpu_gemm.fp32_library() == "onednn") == expected
    library("blas")
    assert sam2_fast.cpu_fp32_gemm() == "blas"
    library("onednn")
    assert cpu_gemm.fp32_library() == ("onednn" if cpu_gemm.onednn_available() else "blas")


@needs_onednn
def test_disabling_onednn_in_torch_falls_back_to_the_blas(library):
    library("onednn")
    with torch.backends.mkldnn.flags(enabled=False):
        assert cpu_gemm.fp32_library() == "blas"
    assert cpu_gemm.fp32_library() == "onednn"


def test_unknown_library_names_the_choices():
    with pytest.raises(ValueError, match="'mkl'.*auto, onednn, blas"):
        sam2_fast.set_cpu_fp32_gemm("mkl")


@pytest.mark.parametrize("value,expected", [("blas", "blas"), ("onednn", None), ("cuBLAS", "error")])
def test_environment_variable_chooses_the_library(value, expected):
    env = dict(os.environ, **{cpu_gemm.ENV_VAR: value})
    code = "import sam2_fast; print(sam2_fast.cpu_fp32_gemm())"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if expected == "error":
        assert result.returncode != 0
        assert cpu_gemm.ENV_VAR in result.stderr and "'cuBLAS'" in result.stderr
        return
    assert result.returncode == 0, result.stderr
    wanted = expected or ("onednn" if cpu_gemm.onednn_available() else "blas")
    assert result.stdout.strip() == wanted


@needs_onednn
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_forms_match_aten_in_fp32(library, products, with_bias, layout):
    library("onednn")
    x, weight, bias, residual = _operands()
    bias = bias if with_bias else None
    if layout == "transposed":  # strided operands are read as they are
        x = x.transpose(0, 1).contiguous().transpose(0, 1)
        weight = weight.t().contiguous().t()
    kept = residual.clone()
    with torch.no_grad():
        assert_close_verbose(dense.linear(x, weight, bias), F.linear(x, weight, bias), atol=FP32_ATOL, name="linear")
        assert_close_verbose(dense.linear_gelu(x, weight, bias), F.gelu(F.linear(x, weight, bias)), atol=FP32_ATOL,
                             name="linear_gelu")
        out = dense.linear_add(x, weight, bias, residual)
    assert_close_verbose(out, residual + F.linear(x, weight, bias), atol=FP32_ATOL, name="linear_add")
    assert torch.equal(residual, kept), "linear_add must not change its residual"
    assert out.shape == residual.shape and out.dtype == torch.float32
    assert len(products) == 2  # linear and linear_gelu; linear_add takes oneDNN's binary form


@needs_onednn
@pytest.mark.parametrize("kernels", [True, False], ids=["brgemm-kernels", "aten-products"])
@pytest.mark.parametrize("needs", ["all", "input only", "weight only"])
def test_gradients_match_aten(library, products, monkeypatch, needs, kernels):
    library("onednn")
    monkeypatch.setattr(cpu_gemm, "_use_brgemm_kernels", kernels)
    x, weight, bias, residual = _operands(rows=(2, 9), in_features=33, out_features=17)
    wants = {"all": (True, True, True), "input only": (True, False, False), "weight only": (False, True, True)}[needs]
    leaves = [t.clone().requires_grad_(w) for t, w in zip((x, weight, bias), wants)]
    reference_leaves = [t.clone().requires_grad_(w) for t, w in zip((x, weight, bias), wants)]
    out = dense.linear_add(*leaves, residual)
    expected_out = residual + F.linear(*reference_leaves)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    differentiable = [t for t in leaves if t.requires_grad]
    actual = torch.autograd.grad(out, differentiable, grad)
    expected = torch.autograd.grad(expected_out, [t for t in reference_leaves if t.requires_grad], grad)
    assert products == []  # with gradients the products never take oneDNN (cpu_gemm._Linear)
    assert_close_verbose(out.detach(), expected_out.detach(), atol=FP32_ATOL, name="output")
    names = [name for name, wanted in zip(("x", "weight", "bias"), wants) if wanted]
    for name, a, e in zip(names, actual, expected):
        # the weight's and bias's gradients sum over 18 rows of O(1) products: within fp32 rounding of O(10)
        assert_close_verbose(a, e, atol=1e-4, name=f"grad {name}")


@needs_onednn
@pytest.mark.parametrize("kernels", [True, False], ids=["brgemm-kernels", "aten-products"])
def test_pointwise_conv_gradients_from_a_channels_first_loss(library, monkeypatch, kernels):
    # A 1x1 convolution of a channels-last map runs as a GEMM over its pixels (dense.conv2d) where fp32 training takes
    # the extension's kernels; an NCHW gradient then reaches the GEMM as a (B, H, W, C) view whose rows are not
    # contiguous, and is used per image as it lies. Without those kernels the GEMM policy gives training ATen's GEMM,
    # and the convolution stays ATen's (which reads the gradient as it lies itself).
    library("onednn")
    monkeypatch.setattr(cpu_gemm, "_use_brgemm_kernels", kernels)
    taken = []
    per_image = cpu_gemm._channels_first_gradients
    monkeypatch.setattr(cpu_gemm, "_channels_first_gradients", lambda *args: taken.append(1) or per_image(*args))
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(2, 24, 5, 7, generator=generator).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(40, 24, 1, 1, generator=generator), torch.randn(40, generator=generator)
    grad = torch.randn(2, 40, 5, 7, generator=generator)  # contiguous NCHW
    leaves = [t.clone().requires_grad_(True) for t in (x, weight, bias)]
    reference_leaves = [t.clone().requires_grad_(True) for t in (x, weight, bias)]
    out = dense.conv2d(*leaves, 1, 0)
    expected_out = F.conv2d(*reference_leaves, 1, 0)
    actual = torch.autograd.grad(out, leaves, grad)
    expected = torch.autograd.grad(expected_out, reference_leaves, grad)
    assert taken == ([1] if kernels and brgemm_f32_usable() else [])
    assert_close_verbose(out.detach(), expected_out.detach(), atol=FP32_ATOL, name="output")
    for name, a, e in zip(("x", "weight", "bias"), actual, expected):
        # sums over 24 channels (x) or 70 pixels (weight, bias) of O(1) products: within fp32 rounding of O(10)
        assert_close_verbose(a, e, atol=1e-4, name=f"grad {name}")


@needs_onednn
def test_only_eager_fp32_takes_onednn(library, products):
    library("onednn")
    x, weight, bias, _ = _operands()
    with torch.no_grad():
        dense.linear(x.double(), weight.double(), bias.double())
        dense.linear(x.bfloat16(), weight.bfloat16(), bias.bfloat16())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            dense.linear(x, weight, bias)
        assert products == []
        library("blas")
        dense.linear(x, weight, bias)
        assert products == []
        library("onednn")
        dense.linear(x, weight, bias)
        assert len(products) == 1
    # Under torch.compile the GEMM stays F.linear for the compiler to lower: the compiled graph holds aten ops only.
    torch._dynamo.reset()
    compiled = torch.compile(lambda a: dense.linear(a, weight, bias), fullgraph=True, backend="aot_eager")
    assert_close_verbose(compiled(x), F.linear(x, weight, bias), atol=FP32_ATOL, name="compiled")
    assert len(products) == 1


@needs_onednn
def test_encoder_outputs_and_gradients_agree_on_both_libraries(library):
    # The whole tiny encoder in train mode (fp32): the BLAS path is checked against the reference by the parity and
    # training tests wherever `auto` picks it; here the oneDNN path must give the same outputs and gradients.
    _, encoder = encoder_pair("sam2.1_hiera_tiny")
    encoder = encoder.train()
    image = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(3))
    results = {}
    for name in ("blas", "onednn"):
        library(name)
        encoder.zero_grad(set_to_none=True)
        out = encoder(image)
        sum(level.square().mean() for level in out["backbone_fpn"]).backward()
        results[name] = ([t.detach() for _, t in flat_outputs(out)],
                         {n: p.grad.clone() for n, p in encoder.named_parameters()})
    encoder.eval()
    (blas_outputs, blas_grads), (onednn_outputs, onednn_grads) = results["blas"], results["onednn"]
    for a, e in zip(onednn_outputs, blas_outputs):
        assert_close_verbose(a, e, atol=1e-4 * max(e.abs().max().item(), 1.0), name="output")
    for name, e in blas_grads.items():
        # fp32 gradients through 12 blocks, summed in another order: 1e-4 of the gradient's magnitude
        assert_close_verbose(onednn_grads[name], e, atol=1e-4 * max(e.abs().max().item(), 1e-6), name=name)


needs_brgemm = pytest.mark.skipif(
    not brgemm_f32_usable(),
    reason="needs the extension and ATen's fp32 brgemm with oneDNN enabled in torch (it runs on oneDNN's "
    "micro-kernels from AVX2 up, on ATen's BLAS gemm below; see csrc/common/brgemm_f32.h)",
)


@needs_brgemm
@pytest.mark.parametrize("shape", [(300, 37, 20), (257, 96, 130), (1, 8, 3), (129, 600, 70)],
                         ids=["ragged", "two_chunks", "one_row", "wide"])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("threads", [1, 2])
def test_linear_weight_grad_kernel_matches_float64(shape, with_bias, threads):
    # Chains of 64-128 rows, output blocks of 64 and column blocks of 512 with remainders; strided rows.
    rows, in_features, out_features = shape
    generator = torch.Generator().manual_seed(6)
    grad = torch.randn(rows, out_features + 5, generator=generator)[:, :out_features]
    x = torch.randn(rows, in_features, generator=generator)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        weight_grad, bias_grad = torch.ops.sam2_fast_ext.linear_weight_grad(grad, x, with_bias)
    finally:
        torch.set_num_threads(before)
    expected = grad.double().t() @ x.double()
    # fp32 sums of at most `rows` O(1) products, in chunks of 128: within fp32 rounding of the largest partial sums.
    assert_close_verbose(weight_grad, expected.float(), atol=2e-5 * max(rows, 1) ** 0.5, name="weight grad")
    assert weight_grad.shape == (out_features, in_features) and weight_grad.is_contiguous()
    if with_bias:
        assert_close_verbose(bias_grad, grad.double().sum(0).float(), atol=2e-5 * max(rows, 1) ** 0.5, name="bias")
    else:
        assert bias_grad.shape == (0,)


def _fp32_two_level_sum(grad: torch.Tensor, x: torch.Tensor, chain: int) -> torch.Tensor:
    """grad^T x as fp32 fused multiply-adds in chains of `chain` rows, each chain's sum then added to the total in
    fp32 (a product of two fp32 numbers is exact in float64, so float64 then rounding is one fused multiply-add)."""
    total = None
    for start in range(0, grad.shape[0], chain):
        acc = torch.zeros(grad.shape[1], x.shape[1], dtype=torch.float64)
        for row in range(start, min(grad.shape[0], start + chain)):
            acc = (acc + torch.outer(grad[row].double(), x[row].double())).float().double()
        total = acc.float() if total is None else (total.double() + acc).float()
    return total


@needs_brgemm
def test_linear_weight_grad_rounds_as_a_two_level_sum(threads):
    # Positive operands, where rounding errors of a long fp32 chain add up instead of cancelling (a gradient whose
    # rows agree in sign meets the same). On one thread the kernel sums 4096 rows in chains of sqrt(4096) = 64 rows, then
    # the chains: its error is that of such a two-level sum (the emulation), 7x below one chain over all the rows on
    # these operands; 1.5x leaves room for another micro-kernel's order within a chain.
    threads(1)
    generator = torch.Generator().manual_seed(3)
    grad, x = torch.rand(4096, 16, generator=generator), torch.rand(4096, 16, generator=generator)
    exact = grad.double().t() @ x.double()
    weight_grad, _ = torch.ops.sam2_fast_ext.linear_weight_grad(grad, x, False)
    error, two_level, one_chain = (relative_error(a, exact) for a in (
        weight_grad, _fp32_two_level_sum(grad, x, 64), _fp32_two_level_sum(grad, x, 4096)))
    print(f"error {error:.3g}; fp32 chains of 64 then their sum {two_level:.3g}; one chain {one_chain:.3g}")
    assert one_chain > 4 * two_level, "the operands no longer tell a two-level sum from one chain"
    assert error <= 1.5 * two_level


@needs_brgemm
def test_linear_weight_grad_checks_and_opcheck():
    with pytest.raises(RuntimeError, match=r"expected grad \(M, N\) and input \(M, K\), got \[4, 3\] and \[5, 2\]"):
        torch.ops.sam2_fast_ext.linear_weight_grad(torch.randn(4, 3), torch.randn(5, 2), True)
    with pytest.raises(RuntimeError, match=r"linear_weight_grad: expected input of shape \(M, K\), got \[4\]"):
        torch.ops.sam2_fast_ext.linear_weight_grad(torch.randn(4, 3), torch.randn(4), True)
    with pytest.raises(RuntimeError, match="linear_weight_grad: expected grad of dtype Float, got Double"):
        torch.ops.sam2_fast_ext.linear_weight_grad(torch.randn(4, 3).double(), torch.randn(4, 2).double(), True)
    with pytest.raises(RuntimeError, match="linear_weight_grad: expected input of dtype Float, got BFloat16"):
        torch.ops.sam2_fast_ext.linear_weight_grad(torch.randn(4, 3), torch.randn(4, 2).bfloat16(), True)
    torch.library.opcheck(torch.ops.sam2_fast_ext.linear_weight_grad.default,
                          (torch.randn(9, 3), torch.randn(9, 5), True))


@needs_onednn
@needs_brgemm
def test_training_gemms_use_the_brgemm_kernels(library, monkeypatch):
    library("onednn")
    calls = []
    product, weight_grad = cpu_gemm._linear_product, cpu_gemm._linear_weight_grad
    def spied_product(rows, w, b):
        calls.append(("product", tuple(w.shape), b is not None))
        return product(rows, w, b)

    def spied_weight_grad(g, rows, with_bias):
        calls.append(("weight_grad", with_bias))
        return weight_grad(g, rows, with_bias)

    monkeypatch.setattr(cpu_gemm, "_linear_product", spied_product)
    monkeypatch.setattr(cpu_gemm, "_linear_weight_grad", spied_weight_grad)
    x, weight, bias, _ = (t.requires_grad_(True) for t in _operands())
    dense.linear(x, weight, bias).square().sum().backward()
    # the product, then the input's gradient (g @ weight, weight passed transposed), then the weight's and bias's
    assert calls == [("product", (40, 24), True), ("product", (24, 40), False), ("weight_grad", True)]
    calls.clear()
    monkeypatch.setattr(cpu_gemm, "_use_brgemm_kernels", False)
    dense.linear(x, weight, bias).square().sum().backward()
    assert calls == []


def _linear_operands(shape, weight_layout, generator):
    rows, in_features, out_features = shape
    x = torch.randn(rows, in_features + 3, generator=generator)[:, :in_features]  # strided rows
    weight = torch.randn(out_features, in_features, generator=generator)
    if weight_layout == "transposed":  # an (K, N) matrix's transpose, as the input's gradient passes it
        weight = weight.t().contiguous().t()
    elif weight_layout == "strided":
        weight = torch.randn(out_features, 2 * in_features, generator=generator)[:, ::2]
    return x, weight, torch.randn(out_features, generator=generator)


@needs_brgemm
@pytest.mark.parametrize("shape", [(300, 37, 20), (130, 300, 130), (1, 8, 3), (65, 600, 70), (5, 0, 7)],
                         ids=["ragged", "three_chains", "one_row", "deep", "no_depth"])
@pytest.mark.parametrize("weight_layout", ["rows", "transposed", "strided"])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("threads", [1, 2])
def test_linear_kernel_matches_float64(shape, weight_layout, with_bias, threads):
    # Tiles of 64 x 64 and chains of 128 products, with remainders in every dimension.
    x, weight, bias = _linear_operands(shape, weight_layout, torch.Generator().manual_seed(8))
    bias = bias if with_bias else None
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = torch.ops.sam2_fast_ext.linear(x, weight, bias)
    finally:
        torch.set_num_threads(before)
    expected = x.double() @ weight.double().t() + (0 if bias is None else bias.double())
    assert out.shape == (shape[0], shape[2]) and out.is_contiguous() and out.dtype == torch.float32
    # fp32 sums of K O(1) products, in chains of at most 128: within fp32 rounding of the largest partial sums.
    assert_close_verbose(out, expected.float(), atol=2e-5 * max(shape[1], 1) ** 0.5, name="linear")


@needs_brgemm
def test_linear_kernel_sums_chains_of_at_most_128_products():
    # One output: 2**24, then 127 zeros, then 128 ones. Summed in one chain each 1 is lost against 2**24 (fp32 has 24
    # bits); summed in chains of 128 the second chain holds all 128 and the total 2**24 + 128 is exact.
    x = torch.zeros(1, 256)
    x[0, 0], x[0, 128:] = 2.0**24, 1.0
    out = torch.ops.sam2_fast_ext.linear(x, torch.ones(1, 256), None)
    assert out.item() == 2.0**24 + 128


@needs_brgemm
def test_linear_kernel_checks_and_opcheck():
    with pytest.raises(RuntimeError, match=r"expected input \(M, K\) and weight \(N, K\), got \[4, 3\] and \[5, 2\]"):
        torch.ops.sam2_fast_ext.linear(torch.randn(4, 3), torch.randn(5, 2), None)
    with pytest.raises(RuntimeError, match=r"linear: expected weight of shape \(N, K\), got \[5, 3, 1\]"):
        torch.ops.sam2_fast_ext.linear(torch.randn(4, 3), torch.randn(5, 3, 1), None)
    with pytest.raises(RuntimeError, match="linear: expected input of dtype Float, got Double"):
        torch.ops.sam2_fast_ext.linear(torch.randn(4, 3).double(), torch.randn(5, 3).double(), None)
    with pytest.raises(RuntimeError, match="linear: expected weight of dtype Float, got Half"):
        torch.ops.sam2_fast_ext.linear(torch.randn(4, 3), torch.randn(5, 3).half(), None)
    with pytest.raises(RuntimeError, match=r"linear: expected bias of shape \[5\], got \[4\]"):
        torch.ops.sam2_fast_ext.linear(torch.randn(4, 3), torch.randn(5, 3), torch.randn(4))
    with pytest.raises(RuntimeError, match="linear: expected bias of dtype Float, got Double"):
        torch.ops.sam2_fast_ext.linear(torch.randn(4, 3), torch.randn(5, 3), torch.randn(5).double())
    linear = torch.ops.sam2_fast_ext.linear.default
    torch.library.opcheck(linear, (torch.randn(9, 3), torch.randn(5, 3), torch.randn(5)))
    torch.library.opcheck(linear, (torch.randn(9, 3), torch.randn(3, 5).t(), None))


def _broadcast(values: torch.Tensor, along: str) -> torch.Tensor:
    """values' first row (along "rows") or first column (along "columns") expanded over the others: stride 0."""
    return values[:1].expand(values.shape) if along == "rows" else values[:, :1].expand(values.shape)


@needs_brgemm
@pytest.mark.parametrize("rows", [1, 67], ids=["one_row", "ragged"])
@pytest.mark.parametrize("along", ["rows", "columns"])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_linear_kernels_read_a_broadcast_gradient(rows, along, threads):
    # A loss over pooled features (out.sum((2, 3)).square()) hands the GEMMs of the layers below it an expanded
    # gradient: stride 0 along its rows, or along its columns. linear (the input's gradient, g @ W with W passed
    # transposed) and linear_weight_grad must read what is there, not rows one leading dimension apart.
    generator = torch.Generator().manual_seed(rows)
    grad = _broadcast(torch.randn(rows, 48, generator=generator), along)
    weight = torch.randn(48, 40, generator=generator)  # (out_features, in_features)
    x = torch.randn(rows, 40, generator=generator)
    assert 0 in grad.stride() or rows == 1
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        grad_x = torch.ops.sam2_fast_ext.linear(grad, weight.t(), None)
        grad_weight, grad_bias = torch.ops.sam2_fast_ext.linear_weight_grad(grad, x, True)
    finally:
        torch.set_num_threads(before)
    # fp32 sums of at most 67 O(1) products, in chains of at most 128: within fp32 rounding of the partial sums.
    atol = 2e-5 * 67 ** 0.5
    assert_close_verbose(grad_x, (grad.double() @ weight.double()).float(), atol=atol, name="input grad")
    assert_close_verbose(grad_weight, (grad.double().t() @ x.double()).float(), atol=atol, name="weight grad")
    assert_close_verbose(grad_bias, grad.double().sum(0).float(), atol=atol, name="bias grad")
