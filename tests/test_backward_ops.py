"""The backward of each op on every CPU backend that claims one (``sam2_fast.active_backward``): float64 gradcheck
of each backward kernel, agreement with autograd of the torch implementation in fp32/bf16/fp16, max_pool2d's tie
rule, opcheck of the backward ops, and a training step traced by torch.compile.

The Triton backward kernels have their own test files (run under the Triton interpreter).
"""

from __future__ import annotations

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

import sam2_fast
from sam2_fast.backends import extension as _extension, torch_ops
from sam2_fast import ops
from sam2_fast.ops import registry, specs
from sam2_fast.testing.reference import build_reference_encoder

from helpers import (
    assert_clear_of_max_pool_ties, assert_close_verbose, assert_max_pool_gaps_exceed, brgemm_f32_usable,
    check_gradients, max_abs_error, max_pool_gaps, q_pool_input, recorded_max_pool_inputs, seeded_state, ulp,
)

# Backends with a backward (kernel or formula) for some op on CPU.
BACKENDS = sorted({backend for (_, backend, device_type) in registry._BACKWARDS if device_type == "cpu"
                   and ops.backend_status("cpu")[backend]["maxpool2x2"] == "available"})
REFERENCES = {spec.name: spec.reference for spec in specs.OP_SPECS}
if not BACKENDS:
    pytest.skip("no backend with a CPU backward kernel here (the C++ extension is not built)", allow_module_level=True)


class _KernelBackward(torch.autograd.Function):
    """``op``'s torch implementation forward (exact in float64) with ``backend``'s backward: gradcheck then checks
    the backward alone (the fast forwards accumulate in fp32 whatever the input dtype)."""

    @staticmethod
    def forward(ctx, op, backend, *inputs):
        output = REFERENCES[op](*inputs)
        ctx.backward, ctx.inputs, ctx.output = registry._BACKWARDS[(op, backend, "cpu")], inputs, output
        return output

    @staticmethod
    def backward(ctx, grad_output):
        return (None, None, *ctx.backward.fn(grad_output.contiguous(), ctx.inputs, ctx.output.contiguous()))


def _claims(op: str, backend: str) -> bool:
    return (op, backend, "cpu") in registry._BACKWARDS


# (B, H, W, heads, head_dim, window, q_pool, add_bias, with_bias): padding on one or both sides, an odd head_dim,
# q-pooling inside padded windows and on odd maps (floor), a window that pools to nothing, the bias added as read.
WINDOW_CASES = [
    (2, 5, 11, 2, 3, 4, False, False, True),
    (1, 10, 6, 2, 2, 4, True, False, True),
    (1, 7, 9, 1, 3, 14, True, True, True),
    (2, 9, 5, 1, 4, 4, True, False, False),
    (1, 8, 8, 2, 2, 8, False, True, True),
    (1, 5, 5, 1, 2, 4, True, False, True),  # the last window row holds one map row: it pools to nothing
]
GLOBAL_CASES = [(2, 3, 5, 2, 3, False), (1, 5, 4, 1, 4, True)]


def _window_inputs(case, dtype=torch.float64, generator=None):
    batch, height, width, heads, head_dim, window, q_pool, add_bias, with_bias = case
    dim = heads * head_dim
    generator = generator or torch.Generator().manual_seed(0)
    qkv = torch.randn(batch, height, width, 3 * dim, generator=generator, dtype=torch.float64).to(dtype)
    bias = torch.randn(3 * dim, generator=generator, dtype=torch.float64).to(dtype) if with_bias else None
    return (qkv, bias, heads, window, q_pool, add_bias)


def _global_inputs(case, dtype=torch.float64):
    batch, height, width, heads, head_dim, q_pool = case
    qkv = torch.randn(batch, height, width, 3 * heads * head_dim, generator=torch.Generator().manual_seed(1),
                      dtype=torch.float64).to(dtype)
    return (qkv, heads, q_pool)


# gradcheck's finite differences step each input by up to eps (1e-6): a max-pool window whose two largest values lie
# closer than twice that may swap them between the two evaluations, and the difference quotient is then no gradient.
GRADCHECK_EPS = 1e-6


