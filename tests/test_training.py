"""Training and fine-tuning against the reference `sam2` package: the whole encoder's gradients (the reference in
float64 is the truth), stochastic depth, train/eval, activation checkpointing."""

import copy
import functools

import pytest
import torch

import sam2_fast
from sam2_fast import ops
from sam2_fast.io.configs import SIZES, get_config
from sam2_fast.testing.reference import build_reference_encoder
from sam2_fast.testing.tensor_memory import peak_tensor_bytes

from helpers import (
    FP32_GRADIENT_ERROR_FLOOR, FP32_GRADIENT_ERROR_RATIO, assert_clear_of_max_pool_ties, assert_close_verbose,
    check_gradients, global_rng_seeded, recorded_max_pool_inputs, seeded_state,
)


CPU_BACKENDS = [b for b in ("torch", "extension") if ops.backend_status("cpu")[b]["window_attention"] == "available"]
# sam2 and sam2.1 build the same encoder modules (configs.py): one name per architecture.
ARCHITECTURES = [f"sam2.1_hiera_{size}" for size in SIZES]

# Batch 2 at 64x96: stage maps 16x24, 8x12, 4x6 and 2x3, so stage 3's windows (14; 16 for large) and stage 4's
# (7; 8) overhang the map, and the q-pooling block of stage 4 pools inside a padded window.
IMAGE_SHAPE = (2, 3, 64, 96)
# The image's seed per config: one whose forward keeps every max-pool window's top two values apart by more than
# helpers.MAX_POOL_MARGIN x the fp32 reference's error there, so that no fp32 path can route a gradient to another
# pixel than float64 does (test_fp32_gradients_match_float64_reference checks it). On these weights (seeded_state,
# seed 0) a seed's pools hold 2 (tiny) to 4 (large) such near-ties on average among their 130k-250k windows: one
# seed in 5 qualified for tiny and small, in 10 for base_plus, in 40 for large.
IMAGE_SEEDS = {
    "sam2.1_hiera_tiny": 0,
    "sam2.1_hiera_small": 0,
    "sam2.1_hiera_base_plus": 2,
    "sam2.1_hiera_large": 35,
}
# bf16 autocast: twice the reference's own bf16-autocast error, with a floor of 1% of the gradient's magnitude for
# gradients the reference gets exactly by chance (e.g. a bias whose gradient sums a bf16-rounded map).
BF16_ERROR_RATIO, BF16_ERROR_FLOOR = 2.0, 1e-2


