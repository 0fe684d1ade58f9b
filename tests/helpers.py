"""Shared test helpers: seeded reference/ours encoder pairs, error measures, verbose mismatch reports."""

from __future__ import annotations

import builtins
import contextlib
import errno
import functools
import os
from typing import Callable
from unittest import mock

import torch
import torch.nn.functional as F

import sam2_fast
from sam2_fast.testing.reference import build_reference_encoder
from sam2_fast.testing.weights import global_rng_seeded, randomize_, seeded_state  # noqa: F401 (tests import them from here)


@functools.lru_cache(maxsize=2)
def _built_pair(name: str):
    with global_rng_seeded(0):
        return build_reference_encoder(name), sam2_fast.build_image_encoder(name)


def encoder_pair(name: str, seed: int = 0):
    """(reference sam2 encoder, our encoder) with the same seeded weights, fp32 on CPU in eval mode.

    The modules are built once per config and reloaded on each call (building large costs seconds on 2 cores):
    callers that change them (dtype casts) must work on copies.
    """
    state = seeded_state(name, seed)
    reference, ours = _built_pair(name)
    for module in (reference, ours):
        module.float().eval().load_state_dict(state)
    return reference, ours


# A 2x2 max-pool routes its gradient to the largest value of each window. Where a window's largest value and the
# next one lie closer than an fp32 path's error, that path may pick the other one: every gradient upstream then
# changes by a whole element's contribution, not by rounding, and no tolerance derived from rounding holds. The
# gradient tests that cross Hiera's pools (the q-pooling of attention and the pooled shortcut of a stage's first
# block) therefore check their inputs first: in float64, each window's largest value must exceed the next smaller
# one by more than MAX_POOL_MARGIN x the fp32 reference's error at that pool. A path whose error there is within
# twice the reference's (what the gradient tests demand of ours) moves each value by at most 2x that error, so a
# gap over 4x it cannot close, in ours nor in the reference.
MAX_POOL_MARGIN = 4.0


@contextlib.contextmanager
def recorded_max_pool_inputs(model: torch.nn.Module):
    """A list that receives the input of every ``nn.MaxPool2d`` of ``model`` (the reference's q-pools and pooled
    shortcuts, (N, C, H, W), detached) run inside the block."""
    captured = []
    hooks = [module.register_forward_pre_hook(lambda _, args: captured.append(args[0].detach()))
             for module in model.modules() if isinstance(module, torch.nn.MaxPool2d)]
    try:
        yield captured
    finally:
        for hook in hooks:
            hook.remove()


def max_pool_gaps(x: torch.Tensor) -> torch.Tensor:
    """For each window of ``max_pool2d(x, 2)`` (x: (N, C, H, W); odd sizes floor), its largest value minus the next
    smaller one (inf where all four are equal). Values equal to the largest count as one: they are exact copies
    (padded tokens all carry the qkv bias), equal in every path, and max_pool2d's first-maximum rule picks the same
    one of them everywhere."""
    height, width = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
    windows = x[..., :height, :width].unfold(-2, 2, 2).unfold(-2, 2, 2).flatten(-2)
    largest = windows.amax(dim=-1, keepdim=True)
    below = windows.masked_fill(windows == largest, float("-inf")).amax(dim=-1)
    return largest.squeeze(-1) - below


def q_pool_input(qkv: torch.Tensor, qkv_bias, add_bias: bool) -> torch.Tensor:
    """What window_attention's q-pooling pools, where it matters: q of the real tokens (plus the bias where the op
    adds it), (B, dim, H, W) in float64. Windows that take in padded tokens are cropped from the output (odd sizes
    floor), so their gradients are zero whichever pixel wins."""
    dim = qkv.shape[-1] // 3
    q = qkv[..., :dim].double()
    if add_bias:
        q = q + qkv_bias[:dim].double()
    return q.permute(0, 3, 1, 2)