def _gradcheck(op, backend, inputs, pooled=None):
    """gradcheck of ``op``'s ``backend`` backward; ``pooled`` (N, C, H, W) is what the op max-pools, if it does."""
    if pooled is not None:
        assert_max_pool_gaps_exceed(pooled, 2 * GRADCHECK_EPS, f"{op} gradcheck input")
    inputs = tuple(t.requires_grad_(True) if isinstance(t, torch.Tensor) else t for t in inputs)
    # fast_mode checks random projections of the Jacobian: the whole of it costs minutes at these sizes.
    assert torch.autograd.gradcheck(lambda *args: _KernelBackward.apply(op, backend, *args), inputs,
                                    eps=GRADCHECK_EPS, fast_mode=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_active_backward_names_the_kernels(backend):
    with sam2_fast.use_backend(backend):
        status = sam2_fast.active_backward("cpu")
    for op in ("window_attention", "global_attention", "maxpool2x2", "fpn_upsample_add"):
        found = registry._BACKWARDS.get((op, backend, "cpu"))
        expected = "recompute" if found is None else (f"{backend} kernel" if found.kind == "kernel" else "formula")
        assert status[op] == expected, op
    assert status["bias_gelu_"] == status["sine_position_encoding"] == "none"
    with sam2_fast.use_backend("torch"):
        assert set(sam2_fast.active_backward("cpu").values()) <= {"torch autograd", "none"}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", WINDOW_CASES)
def test_window_attention_backward_gradcheck(backend, case):
    if not _claims("window_attention", backend):
        pytest.skip(f"{backend} has no window_attention backward")
    qkv, bias, heads, window, q_pool, add_bias = inputs = _window_inputs(case)
    _gradcheck("window_attention", backend, inputs, q_pool_input(qkv, bias, add_bias) if q_pool else None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", GLOBAL_CASES)
def test_global_attention_backward_gradcheck(backend, case):
    if not _claims("global_attention", backend):
        pytest.skip(f"{backend} has no global_attention backward")
    qkv, heads, q_pool = inputs = _global_inputs(case)
    _gradcheck("global_attention", backend, inputs, q_pool_input(qkv, None, False) if q_pool else None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(2, 5, 7, 3), (1, 4, 6, 1)])
def test_maxpool2x2_backward_gradcheck(backend, shape):
    if not _claims("maxpool2x2", backend):
        pytest.skip(f"{backend} has no maxpool2x2 backward")
    x = torch.randn(shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    _gradcheck("maxpool2x2", backend, (x,), x.permute(0, 3, 1, 2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fpn_upsample_add_backward_matches_autograd(backend):
    # The top-down term is upsampled in float32 (as in the reference), too coarse for finite differences.
    generator = torch.Generator().manual_seed(7)
    lateral = torch.randn(2, 3, 6, 4, generator=generator).bfloat16().requires_grad_(True)
    prev = torch.randn(2, 3, 3, 2, generator=generator, requires_grad=True)
    grad_out = torch.randn(2, 3, 6, 4, generator=generator)
    expected = torch.autograd.grad(torch_ops.fpn_upsample_add(lateral, prev), (lateral, prev), grad_out)
    actual = torch.autograd.grad(_KernelBackward.apply("fpn_upsample_add", backend, lateral, prev), (lateral, prev),
                                 grad_out)
    for name, a, e in zip(("lateral", "prev"), actual, expected):
        # prev's gradient sums four fp32 values, in another order than autograd's.
        assert_close_verbose(a, e, atol=1e-6, rtol=1e-6, name=f"grad {name}")


# Low precision: the kernel reads bf16/fp16 inputs, computes in fp32 and rounds each gradient once; it also takes
# D = rowsum(dO * O) from the output as the forward rounded it. Against float64 autograd on the same rounded inputs
# its worst error, relative to the gradient's magnitude, is a few units of the dtype's rounding (2^-8 bf16, 2^-11
# fp16); fp32 stays within float rounding of the O(1) values.
RELATIVE_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2**-6, torch.float16: 2**-9}


@pytest.fixture(params=["brgemm", "blas"])
def products(request):
    """The extension's attention backward with its products on ATen's brgemm, or on the BLAS."""
    if _extension.load_error() is not None:
        yield None
        return
    from sam2_fast import _C

    if request.param == "brgemm" and not _C.brgemm_f32_usable():
        pytest.skip("ATen's fp32 brgemm is not usable here: oneDNN is disabled in torch, or its one-time check "
                    "failed (it runs on oneDNN's micro-kernels from AVX2 up; see csrc/common/brgemm_f32.h)")
    _C.set_brgemm_attention_backward(request.param == "brgemm")
    try:
        yield request.param
    finally:
        _C.set_brgemm_attention_backward(True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", list(RELATIVE_TOLERANCE))
@pytest.mark.parametrize("case", WINDOW_CASES[:4] + [(2, 9, 13, 2, 16, 8, True, False, True)])
def test_window_attention_op_gradients_per_dtype(backend, dtype, case, products):
    # Through the op layer as the model calls it: the fast forward, its autograd formula, the backward kernel (with
    # its products on brgemm and on the BLAS). The last case has full 8 x 8 blocks for the register transposes.
    if backend != "extension" and products == "brgemm":
        pytest.skip("the product choice is the extension's")
    qkv, bias, heads, window, q_pool, add_bias = _window_inputs(case, dtype)
    if q_pool and add_bias:
        # The float64 autograd below pools exactly what the op reads; only where the op adds the bias does a path
        # round what it pools. Rounding is monotonic: it cannot swap two values, only make them equal (max_pool2d
        # then takes the first), which takes two values within one ulp of the dtype.
        pooled = q_pool_input(qkv, bias, add_bias)
        window_magnitude = torch.nn.functional.max_pool2d(pooled.abs(), 2)
        assert_max_pool_gaps_exceed(pooled, ulp(window_magnitude, dtype), f"q + bias in {dtype}")
    leaves = [t.requires_grad_(True) for t in (qkv, bias) if t is not None]
    with sam2_fast.use_backend(backend):
        out = ops.window_attention(qkv, bias, heads, window, q_pool, add_bias)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(dtype)
    actual = torch.autograd.grad(out, leaves, grad_out)
    exact_leaves = [t.detach().double().requires_grad_(True) for t in leaves]
    exact_bias = exact_leaves[1] if bias is not None else None
    exact_out = torch_ops.window_attention(exact_leaves[0], exact_bias, heads, window, q_pool, add_bias)
    expected = torch.autograd.grad(exact_out, exact_leaves, grad_out.double())
    for name, a, e in zip(("qkv", "qkv_bias"), actual, expected):
        assert a.dtype == dtype, f"{name}: dtype {a.dtype}"
        error = max_abs_error(a, e) / e.abs().max().item()
        assert error <= RELATIVE_TOLERANCE[dtype], f"{name}: relative error {error:.3g} ({dtype})"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("add_bias", [False, True])
def test_q_pool_gradient_follows_max_pool2d_ties(backend, add_bias):
    # q channels of few distinct values: most 2x2 groups tie, and max_pool2d gives the gradient to the first maximum
    # in its scan order (top-left, top-right, bottom-left, bottom-right); a bias keeps the ties as they are.
    generator = torch.Generator().manual_seed(3)
    qkv = torch.randn(2, 8, 6, 3 * 8, generator=generator, dtype=torch.float64)
    qkv[..., :8] = torch.randint(0, 2, (2, 8, 6, 8), generator=generator).double()
    bias = torch.randn(3 * 8, generator=generator, dtype=torch.float64)
    inputs = [qkv.requires_grad_(True), bias.requires_grad_(True)]
    grad_out = torch.randn(2, 4, 3, 8, generator=generator, dtype=torch.float64)
    expected = torch.autograd.grad(torch_ops.window_attention(*inputs, 2, 4, True, add_bias), inputs, grad_out)
    actual = torch.autograd.grad(
        _KernelBackward.apply("window_attention", backend, *inputs, 2, 4, True, add_bias), inputs, grad_out
    )
    for name, a, e in zip(("qkv", "qkv_bias"), actual, expected):
        assert_close_verbose(a, e, atol=1e-12, name=f"grad {name}")
    x = torch.randint(0, 2, (2, 5, 7, 3), generator=generator).double().requires_grad_(True)
    pooled_grad = torch.randn(2, 2, 3, 3, generator=generator, dtype=torch.float64)
    assert_close_verbose(
        torch.autograd.grad(_KernelBackward.apply("maxpool2x2", backend, x), x, pooled_grad)[0],
        torch.autograd.grad(torch_ops.maxpool2x2(x), x, pooled_grad)[0], name="maxpool2x2 grad x",
    )


def test_max_pool_gaps_count_equal_maxima_once():
    # helpers.max_pool_gaps, which the tie margins of the gradient tests rest on: the largest value minus the next
    # smaller one per 2x2 window (floor), equal maxima (exact copies, such as padded tokens) counted once.
    x = torch.tensor([[1.0, 2.0, 5.0, 5.0, 9.0],
                      [0.0, 1.5, 5.0, 4.0, 9.0],
                      [3.0, 3.0, 1.0, 1.0, 9.0]], dtype=torch.float64)[None, None]
    torch.testing.assert_close(max_pool_gaps(x), torch.tensor([[[[0.5, 1.0]]]], dtype=torch.float64))
    assert max_pool_gaps(torch.ones(1, 1, 2, 2)).item() == float("inf")
    assert ulp(torch.tensor([1.0, 3.0]), torch.bfloat16).tolist() == [2**-7, 2**-6]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 32, 32, 2, 24), (1, 16, 16, 1, 40)], ids=["1024_keys", "256_keys"])
def test_global_attention_backward_products_agree(shape, dtype):
    # Global attention with 1024 and 256 keys (their score rows are padded in the kernel's buffers), on brgemm and
    # on the BLAS, against float64 autograd of the torch implementation on the same inputs.
    if "extension" not in BACKENDS or not brgemm_f32_usable():
        pytest.skip("needs the extension with a working fp32 brgemm")
    from sam2_fast import _C

    batch, height, width, heads, head_dim = shape
    generator = torch.Generator().manual_seed(5)
    qkv = torch.randn(batch, height, width, 3 * heads * head_dim, generator=generator).to(dtype)
    out = torch.ops.sam2_fast_ext.global_attention(qkv, heads, False)
    grad_out = torch.randn(out.shape, generator=generator).to(dtype)
    exact_qkv = qkv.double().requires_grad_(True)
    (expected,) = torch.autograd.grad(torch_ops.global_attention(exact_qkv, heads, False), exact_qkv,
                                      grad_out.double())
    for use_brgemm in (True, False):
        _C.set_brgemm_attention_backward(use_brgemm)
        try:
            grad_qkv, _ = torch.ops.sam2_fast_ext.attention_backward(grad_out, qkv, None, out, heads, 0, False, False)
        finally:
            _C.set_brgemm_attention_backward(True)
        error = max_abs_error(grad_qkv, expected) / expected.abs().max().item()
        assert error <= RELATIVE_TOLERANCE[dtype], f"brgemm={use_brgemm}: relative error {error:.3g} ({dtype})"


@pytest.mark.skipif(_extension.load_error() is not None, reason="the C++ extension is not built")
def test_brgemm_product_choice():
    from sam2_fast import _C
    from sam2_fast.backends.precision import brgemm_attention_backward

    assert _C.brgemm_attention_backward() == _C.brgemm_f32_usable() == brgemm_attention_backward()
    _C.set_brgemm_attention_backward(False)
    try:
        assert not _C.brgemm_attention_backward()
    finally:
        _C.set_brgemm_attention_backward(True)
    with torch.backends.mkldnn.flags(enabled=False):
        assert not _C.brgemm_attention_backward()


@pytest.mark.skipif(_extension.load_error() is not None, reason="the C++ extension is not built")
@pytest.mark.parametrize("shapes, heads, window, q_pool, add_bias", [
    ([(2, 5, 11, 6), (2, 5, 11, 18), (18,), (2, 5, 11, 6)], 2, 4, False, True),
    ([(1, 2, 3, 8), (1, 5, 6, 24), None, (1, 2, 3, 8)], 2, 0, True, False),
], ids=["window", "global_q_pool"])
def test_attention_backward_opcheck(shapes, heads, window, q_pool, add_bias):
    # (grad_out, qkv, bias, out): opcheck compares the op with its fake and its traced self, the same kernel on the
    # same values, so any values do.
    generator = torch.Generator().manual_seed(8)
    grad_out, qkv, bias, out = (None if shape is None else torch.randn(shape, generator=generator) for shape in shapes)
    torch.library.opcheck(torch.ops.sam2_fast_ext.attention_backward.default,
                          (grad_out, qkv, bias, out, heads, window, q_pool, add_bias))


@pytest.mark.skipif(_extension.load_error() is not None, reason="the C++ extension is not built")
def test_maxpool2x2_backward_opcheck():
    generator = torch.Generator().manual_seed(9)
    torch.library.opcheck(torch.ops.sam2_fast_ext.maxpool2x2_backward.default,
                          (torch.randn(2, 2, 3, 5, generator=generator), torch.randn(2, 5, 7, 5, generator=generator)))


# The compiled training step's image: its forward keeps the reference's max-pools clear of ties
# (helpers.MAX_POOL_MARGIN; checked in the test). About half of the seeds qualify at this size.
COMPILED_STEP_IMAGE_SEED = 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_training_step_traces_the_backward_kernels(backend):
    # torch.compile of forward + backward: AOTAutograd traces the autograd formulas, so the graphs hold the backward
    # kernels (through their fakes), and the compiled step's gradients are as accurate as the eager step's. The two
    # are fp32 paths that round differently (the traced graph decomposes some ops; measured 1e-6 of each gradient's
    # magnitude apart), so each is held to the float64 truth, as in test_training: within twice the fp32
    # reference's own error (helpers.check_gradients), on an image that keeps the max-pools clear of ties, where a
    # path could otherwise send a gradient to another pixel (a whole element's difference, not rounding).
    name = "sam2.1_hiera_tiny"
    image = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(COMPILED_STEP_IMAGE_SEED))

    def step(model, parameters_of=None, x=image):
        parameters_of = parameters_of or model
        parameters_of.zero_grad(set_to_none=True)
        loss = sum(t.square().mean() for t in model(x)["backbone_fpn"])
        loss.backward()
        return {parameter_name: p.grad for parameter_name, p in parameters_of.named_parameters()}

    reference, exact = (build_reference_encoder(name).to(dtype).train() for dtype in (torch.float32, torch.float64))
    for model in (reference, exact):
        model.load_state_dict(seeded_state(name))
    with recorded_max_pool_inputs(reference) as fp32_pools:
        reference_grads = step(reference)
    with recorded_max_pool_inputs(exact) as exact_pools:
        truth = step(exact, x=image.double())
    assert_clear_of_max_pool_ties(exact_pools, fp32_pools, "COMPILED_STEP_IMAGE_SEED")

    backward_targets = set()

    def record_backward(graph_module, example_inputs):
        backward_targets.update(str(node.target) for node in graph_module.graph.nodes if node.op == "call_function")
        return make_boxed_func(graph_module.forward)

    encoder = sam2_fast.build_image_encoder(name).train()
    encoder.load_state_dict(seeded_state(name))
    torch._dynamo.reset()
    with sam2_fast.use_backend(backend):
        eager = step(encoder)
        compiled = torch.compile(
            encoder, fullgraph=True,
            backend=aot_autograd(fw_compiler=lambda gm, _: make_boxed_func(gm.forward), bw_compiler=record_backward),
        )
        compiled_grads = step(compiled, parameters_of=encoder)
    check_gradients(eager, reference_grads, truth, label="eager")
    check_gradients(compiled_grads, reference_grads, truth, label="compiled")
    kernels = {f"sam2_fast_ext.{op}.default" for op in ("attention_backward", "maxpool2x2_backward")}
    if backend == "extension":
        assert kernels <= backward_targets, f"backward graph lacks {kernels - backward_targets}"
