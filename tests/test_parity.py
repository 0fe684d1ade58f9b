"""Whole-encoder parity with the reference `sam2` package: every output, shape and dtype, every config."""

import copy

import pytest
import torch

from sam2_fast.configs import CONFIGS

from helpers import assert_close_verbose, encoder_pair, flat_outputs, max_abs_error

ALL_CONFIGS = list(CONFIGS)

# fp32: both sides do the same math; they differ only where GEMMs see a different number of rows (we project
# real tokens only, the reference also its padded ones), i.e. in float rounding order, ~1e-7 relative per layer.
# Across up to 48 blocks that stays far below 1e-4 of the outputs' magnitude.
FP32_RELATIVE_TOLERANCE = 1e-4


def _run(model, x, autocast_dtype=None):
    with torch.no_grad(), torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        return model(x)


def _check_fp32(reference_out, ours_out):
    for (name, expected), (_, actual) in zip(flat_outputs(reference_out), flat_outputs(ours_out)):
        assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != reference {expected.dtype}"
        scale = expected.abs().max().item()
        assert_close_verbose(actual, expected, atol=FP32_RELATIVE_TOLERANCE * max(scale, 1.0), name=name)


# Stage maps are H/4 .. H/32. Windows 8 and 4 always tile stages 1-2 (H is a multiple of 32); windows 14/16 and
# 7/8 on stages 3-4 pad unless the map is a multiple of them. 96x160 (stage 3: 6x10, stage 4: 3x5) makes the
# last windows mostly padding and keeps large cheap; 224x352 (stage 3: 14x22, stage 4: 7x11) pads on one side.
# large runs at the small size only: at 224x352 it adds a minute on 2 cores and covers nothing new.
CASES = [(name, (96, 160)) for name in ALL_CONFIGS] + [
    (name, (224, 352)) for name in ALL_CONFIGS if "large" not in name
]


@pytest.mark.parametrize("name,size", CASES, ids=[f"{n}-{h}x{w}" for n, (h, w) in CASES])
def test_fp32_every_config_non_square_padded(name, size):
    reference, ours = encoder_pair(name)
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(1))
    _check_fp32(_run(reference, x), _run(ours, x))


@pytest.mark.parametrize("name,size", [("sam2.1_hiera_tiny", (160, 96)), ("sam2_hiera_base_plus", (128, 192))])
def test_fp32_batch_of_three(name, size):
    reference, ours = encoder_pair(name)
    x = torch.randn(3, 3, *size, generator=torch.Generator().manual_seed(2))
    _check_fp32(_run(reference, x), _run(ours, x))


def test_fp32_tiny_1024_pads_64_to_70():
    # At 1024x1024 the stage-3 map is 64x64 with window 14: padded to 70x70, the case the real model hits.
    reference, ours = encoder_pair("sam2.1_hiera_tiny")
    x = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(3))
    _check_fp32(_run(reference, x), _run(ours, x))


def _low_precision_check(reference, ours, x, run_reference, run_ours):
    """Our low-precision outputs must carry the reference's dtypes, and be no further from the fp32 reference
    than twice the reference's own low-precision error (plus a small floor for outputs that are exact)."""
    expected_fp32 = flat_outputs(_run(reference, x))
    reference_low = flat_outputs(run_reference())
    ours_low = flat_outputs(run_ours())
    for (name, exact), (_, ref_low), (_, our_low) in zip(expected_fp32, reference_low, ours_low):
        assert our_low.dtype == ref_low.dtype, f"{name}: dtype {our_low.dtype} != reference's {ref_low.dtype}"
        assert our_low.shape == ref_low.shape
        reference_error = max_abs_error(ref_low, exact)
        our_error = max_abs_error(our_low, exact)
        floor = 1e-2 * exact.abs().max().item()
        assert our_error <= 2 * reference_error + floor, (
            f"{name}: our error vs fp32 {our_error:.4g} > 2 x the reference's own {reference_error:.4g} + {floor:.3g}"
        )


@pytest.mark.parametrize(
    "name,size",
    # bf16 matmuls are slow on CPUs without bf16 units, where the reference's own bf16 run costs a minute for large.
    [("sam2.1_hiera_tiny", (224, 352)), ("sam2_hiera_base_plus", (96, 160))],
)
def test_bf16_autocast_matches_reference_dtypes_and_error(name, size):
    reference, ours = encoder_pair(name)
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(4))
    _low_precision_check(
        reference, ours, x,
        lambda: _run(reference, x, torch.bfloat16),
        lambda: _run(ours, x, torch.bfloat16),
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_encoder_cast_to_low_precision(dtype):
    reference, ours = encoder_pair("sam2.1_hiera_small")
    x = torch.randn(1, 3, 96, 160, generator=torch.Generator().manual_seed(5))
    reference_low, ours_low = copy.deepcopy(reference).to(dtype), copy.deepcopy(ours).to(dtype)
    _low_precision_check(
        reference, ours, x,
        lambda: _run(reference_low, x.to(dtype)),
        lambda: _run(ours_low, x.to(dtype)),
    )


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
def test_autocast_trunk_stages_keep_the_reference_dtypes(autocast_dtype):
    # Under autocast the reference's residual stream is fp32 (a low-precision patch embedding plus the fp32
    # positional table promotes); ours must promote the same way, not keep the embedding's dtype.
    reference, ours = encoder_pair("sam2.1_hiera_tiny")
    x = torch.randn(1, 3, 96, 160, generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), torch.autocast("cpu", dtype=autocast_dtype):
        expected, actual = reference.trunk(x), ours.trunk(x)
    assert [t.dtype for t in actual] == [t.dtype for t in expected]
    assert [t.shape for t in actual] == [t.shape for t in expected]