def ulp(magnitude: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One unit in the last place of ``dtype`` at each (positive) ``magnitude``."""
    _, exponent = torch.frexp(magnitude)  # magnitude = mantissa * 2^exponent, mantissa in [0.5, 1)
    return torch.ldexp(torch.full_like(magnitude, torch.finfo(dtype).eps), exponent - 1)


def assert_max_pool_gaps_exceed(x: torch.Tensor, margin, what: str) -> None:
    """Every window of ``max_pool2d(x, 2)`` has its largest value more than ``margin`` (a number, or one per window)
    above the next smaller one (:func:`max_pool_gaps`)."""
    gaps = max_pool_gaps(x)
    near = gaps <= margin
    assert not near.any(), (
        f"{what}: {int(near.sum())} of {near.numel()} max-pool windows have their two largest values within the "
        f"margin (smallest gap {gaps.min().item():.3g}), where rounding could send a gradient to another pixel; "
        "choose another seed"
    )


def assert_clear_of_max_pool_ties(exact_inputs: list, fp32_inputs: list, what: str) -> None:
    """Each pool's float64 input (``exact_inputs``, from :func:`recorded_max_pool_inputs`) keeps every window's two
    largest values more than MAX_POOL_MARGIN x the fp32 path's largest error at that pool apart; ``what`` names the
    seed to change otherwise."""
    assert len(exact_inputs) == len(fp32_inputs) > 0, "expected the same pools, at least one, in both paths"
    for index, (exact, approx) in enumerate(zip(exact_inputs, fp32_inputs)):
        error = max_abs_error(approx, exact)
        assert_max_pool_gaps_exceed(exact.double(), MAX_POOL_MARGIN * error,
                                    f"{what}: pool {index} {tuple(exact.shape)}, fp32 error {error:.3g}")


def flat_outputs(output: dict):
    """The encoder's output dict as a list of (name, tensor)."""
    items = [("vision_features", output["vision_features"])]
    items += [(f"backbone_fpn[{i}]", t) for i, t in enumerate(output["backbone_fpn"])]
    items += [(f"vision_pos_enc[{i}]", t) for i, t in enumerate(output["vision_pos_enc"])]
    return items


def max_abs_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.double() - expected.double()).abs().max().item()


def assert_close_verbose(actual: torch.Tensor, expected: torch.Tensor, atol: float = 0.0, rtol: float = 0.0,
                         name: str = "output") -> None:
    """assert_close that checks shape and dtype and reports the number of bad elements, the first bad ones with
    their values, and NaN/Inf mismatches."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != expected {expected.dtype}"
    actual64, expected64 = actual.detach().cpu().double(), expected.detach().cpu().double()
    nan_mismatch = actual64.isnan() != expected64.isnan()
    inf_mismatch = actual64.isinf() != expected64.isinf()
    both_finite = actual64.isfinite() & expected64.isfinite()
    difference = (actual64 - expected64).abs()
    too_far = both_finite & (difference > atol + rtol * expected64.abs())
    bad = too_far | nan_mismatch | inf_mismatch
    if bad.any():
        indices = bad.nonzero()[:8].tolist()
        details = [f"{tuple(i)}: got {actual64[tuple(i)].item():.8g}, expected {expected64[tuple(i)].item():.8g}"
                   for i in indices]
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {bad.numel()} elements differ (atol {atol}, rtol {rtol}); "
            f"NaN mismatches {int(nan_mismatch.sum())}, Inf mismatches {int(inf_mismatch.sum())}; "
            f"max abs difference {difference[both_finite].max().item() if both_finite.any() else float('nan'):.3g}; "
            "first bad:\n  " + "\n  ".join(details)
        )


def triton_test_device():
    """(device, on_gpu) for a Triton kernel test module, or a module-level skip.

    Kernels run natively on CUDA, or on CPU under the Triton interpreter (TRITON_INTERPRET=1, set before triton
    is imported, hence the own pytest process); model-sized shapes only where they run natively.
    """
    import os

    import pytest

    has_cuda = torch.cuda.is_available()
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    if not (has_cuda or interpreting):
        pytest.skip("needs a CUDA device or TRITON_INTERPRET=1 (Triton interpreter on CPU)", allow_module_level=True)
    pytest.importorskip("triton")
    return ("cuda" if has_cuda else "cpu"), has_cuda and not interpreting


# fp32: both sides do the same math; they differ only where GEMMs see a different number of rows (we project
# real tokens only, the reference also its padded ones) or where a kernel sums in another order, i.e. in float
# rounding, ~1e-7 relative per layer. Across up to 48 blocks that stays far below 1e-4 of the outputs' magnitude.
# Outputs (unlike gradients) are safe across the max-pools: where rounding swaps a window's two largest values, the
# pooled value moves by their gap, which is no larger than that rounding.
FP32_RELATIVE_TOLERANCE = 1e-4


def fp32_tolerance(expected) -> float:
    """The absolute tolerance of an fp32 result against ``expected``: FP32_RELATIVE_TOLERANCE of its largest
    magnitude (at least 1)."""
    return FP32_RELATIVE_TOLERANCE * max(torch.as_tensor(expected).abs().max().item(), 1.0)


def assert_fp32_close(actual, expected, name: str) -> None:
    """``actual`` within :func:`fp32_tolerance` of ``expected`` (tensors or arrays): the same math, differing in
    float summation order only."""
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    assert_close_verbose(actual, expected, atol=fp32_tolerance(expected), name=name)


def run_encoder(model, x: torch.Tensor, autocast_dtype=None) -> dict:
    """``model(x)`` without gradients, under autocast to ``autocast_dtype`` on x's device type if given."""
    enabled = autocast_dtype is not None
    with torch.no_grad(), torch.autocast(x.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=enabled):
        return model(x)