def _image(name: str, dtype=torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(IMAGE_SEEDS[name])
    return torch.randn(IMAGE_SHAPE, generator=generator, dtype=torch.float64).to(dtype)


def _feature_outputs(out: dict):
    return [out["vision_features"], *out["backbone_fpn"]]


@functools.lru_cache(maxsize=None)
def _output_weights(name: str):
    """Fixed random float64 weights, one per feature output, for the loss sum(output * weight)."""
    reference = _reference(name, torch.float64)
    with torch.no_grad():
        shapes = [t.shape for t in _feature_outputs(reference(_image(name, torch.float64)))]
    generator = torch.Generator().manual_seed(11)
    return [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in shapes]


def _reference(name: str, dtype: torch.dtype, **trunk_overrides) -> torch.nn.Module:
    model = build_reference_encoder(name, **trunk_overrides)
    model.load_state_dict(seeded_state(name))
    return model.to(dtype).train()


def _ours(name: str, **trunk_overrides) -> torch.nn.Module:
    model = sam2_fast.build_image_encoder(name, **trunk_overrides)
    model.load_state_dict(seeded_state(name))
    return model.train()


def gradients(model: torch.nn.Module, name: str, dtype=torch.float32, autocast_dtype=None, device="cpu"):
    """(outputs, {"input": d loss / d image, parameter name: its gradient}) of one training step's backward on
    ``device`` (results on CPU), with loss = sum over the feature outputs of (output * fixed weight), in float64."""
    model = model.to(device)
    image = _image(name, dtype).to(device).requires_grad_(True)
    model.zero_grad(set_to_none=True)
    with torch.autocast(image.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        out = model(image)
    outputs = _feature_outputs(out)
    loss = sum((t.double() * w.to(t.device)).sum() for t, w in zip(outputs, _output_weights(name)))
    loss.backward()
    grads = {"input": image.grad}
    grads.update({n: p.grad for n, p in model.named_parameters()})
    return [t.detach().cpu() for t in outputs], {n: None if g is None else g.cpu() for n, g in grads.items()}


@functools.lru_cache(maxsize=None)
def _truth(name: str):
    """The reference's float64 gradients, and the inputs of its max-pools in that step."""
    model = _reference(name, torch.float64)
    with recorded_max_pool_inputs(model) as pool_inputs:
        grads = gradients(model, name, torch.float64)[1]
    return grads, pool_inputs


@functools.lru_cache(maxsize=None)
def _reference_gradients(name: str, autocast_dtype=None, device="cpu"):
    """The reference's gradients (fp32, or under autocast to ``autocast_dtype``), and the inputs of its max-pools."""
    model = _reference(name, torch.float32)
    with recorded_max_pool_inputs(model) as pool_inputs:
        grads = gradients(model, name, autocast_dtype=autocast_dtype, device=device)[1]
    return grads, [t.cpu() for t in pool_inputs]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_fp32_gradients_match_float64_reference(name, backend):
    (truth, exact_pools), (reference, fp32_pools) = _truth(name), _reference_gradients(name)
    assert_clear_of_max_pool_ties(exact_pools, fp32_pools, f"IMAGE_SEEDS[{name!r}]")
    with sam2_fast.use_backend(backend):
        _, ours = gradients(_ours(name), name)
    check_gradients(ours, reference, truth)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", ["sam2.1_hiera_tiny", "sam2.1_hiera_base_plus"])
def test_bf16_autocast_gradients_match_float64_reference(name, backend):
    # No max-pool margin can hold here: bf16 rounds the pools' inputs by ~2^-9 of their magnitude, and thousands of
    # windows lie that close, so both sides route some gradients to other pixels than float64 does. The reference
    # routes about as many, and its error against float64, the yardstick, counts them.
    with sam2_fast.use_backend(backend):
        _, ours = gradients(_ours(name), name, autocast_dtype=torch.bfloat16)
    check_gradients(ours, _reference_gradients(name, torch.bfloat16)[0], _truth(name)[0], BF16_ERROR_RATIO,
                    BF16_ERROR_FLOOR)


@pytest.mark.gpu
@pytest.mark.parametrize("autocast_dtype", [None, torch.bfloat16], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_gpu_gradients_match_float64_reference(name, autocast_dtype):
    # auto: the Triton kernels and their backward kernels (torch's flash SDPA for global attention). No max-pool
    # margin is asserted: cuDNN runs fp32 convolutions (the patch embedding) in TF32 by default, so even the fp32
    # reference's pool inputs carry ~1e-3 relative rounding; as in bf16, the reference's error counts its ties.
    _, ours = gradients(_ours(name), name, autocast_dtype=autocast_dtype, device="cuda")
    fp32 = autocast_dtype is None
    ratio = FP32_GRADIENT_ERROR_RATIO if fp32 else BF16_ERROR_RATIO
    floor = FP32_GRADIENT_ERROR_FLOOR if fp32 else BF16_ERROR_FLOOR
    check_gradients(ours, _reference_gradients(name, autocast_dtype, "cuda")[0], _truth(name)[0], ratio, floor)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_stochastic_depth_matches_reference_with_a_seed(backend):
    # Each block draws one mask per sample for its attention branch, then one for its MLP branch, from the global
    # RNG: with the same seed ours must draw the same masks in the same order, so outputs and gradients match.
    name, rate, mask_seed = "sam2.1_hiera_tiny", 0.5, 26  # a mask seed that keeps the pools clear of ties
    reference, ours = _reference(name, torch.float32, drop_path_rate=rate), _ours(name, drop_path_rate=rate)
    with global_rng_seeded(mask_seed), recorded_max_pool_inputs(reference) as fp32_pools:
        expected_out, expected = gradients(reference, name)
    # The same masks in float64 (drawn alike whatever the dtype), for the max-pool margin of the gradients below.
    exact = _reference(name, torch.float64, drop_path_rate=rate)
    with global_rng_seeded(mask_seed), recorded_max_pool_inputs(exact) as exact_pools, torch.no_grad():
        exact(_image(name, torch.float64))
    assert_clear_of_max_pool_ties(exact_pools, fp32_pools, "mask_seed")
    with sam2_fast.use_backend(backend):
        with global_rng_seeded(mask_seed):
            actual_out, actual = gradients(ours, name)
        with torch.no_grad():
            eval_out = _feature_outputs(ours.eval()(_image(name)))
    # Two fp32 paths with the same masks and pools clear of ties: each is within ~1e-6 of its magnitude of float64
    # (as test_fp32_gradients_match_float64_reference measures without masks), so 1e-4 of it passes any two that
    # round alike and fails a mask drawn differently (a dropped branch moves outputs and gradients by their size).
    for index, (a, e) in enumerate(zip(actual_out, expected_out)):
        assert_close_verbose(a, e, atol=1e-4 * max(e.abs().max().item(), 1.0), name=f"output {index}")
    # The masks did drop branches: vision_features (after every block; rates grow linearly from 0 at block 0)
    # differs from its eval-mode value.
    assert not torch.allclose(actual_out[0], eval_out[0], atol=1e-2), "no branch was dropped"
    for grad_name, e in expected.items():
        assert_close_verbose(actual[grad_name], e, atol=1e-4 * max(e.abs().max().item(), 1e-6), name=grad_name)


def test_train_and_eval_switch_every_module_as_the_reference():
    name = "sam2.1_hiera_tiny"
    reference, ours = _reference(name, torch.float32, drop_path_rate=0.1), _ours(name, drop_path_rate=0.1)
    for mode in (False, True, False):
        reference.train(mode)
        ours.train(mode)
        modes = {n: m.training for n, m in reference.named_modules()}
        assert {n: m.training for n, m in ours.named_modules() if n in modes} == modes
        assert all(m.training == mode for m in ours.modules())


def test_activation_checkpointing_same_gradients_less_memory():
    # The parameters' gradients (108 MB for tiny) exist before the step and are accumulated into, so that the peak
    # counts what checkpointing changes: activations and temporaries.
    name = "sam2.1_hiera_tiny"
    image = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(8))
    plain, checkpointed = _ours(name, drop_path_rate=0.2), _ours(name, drop_path_rate=0.2)
    assert sam2_fast.set_activation_checkpointing(checkpointed) is checkpointed
    assert all(block.activation_checkpointing for block in checkpointed.trunk.blocks)

    def step(model):
        with global_rng_seeded(5):  # the same stochastic-depth masks (checkpointing replays them when recomputing)
            out = model(image)
            sum(t.square().sum() for t in out["backbone_fpn"]).backward()
        return [t.detach() for t in out["backbone_fpn"]], {n: p.grad for n, p in model.named_parameters()}

    for parameter in [*plain.parameters(), *checkpointed.parameters()]:
        parameter.grad = torch.zeros_like(parameter)
    plain_peak, (plain_out, plain_grads) = peak_tensor_bytes(lambda: step(plain))
    ckpt_peak, (ckpt_out, ckpt_grads) = peak_tensor_bytes(lambda: step(checkpointed))
    print(f"peak tensor memory of a training step: {plain_peak / 2**20:.1f} MiB plain, "
          f"{ckpt_peak / 2**20:.1f} MiB checkpointed")
    for a, e in zip(ckpt_out, plain_out):
        torch.testing.assert_close(a, e, atol=0, rtol=0)
    for grad_name, e in plain_grads.items():
        # The same ops recompute the same values (the outputs above are equal bit for bit), so every max-pool picks
        # the same pixel; only the order of gradient accumulation may differ, a few fp32 ulps of the magnitude.
        assert_close_verbose(ckpt_grads[grad_name], e, atol=1e-6 * max(e.abs().max().item(), 1e-6), name=grad_name)
    assert ckpt_peak < 0.5 * plain_peak


def test_checkpointing_is_a_constructor_flag_and_leaves_inference_alone():
    name = "sam2.1_hiera_tiny"
    flagged = _ours(name, activation_checkpointing=True).eval()
    assert all(block.activation_checkpointing for block in flagged.trunk.blocks)
    plain = _ours(name).eval()
    with torch.no_grad():
        for a, e in zip(_feature_outputs(flagged(_image(name))), _feature_outputs(plain(_image(name)))):
            torch.testing.assert_close(a, e, atol=0, rtol=0)
    assert sam2_fast.set_activation_checkpointing(flagged, False) is flagged
    assert not any(block.activation_checkpointing for block in flagged.trunk.blocks)
    with pytest.raises(ValueError, match="holds no sam2_fast Hiera block"):
        sam2_fast.set_activation_checkpointing(torch.nn.Linear(2, 2))


def test_frozen_trunk_fine_tunes_the_neck():
    # A common fine-tune: the trunk frozen (its blocks record nothing and keep their inference paths), the neck
    # trained. The neck's gradients must match a fully differentiated run.
    name = "sam2.1_hiera_tiny"
    frozen, full = _ours(name), _ours(name)
    frozen.trunk.requires_grad_(False)
    _, frozen_grads = gradients(frozen, name)
    _, full_grads = gradients(full, name)
    for grad_name, e in full_grads.items():
        # The neck has no max-pool; its gradients are products of the trunk's features, which the frozen trunk's
        # inference path computes within fp32 rounding (~1e-7 relative) of the training path's.
        if grad_name.startswith("neck."):
            assert_close_verbose(frozen_grads[grad_name], e, atol=1e-5 * max(e.abs().max().item(), 1e-6),
                                 name=grad_name)
        elif grad_name.startswith("trunk."):
            assert frozen_grads[grad_name] is None, f"{grad_name}: a frozen parameter got a gradient"
