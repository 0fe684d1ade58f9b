"""The op layer and its torch backend: each op against the `sam2` package's own code path, backend selection,
custom-op registration (opcheck) and gradients."""

import pytest
import torch
import torch.nn.functional as F
from sam2.modeling.backbones.hieradet import MultiScaleAttention as ReferenceAttention
from sam2.modeling.backbones.utils import window_partition, window_unpartition
from sam2.modeling.position_encoding import PositionEmbeddingSine as ReferenceSine

import sam2_fast
from sam2_fast import ops
from sam2_fast.backends import torch_ops
from sam2_fast.ops import dispatch, specs

from helpers import (
    assert_close_verbose, assert_error_within, assert_max_pool_gaps_exceed, global_rng_seeded, q_pool_input,
)

# fp32 attention against sam2's sequence: the two round differently (other kernels, other strides), and neither is
# the truth (over 256 keys, most of them equal padded tokens, ATen's SDPA in sam2's sequence is 1e-5 off float64,
# the extension's kernel 4e-7), so both are measured against sam2's sequence in float64: ours may be off by twice
# sam2's own fp32 error, plus two ulps of the output's magnitude for a reference that rounds luckily. A q-pool
# near-tie cannot matter in a forward: whichever of two values wins, the output moves by their gap, which is within
# the rounding that swapped them.
def _assert_as_accurate_as_sam2(name: str, actual: torch.Tensor, expected: torch.Tensor, exact: torch.Tensor):
    floor = 2 * torch.finfo(actual.dtype).eps * exact.abs().max().item()
    assert_error_within(name, actual, expected, exact, 2.0, floor, "sam2")