def check_fp32_outputs(reference_out: dict, ours_out: dict) -> float:
    """Every output of ours matches the reference's dtype and values (FP32_RELATIVE_TOLERANCE of each output's
    magnitude); returns the largest error relative to that magnitude."""
    worst = 0.0
    for (name, expected), (_, actual) in zip(flat_outputs(reference_out), flat_outputs(ours_out)):
        assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != reference {expected.dtype}"
        assert_fp32_close(actual, expected, name)
        worst = max(worst, max_abs_error(actual, expected) / max(expected.abs().max().item(), 1.0))
    return worst


def check_low_precision_outputs(exact_out: dict, reference_low_out: dict, ours_low_out: dict):
    """Our low-precision outputs must carry the reference's dtypes, and be no further from the fp32 reference
    than twice the reference's own low-precision error (plus a floor of 1% of the output's magnitude, for
    outputs that both sides compute exactly). Returns (our worst error, the reference's), relative to magnitude."""
    ours_worst = reference_worst = 0.0
    for (name, exact), (_, ref_low), (_, our_low) in zip(
        flat_outputs(exact_out), flat_outputs(reference_low_out), flat_outputs(ours_low_out)
    ):
        assert our_low.dtype == ref_low.dtype, f"{name}: dtype {our_low.dtype} != reference's {ref_low.dtype}"
        assert our_low.shape == ref_low.shape, f"{name}: shape {tuple(our_low.shape)} != {tuple(ref_low.shape)}"
        reference_error = max_abs_error(ref_low, exact)
        our_error = max_abs_error(our_low, exact)
        scale = max(exact.abs().max().item(), 1e-30)
        floor = 1e-2 * scale
        assert our_error <= 2 * reference_error + floor, (
            f"{name}: our error vs fp32 {our_error:.4g} > 2 x the reference's own {reference_error:.4g} + {floor:.3g}"
        )
        ours_worst, reference_worst = max(ours_worst, our_error / scale), max(reference_worst, reference_error / scale)
    return ours_worst, reference_worst


