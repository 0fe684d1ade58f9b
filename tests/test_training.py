"""Training and fine-tuning against the reference `sam2` package: the whole encoder's gradients (the reference in
float64 is the truth), stochastic depth, train/eval, activation checkpointing."""

import copy
import functools
import sys
from pathlib import Path

import pytest
import torch

import sam2_fast
from sam2_fast import ops
from sam2_fast.configs import SIZES, get_config
from sam2_fast.reference import build_reference_encoder

from helpers import assert_close_verbose, seeded_state

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ is a package at the repo root
from bench.tensor_memory import peak_tensor_bytes  # noqa: E402

CPU_BACKENDS = [b for b in ("torch", "extension") if ops._unavailable_reason("window_attention", b, "cpu") is None]
# sam2 and sam2.1 build the same encoder modules (configs.py): one name per architecture.
ARCHITECTURES = [f"sam2.1_hiera_{size}" for size in SIZES]

# Batch 2 at 64x96: stage maps 16x24, 8x12, 4x6 and 2x3, so stage 3's windows (14; 16 for large) and stage 4's
# (7; 8) overhang the map, and the q-pooling block of stage 4 pools inside a padded window.
IMAGE_SHAPE = (2, 3, 64, 96)

# fp32: our error against the float64 truth may be at most twice the reference's own fp32 error, plus a floor for
# gradients that both sides get within a few ulps (the reference's error can then be near zero by chance).
FP32_ERROR_RATIO, FP32_ERROR_FLOOR = 2.0, 1e-6
# bf16 autocast: twice the reference's own bf16-autocast error, with a floor of 1% of the gradient's magnitude for
# gradients the reference gets exactly by chance (e.g. a bias whose gradient sums a bf16-rounded map).
BF16_ERROR_RATIO, BF16_ERROR_FLOOR = 2.0, 1e-2