def _randn(*shape, seed: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _reference_attention(x, dim_out, num_heads, window_size, q_pool, seed=0):
    """sam2's own sequence: pad + partition, MultiScaleAttention (projection = identity), unpartition + crop; in x's
    dtype, with weights that depend on ``seed`` only."""
    pool = torch.nn.MaxPool2d(2, 2) if q_pool else None
    with global_rng_seeded(seed):
        attention = ReferenceAttention(x.shape[-1], dim_out, num_heads, q_pool=pool)
    with torch.no_grad():
        # Padded tokens carry this bias: it must not be zero in a test.
        attention.qkv.bias.copy_(_randn(*attention.qkv.bias.shape, seed=seed + 1))
        attention.proj.weight.copy_(torch.eye(dim_out))
        attention.proj.bias.zero_()
    attention.to(x.dtype)
    height, width = x.shape[1:3]
    if window_size:
        windows, pad_hw = window_partition(x, window_size)
        out = attention(windows)
        if q_pool:
            window_size //= 2
            height, width = height // 2, width // 2
            pad_hw = tuple(s + (window_size - s % window_size) % window_size for s in (height, width))
        out = window_unpartition(out, window_size, pad_hw, (height, width))
    else:
        out = attention(x)
    return out, attention.qkv


WINDOW_CASES = [
    # (B, H, W, dim_in, dim_out, heads, window, q_pool)
    (1, 8, 8, 16, 16, 1, 8, False),
    (2, 5, 11, 16, 24, 2, 4, False),  # padding on both sides, odd head_dim 12
    (1, 10, 6, 8, 16, 2, 4, True),  # q-pool with padding
    (3, 7, 9, 8, 16, 1, 14, True),  # one window, mostly padding, odd map -> floor pooling
    (1, 6, 10, 8, 8, 2, 16, False),
    (1, 14, 14, 8, 16, 2, 7, False),
]


@pytest.mark.parametrize("case", WINDOW_CASES)
def test_window_attention_matches_sam2(case):
    batch, height, width, dim_in, dim_out, heads, window, q_pool = case
    x = _randn(batch, height, width, dim_in, seed=11)
    with torch.no_grad():
        expected, qkv_linear = _reference_attention(x, dim_out, heads, window, q_pool)
        exact, _ = _reference_attention(x.double(), dim_out, heads, window, q_pool)
        actual = ops.window_attention(qkv_linear(x), qkv_linear.bias, heads, window, q_pool)
    _assert_as_accurate_as_sam2("window_attention", actual, expected, exact)


@pytest.mark.parametrize("q_pool", [False, True])
def test_global_attention_matches_sam2(q_pool):
    x = _randn(2, 7, 10, 16, seed=12)
    with torch.no_grad():
        expected, qkv_linear = _reference_attention(x, 32, 2, 0, q_pool)
        exact, _ = _reference_attention(x.double(), 32, 2, 0, q_pool)
        actual = ops.global_attention(qkv_linear(x), 2, q_pool)
    _assert_as_accurate_as_sam2("global_attention", actual, expected, exact)


def test_maxpool_and_fpn_match_torch_sequences():
    # Both pool the same values and add the same two numbers once: equal bit for bit.
    x = _randn(2, 9, 7, 13, seed=13)
    expected = torch.nn.MaxPool2d(2, 2)(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    torch.testing.assert_close(ops.maxpool2x2(x), expected, atol=0, rtol=0)
    lateral, prev = _randn(2, 5, 6, 8, seed=14).bfloat16(), _randn(2, 5, 3, 4, seed=15).bfloat16()
    fused = ops.fpn_upsample_add(lateral, prev)
    assert fused.dtype == torch.float32  # the reference upsamples in float32
    torch.testing.assert_close(fused, lateral + F.interpolate(prev.float(), scale_factor=2.0, mode="nearest"),
                               atol=0, rtol=0)


@pytest.mark.parametrize("size", [(4, 4), (16, 24), (7, 3)])
def test_sine_position_encoding_matches_sam2(size):
    reference = ReferenceSine(256, warmup_cache=False)
    ours = sam2_fast.PositionEmbeddingSine(256, warmup_cache=False)
    x = torch.zeros(3, 8, *size)
    expected = reference(x)
    actual = ours(x)
    torch.testing.assert_close(actual, expected, atol=0, rtol=0)
    assert actual.shape == (3, 256, *size)
    # One cached encoding, broadcast over the batch instead of copied per image.
    assert actual.stride(0) == 0
    assert ours(x, dtype=torch.bfloat16).dtype == torch.bfloat16


def _leaf(*shape, seed: int) -> torch.Tensor:
    return _randn(*shape, seed=seed, dtype=torch.float64).requires_grad_(True)


# opcheck compares each op with its fake and with itself traced: the same implementation on the same values. One
# case per custom op the specs derive (every op with a Triton kernel).
OPCHECK_CASES = {
    "window_attention": lambda: (_leaf(1, 5, 3, 3 * 4, seed=16), _leaf(3 * 4, seed=17), 2, 4, True, True, "torch"),
    "global_attention": lambda: (_leaf(1, 4, 6, 3 * 8, seed=18), 2, True, "torch"),
    "maxpool2x2": lambda: (_leaf(2, 5, 7, 3, seed=19), "torch"),
    "fpn_upsample_add": lambda: (_leaf(1, 3, 4, 6, seed=20), _leaf(1, 3, 2, 3, seed=21), "torch"),
}


def test_every_custom_op_has_an_opcheck_case():
    assert set(OPCHECK_CASES) == {spec.name for spec in specs.OP_SPECS if spec.triton}


@pytest.mark.parametrize("op", [spec.name for spec in specs.OP_SPECS if spec.triton])
def test_custom_op_registration_opcheck(op):
    # Checks schema, fake (meta) implementation, autograd registration and dispatch of each sam2_fast custom op.
    options = {}
    if op == "window_attention":
        # aot_dispatch_dynamic traces the recompute backward with symbolic shapes: 20 s on 2 cores for this one
        # op; test_compile.py traces the same op through the whole encoder.
        options["test_utils"] = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(getattr(torch.ops.sam2_fast, op).default, OPCHECK_CASES[op](), **options)


def test_q_pool_needs_even_window():
    with sam2_fast.use_backend("torch"), pytest.raises(ValueError, match="needs an even window_size, got 7"):
        ops.window_attention(torch.zeros(1, 21, 14, 12), None, 1, 7, True)


@pytest.mark.parametrize("add_bias", [False, True])
def test_custom_op_gradients_match_torch_path(add_bias):
    # The recompute backward of the custom ops gives the torch implementation's gradients. gradcheck steps one input
    # at a time by eps: the q-pool's windows must keep their two largest values further apart than that.
    qkv, bias = _leaf(1, 6, 5, 3 * 8, seed=22), _leaf(3 * 8, seed=23)
    eps = 1e-6
    assert_max_pool_gaps_exceed(q_pool_input(qkv.detach(), bias.detach(), add_bias), eps, "gradcheck's q")
    torch.autograd.gradcheck(
        lambda q, b: torch.ops.sam2_fast.window_attention(q, b, 2, 4, True, add_bias, "torch"), (qkv, bias), eps=eps
    )
    # fpn_upsample_add upsamples in float32 (as the reference does), too coarse for finite differences:
    # compare its gradients with autograd's through the torch implementation instead. Both run the same torch ops;
    # prev's gradient sums four fp32 values, in an order either may choose: assert_close's fp32 defaults (1.3e-6
    # relative) hold that.
    lateral, prev = _randn(1, 2, 4, 4, seed=24).requires_grad_(True), _randn(1, 2, 2, 2, seed=25).requires_grad_(True)
    grad_out = _randn(1, 2, 4, 4, seed=26)
    fast = torch.autograd.grad(torch.ops.sam2_fast.fpn_upsample_add(lateral, prev, "torch"), (lateral, prev), grad_out)
    plain = torch.autograd.grad(torch_ops.fpn_upsample_add(lateral, prev), (lateral, prev), grad_out)
    for a, b in zip(fast, plain):
        torch.testing.assert_close(a, b)


def test_backend_selection():
    assert sam2_fast.get_backend() == "auto"
    with sam2_fast.use_backend("torch"):
        assert sam2_fast.get_backend() == "torch"
        assert set(sam2_fast.active_backends("cpu").values()) == {"torch"}
    assert sam2_fast.get_backend() == "auto"
    with pytest.raises(ValueError, match="unknown sam2_fast backend 'cuda'"):
        sam2_fast.set_backend("cuda")
    status = sam2_fast.backend_status("cpu")
    assert set(status) == {"torch", "triton", "extension"}
    assert set(status["torch"].values()) == {"available"}


@pytest.mark.skipif(dispatch._triton_runs_on("cpu"), reason="under TRITON_INTERPRET=1 triton does run on CPU")
def test_explicit_unavailable_backend_names_what_is_missing():
    with sam2_fast.use_backend("triton"), pytest.raises(sam2_fast.BackendUnavailableError, match="cannot run maxpool2x2: "):
        ops.maxpool2x2(torch.zeros(1, 2, 2, 1))


def test_environment_variable_selects_backend():
    import subprocess
    import sys

    code = "import sam2_fast; print(sam2_fast.get_backend())"
    env = {"SAM2_FAST_BACKEND": "torch", "PATH": ""}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "torch"
    env["SAM2_FAST_BACKEND"] = "fastest"
    failed = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert failed.returncode != 0 and "unknown sam2_fast backend 'fastest'" in failed.stderr


def test_encoder_gradients_flow():
    # Fine-tuning: every parameter gets a gradient through the torch path.
    with global_rng_seeded(0):
        encoder = sam2_fast.build_image_encoder("sam2.1_hiera_tiny").train()
    with sam2_fast.use_backend("torch"):
        out = encoder(_randn(1, 3, 64, 96, seed=27))
    sum(t.float().square().mean() for t in out["backbone_fpn"]).backward()
    # The scalped coarsest level still feeds level 2 through the top-down path, so nothing is left out.
    assert [n for n, p in encoder.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0] == []


def test_auto_takes_torch_for_global_attention_on_cuda(monkeypatch):
    # Measured: torch's flash SDPA beats the Triton global kernel on CUDA, so auto takes torch for that op only.
    monkeypatch.setattr(dispatch, "_TRITON_REASON", None)
    monkeypatch.setattr(dispatch, "_TRITON_LAUNCHERS", {"window_attention": None, "global_attention": None})
    monkeypatch.setattr(dispatch, "_triton_runs_on", lambda device_type: device_type == "cuda")
    with sam2_fast.use_backend("auto"):
        assert ops.resolve_backend("global_attention", "cuda") == "torch"
        assert ops.resolve_backend("window_attention", "cuda") == "triton"
    with sam2_fast.use_backend("triton"):
        assert ops.resolve_backend("global_attention", "cuda") == "triton"


def test_explicit_backend_runs_ops_it_has_no_kernel_for_on_torch(monkeypatch):
    # The Triton backend has no sine-encoding kernel (it is computed once per size and cached): asking for
    # "triton" must still run a whole encoder, with that op on torch.
    monkeypatch.setattr(dispatch, "_TRITON_REASON", None)
    monkeypatch.setattr(dispatch, "_TRITON_LAUNCHERS", {"maxpool2x2": None})
    monkeypatch.setattr(dispatch, "_triton_runs_on", lambda device_type: device_type == "cuda")
    with sam2_fast.use_backend("triton"):
        assert ops.resolve_backend("sine_position_encoding", "cuda") == "torch"
        assert ops.resolve_backend("maxpool2x2", "cuda") == "triton"
        with pytest.raises(sam2_fast.BackendUnavailableError, match="got a cpu tensor"):
            ops.resolve_backend("maxpool2x2", "cpu")
