"""Whole-encoder parity with the reference `sam2` package: every output, shape and dtype, every config."""

import copy

import pytest
import torch

from sam2_fast.io.configs import CONFIGS

from helpers import (
    assert_close_verbose, check_fp32_outputs, check_low_precision_outputs, encoder_pair, flat_outputs, run_encoder as _run,
    seeded_state,
)

ALL_CONFIGS = list(CONFIGS)


# Stage maps are H/4 .. H/32. Windows 8 and 4 always tile stages 1-2 (H is a multiple of 32); windows 14/16 and
# 7/8 on stages 3-4 pad unless the map is a multiple of them. 96x160 (stage 3: 6x10, stage 4: 3x5) makes the
# last windows mostly padding and keeps large cheap; 224x352 (stage 3: 14x22, stage 4: 7x11) pads on one side.
# large runs at the small size only: at 224x352 it adds a minute on 2 cores and covers nothing new.
CASES = [(name, (96, 160)) for name in ALL_CONFIGS] + [
    (name, (224, 352)) for name in ALL_CONFIGS if "large" not in name
]


def test_seeded_weights_depend_on_config_and_seed_only():
    # Every test gets the same weights for a (config, seed) whatever ran before it: building them neither reads nor
    # advances the global RNG (a cache miss rebuilds the same state; helpers.seeded_state).
    name = "sam2.1_hiera_tiny"
    states = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        before = torch.random.get_rng_state()
        states.append(seeded_state.__wrapped__(name, 0))
        assert torch.equal(torch.random.get_rng_state(), before), "building the seeded weights drew from the global RNG"
    assert states[0].keys() == states[1].keys()
    for key, value in states[0].items():
        assert torch.equal(states[1][key], value), f"{key} depends on the global RNG"


@pytest.mark.parametrize("name,size", CASES, ids=[f"{n}-{h}x{w}" for n, (h, w) in CASES])
def test_fp32_every_config_non_square_padded(name, size):
    reference, ours = encoder_pair(name)
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(1))
    check_fp32_outputs(_run(reference, x), _run(ours, x))


@pytest.mark.parametrize("name,size", [("sam2.1_hiera_tiny", (160, 96)), ("sam2_hiera_base_plus", (128, 192))])
def test_fp32_batch_of_three(name, size):
    reference, ours = encoder_pair(name)
    x = torch.randn(3, 3, *size, generator=torch.Generator().manual_seed(2))
    check_fp32_outputs(_run(reference, x), _run(ours, x))


def test_fp32_tiny_1024_pads_64_to_70():
    # At 1024x1024 the stage-3 map is 64x64 with window 14: padded to 70x70, the case the real model hits.
    reference, ours = encoder_pair("sam2.1_hiera_tiny")
    x = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(3))
    check_fp32_outputs(_run(reference, x), _run(ours, x))


def _low_precision_check(reference, ours, x, run_reference, run_ours):
    check_low_precision_outputs(_run(reference, x), run_reference(), run_ours())


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_encoder_built_under_inference_mode(dtype):
    # Weights created under torch.inference_mode are inference tensors, which have no version counter: the cached
    # positional embedding and the prepacked bf16 weights must not rely on one, and must still follow an in-place
    # update made there. The reference, built the same way, is the truth.
    from sam2_fast import build_image_encoder
    from sam2_fast.testing.reference import build_reference_encoder

    name = "sam2.1_hiera_tiny"
    state = seeded_state(name)
    x = torch.randn(1, 3, 96, 160, generator=torch.Generator().manual_seed(9)).to(dtype)
    check = check_fp32_outputs if dtype == torch.float32 else _assert_same_dtypes_and_close_in_bf16
    with torch.inference_mode():
        reference, ours = build_reference_encoder(name), build_image_encoder(name)
        for model in (reference, ours):
            model.load_state_dict(state)
            model.to(dtype).eval()
        assert ours.trunk.pos_embed.is_inference() and ours.trunk.blocks[0].mlp.layers[0].weight.is_inference()
        check(reference(x), ours(x))
        for model in (reference, ours):
            model.trunk.pos_embed.mul_(0.5)
            model.trunk.blocks[0].mlp.layers[0].weight.mul_(0.5)
        check(reference(x), ours(x))


def _assert_same_dtypes_and_close_in_bf16(reference_out: dict, ours_out: dict) -> None:
    # Both sides compute in bf16 with their own rounding points; within a few bf16 ulps of the outputs' magnitude is
    # what a wrong (stale) cached embedding or weight would break by far (a factor of 2 on those tensors).
    for (name, expected), (_, actual) in zip(flat_outputs(reference_out), flat_outputs(ours_out)):
        assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != reference {expected.dtype}"
        scale = expected.float().abs().max().item()
        assert_close_verbose(actual.float(), expected.float(), atol=0.05 * scale, name=name)