def _image(dtype=torch.float32) -> torch.Tensor:
    return torch.randn(IMAGE_SHAPE, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(dtype)


def _feature_outputs(out: dict):
    return [out["vision_features"], *out["backbone_fpn"]]


@functools.lru_cache(maxsize=None)
def _output_weights(name: str):
    """Fixed random float64 weights, one per feature output, for the loss sum(output * weight)."""
    reference = _reference(name, torch.float64)
    with torch.no_grad():
        shapes = [t.shape for t in _feature_outputs(reference(_image(torch.float64)))]
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
    image = _image(dtype).to(device).requires_grad_(True)
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
    """The reference's float64 gradients."""
    return gradients(_reference(name, torch.float64), name, torch.float64)[1]


@functools.lru_cache(maxsize=None)
def _reference_gradients(name: str, autocast_dtype=None, device="cpu"):
    return gradients(_reference(name, torch.float32), name, autocast_dtype=autocast_dtype, device=device)[1]


def relative_error(actual: torch.Tensor, truth: torch.Tensor) -> float:
    """max |actual - truth| / max |truth|."""
    return ((actual.double() - truth).abs().max() / truth.abs().max().clamp_min(1e-300)).item()


def check_gradients(ours: dict, reference: dict, truth: dict, ratio: float, floor: float) -> float:
    """Every gradient of ours is within ``ratio`` x the reference's own error against the truth, plus ``floor``
    (all relative to the gradient's magnitude); returns our worst error over the reference's worst."""
    assert set(ours) == set(truth), f"gradients differ in names: {sorted(set(ours) ^ set(truth))}"
    failures, worst = [], (0.0, 0.0)
    for name, true_grad in truth.items():
        assert ours[name] is not None, f"{name}: no gradient"
        assert ours[name].shape == true_grad.shape, f"{name}: shape {ours[name].shape} != {true_grad.shape}"
        our_error, reference_error = relative_error(ours[name], true_grad), relative_error(reference[name], true_grad)
        worst = max(worst[0], our_error), max(worst[1], reference_error)
        if not our_error <= ratio * reference_error + floor:
            failures.append(f"{name}: {our_error:.3g} > {ratio} x reference's {reference_error:.3g} + {floor:g}")
    print(f"worst relative gradient error: ours {worst[0]:.3g}, reference {worst[1]:.3g}")
    assert not failures, f"{len(failures)} of {len(truth)} gradients too far from float64:\n  " + "\n  ".join(failures)
    return worst[0] / max(worst[1], 1e-300)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_fp32_gradients_match_float64_reference(name, backend):
    with sam2_fast.use_backend(backend):
        _, ours = gradients(_ours(name), name)
    check_gradients(ours, _reference_gradients(name), _truth(name), FP32_ERROR_RATIO, FP32_ERROR_FLOOR)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", ["sam2.1_hiera_tiny", "sam2.1_hiera_base_plus"])
def test_bf16_autocast_gradients_match_float64_reference(name, backend):
    with sam2_fast.use_backend(backend):
        _, ours = gradients(_ours(name), name, autocast_dtype=torch.bfloat16)
    check_gradients(
        ours, _reference_gradients(name, torch.bfloat16), _truth(name), BF16_ERROR_RATIO, BF16_ERROR_FLOOR
    )


@pytest.mark.gpu
@pytest.mark.parametrize("autocast_dtype", [None, torch.bfloat16], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_gpu_gradients_match_float64_reference(name, autocast_dtype):
    # auto: the Triton kernels and their backward kernels (torch's flash SDPA for global attention).
    _, ours = gradients(_ours(name), name, autocast_dtype=autocast_dtype, device="cuda")
    ratio, floor = (FP32_ERROR_RATIO, FP32_ERROR_FLOOR) if autocast_dtype is None else (BF16_ERROR_RATIO,
                                                                                        BF16_ERROR_FLOOR)
    check_gradients(ours, _reference_gradients(name, autocast_dtype, "cuda"), _truth(name), ratio, floor)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_stochastic_depth_matches_reference_with_a_seed(backend):
    # Each block draws one mask per sample for its attention branch, then one for its MLP branch, from the global
    # RNG: with the same seed ours must draw the same masks in the same order, so outputs and gradients match.
    name, rate = "sam2.1_hiera_tiny", 0.5
    reference, ours = _reference(name, torch.float32, drop_path_rate=rate), _ours(name, drop_path_rate=rate)
    torch.manual_seed(3)
    expected_out, expected = gradients(reference, name)
    with sam2_fast.use_backend(backend):
        torch.manual_seed(3)
        actual_out, actual = gradients(ours, name)
        with torch.no_grad():
            eval_out = _feature_outputs(ours.eval()(_image()))
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
        torch.manual_seed(5)  # the same stochastic-depth masks, also in the recomputed forward
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
        # The same ops recompute the same values; only the order of gradient accumulation may differ.
        assert_close_verbose(ckpt_grads[grad_name], e, atol=1e-6 * max(e.abs().max().item(), 1e-6), name=grad_name)
    assert ckpt_peak < 0.5 * plain_peak


def test_checkpointing_is_a_constructor_flag_and_leaves_inference_alone():
    name = "sam2.1_hiera_tiny"
    flagged = _ours(name, activation_checkpointing=True).eval()
    assert all(block.activation_checkpointing for block in flagged.trunk.blocks)
    plain = _ours(name).eval()
    with torch.no_grad():
        for a, e in zip(_feature_outputs(flagged(_image())), _feature_outputs(plain(_image()))):
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
        if grad_name.startswith("neck."):
            assert_close_verbose(frozen_grads[grad_name], e, atol=1e-5 * max(e.abs().max().item(), 1e-6),
                                 name=grad_name)
        elif grad_name.startswith("trunk."):
            assert frozen_grads[grad_name] is None, f"{grad_name}: a frozen parameter got a gradient"