# fp32 gradients against the float64 truth: ours may be at most twice the reference's own fp32 error, plus a floor
# for gradients that both sides get within a few ulps (the reference's error can then be near zero by chance). All
# errors are relative to the gradient's magnitude (its largest element).
FP32_GRADIENT_ERROR_RATIO, FP32_GRADIENT_ERROR_FLOOR = 2.0, 1e-6
# The largest error of one gradient is one element's: it depends on where the rounding of its operands happens to
# land, not only on how large that rounding is. Seen on the tiny encoder with the ISA capped at AVX2: the gradient
# reaching a q-pool block's attention output had the same worst error in ours and the reference (1.1e-5 and 7.5e-6),
# but ours had it in a channel that feeds the largest row of the qkv weight's gradient, so that gradient's largest
# error came out 2.9x the reference's while its root-mean-square error was 1.14x. A gradient whose largest error
# exceeds the bound is therefore still accepted where its RMS error (relative to its RMS) is within the same ratio of
# the reference's and its largest error within twice the ratio: wrong values anywhere (a row, a bias, NaN) raise the
# RMS error too.
MAX_ERROR_SLACK_WITH_RMS = 2.0


def relative_error(actual: torch.Tensor, truth: torch.Tensor) -> float:
    """max |actual - truth| / max |truth|."""
    return ((actual.double() - truth).abs().max() / truth.abs().max().clamp_min(1e-300)).item()


def relative_rms_error(actual: torch.Tensor, truth: torch.Tensor) -> float:
    """RMS(actual - truth) / RMS(truth)."""
    return ((actual.double() - truth).square().mean().sqrt() / truth.square().mean().sqrt().clamp_min(1e-300)).item()


def check_gradients(ours: dict, reference: dict, truth: dict, ratio: float = FP32_GRADIENT_ERROR_RATIO,
                    floor: float = FP32_GRADIENT_ERROR_FLOOR, label: str = "ours") -> float:
    """Every gradient of ``ours`` is within ``ratio`` x the reference's own error against the float64 ``truth``, plus
    ``floor`` (all relative to the gradient's magnitude; see MAX_ERROR_SLACK_WITH_RMS for the one exception); prints
    both worst errors and returns our worst over the reference's worst."""
    assert set(ours) == set(truth), f"{label}: gradients differ in names: {sorted(set(ours) ^ set(truth))}"
    failures, worst, closest = [], (0.0, 0.0), (0.0, "")
    for name, true_grad in truth.items():
        assert ours[name] is not None, f"{label}: {name}: no gradient"
        assert ours[name].shape == true_grad.shape, f"{label}: {name}: shape {ours[name].shape} != {true_grad.shape}"
        our_error, reference_error = relative_error(ours[name], true_grad), relative_error(reference[name], true_grad)
        worst = max(worst[0], our_error), max(worst[1], reference_error)
        closest = max(closest, (our_error / (ratio * reference_error + floor), name))
        if not our_error <= ratio * reference_error + floor:
            # See MAX_ERROR_SLACK_WITH_RMS.
            our_rms, reference_rms = relative_rms_error(ours[name], true_grad), relative_rms_error(reference[name], true_grad)
            message = (f"{name}: {our_error:.3g} > {ratio} x reference's {reference_error:.3g} + {floor:g} "
                       f"(RMS errors {our_rms:.3g}, reference's {reference_rms:.3g})")
            if (our_rms <= ratio * reference_rms + floor
                    and our_error <= MAX_ERROR_SLACK_WITH_RMS * ratio * reference_error + floor):
                print(f"{label}: accepted on its RMS error: {message}")
            else:
                failures.append(message)
    print(f"{label}: worst relative gradient error {worst[0]:.3g}, reference's {worst[1]:.3g}; "
          f"closest to its bound: {closest[1]} at {closest[0]:.2f} of it")
    assert not failures, (f"{label}: {len(failures)} of {len(truth)} gradients too far from float64:\n  "
                          + "\n  ".join(failures))
    return worst[0] / max(worst[1], 1e-300)


# Low-precision attention: the error a bf16/fp16 attention kernel is allowed is derived the same way on every
# machine. Plain torch's own low-precision SDPA is no stable yardstick: on CPU, ATen takes another path per CPU
# (AVX2 without bf16 units, AVX512-BF16, AMX; math or flash kernel), each with its own rounding points, so a bound
# of "twice torch's error" would pass on one CPU and fail on another. The yardstick is an fp32 emulation of a
# flash-style kernel in that dtype instead: q, k, v in the dtype; scores, the softmax max and its row sums in fp32;
# the unnormalised probabilities rounded to the dtype for the P V product (what a kernel feeding its matrix units
# does); fp32 accumulation; the output rounded to the dtype once. A kernel that keeps its probabilities in fp32 is
# more accurate than that, one with bf16 matrix units is as accurate; twice its error is the bound.
LOW_PRECISION_ATTENTION_ERROR_RATIO = 2.0


def _sdpa_rounded_like_a_kernel(dtype: torch.dtype) -> Callable:
    def attend(q, k, v, *args, **kwargs):
        assert not args and not kwargs, "the emulation covers SDPA's defaults only (no mask, dropout or scale)"
        scores = (q.float() @ k.float().transpose(-2, -1)) * q.shape[-1] ** -0.5
        probs = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
        out = (probs.to(dtype).float() @ v.float()) / probs.sum(dim=-1, keepdim=True)
        return out.to(dtype)

    return attend


def emulated_low_precision_attention(attention_fn: Callable, qkv: torch.Tensor, *args) -> torch.Tensor:
    """``attention_fn(qkv, *args)`` (a :mod:`sam2_fast.backends.torch_ops` attention) on a bf16/fp16 ``qkv`` with its SDPA
    replaced by the emulation of a kernel in that dtype (see above); partition, padding and pooling are exact."""
    assert qkv.dtype in (torch.bfloat16, torch.float16), f"expected a bf16/fp16 qkv, got {qkv.dtype}"
    with mock.patch.object(F, "scaled_dot_product_attention", _sdpa_rounded_like_a_kernel(qkv.dtype)):
        return attention_fn(qkv, *args)


def assert_error_within(name: str, actual: torch.Tensor, yardstick: torch.Tensor, exact: torch.Tensor, ratio: float,
                        floor: float, yardstick_name: str) -> None:
    """``actual``'s max error against the more precise ``exact`` is at most ``ratio`` x the error of ``yardstick`` (the
    same computation done plainly in actual's dtype), plus ``floor``; prints both errors."""
    assert actual.dtype == yardstick.dtype, f"{name}: dtype {actual.dtype} != {yardstick_name}'s {yardstick.dtype}"
    assert actual.shape == exact.shape, f"{name}: shape {tuple(actual.shape)} != expected {tuple(exact.shape)}"
    actual_error, yardstick_error = max_abs_error(actual, exact), max_abs_error(yardstick, exact)
    print(f"{name}: error {actual_error:.3g}, {yardstick_name}'s {yardstick_error:.3g} (vs {exact.dtype})")
    assert actual_error <= ratio * yardstick_error + floor, (
        f"{name}: error {actual_error:.3g} vs {exact.dtype} > {ratio} x {yardstick_name}'s {yardstick_error:.3g} "
        f"+ {floor:.3g}"
    )


def assert_low_precision_attention_error(name: str, actual: torch.Tensor, emulated: torch.Tensor,
                                         expected: torch.Tensor, floor: float) -> None:
    """``actual``'s max error against the fp32 ``expected`` is at most twice the emulated kernel's, plus ``floor``;
    prints both errors."""
    assert_error_within(name, actual, emulated, expected, LOW_PRECISION_ATTENTION_ERROR_RATIO, floor,
                        f"the emulated {actual.dtype} kernel")


def brgemm_f32_usable() -> bool:
    """Whether the C++ extension is loaded and ATen's fp32 brgemm works on this CPU (oneDNN's micro-kernels)."""
    from sam2_fast.backends.precision import extension_flag

    return bool(extension_flag("brgemm_f32_usable"))


def refuse_reads(monkeypatch, path) -> None:
    """Make ``open(path)`` raise the OS's permission error for the rest of the test. Tests run as root, where
    chmod 000 does not stop reads, so the refusal is simulated where the readers meet the OS."""
    real_open = builtins.open

    def refusing_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and os.fspath(file) == str(path):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refusing_open)
