"""Checkpoint loading: full SAM-2 checkpoints, bare state_dicts, safetensors, and the errors for bad ones."""

import pytest
import torch

import sam2_fast
from sam2_fast import CheckpointError, build_image_encoder, load_checkpoint
from sam2_fast.reference import build_reference_encoder

from helpers import flat_outputs, randomize_

NAME = "sam2.1_hiera_tiny"


@pytest.fixture(scope="module")
def reference():
    return randomize_(build_reference_encoder(NAME), seed=7)


@pytest.fixture(scope="module")
def image():
    return torch.randn(1, 3, 96, 160, generator=torch.Generator().manual_seed(8))


def _assert_same_outputs(ours, reference, image):
    with torch.no_grad():
        expected, actual = reference(image), ours(image)
    for (name, e), (_, a) in zip(flat_outputs(expected), flat_outputs(actual)):
        # Same weights, same math: only float rounding order may differ (see test_parity).
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_full_sam2_checkpoint(tmp_path, reference, image):
    # A full SAM-2 checkpoint holds the whole model under "model"; only image_encoder.* keys are ours.
    model_state = {f"image_encoder.{k}": v for k, v in reference.state_dict().items()}
    model_state["sam_mask_decoder.output_upscaling.0.weight"] = torch.zeros(4)
    model_state["maskmem_tpos_enc"] = torch.zeros(7, 1, 1, 64)
    path = tmp_path / "sam2.1_hiera_tiny.pt"
    torch.save({"model": model_state}, path)
    ours = build_image_encoder(NAME, checkpoint=str(path))
    _assert_same_outputs(ours, reference, image)
    assert ours.state_dict().keys() == reference.state_dict().keys()


def test_bare_state_dict_into_existing_encoder(tmp_path, reference, image):
    path = tmp_path / "encoder.pt"
    torch.save(reference.state_dict(), path)
    ours = load_checkpoint(build_image_encoder(NAME), path)
    _assert_same_outputs(ours, reference, image)


def test_safetensors(tmp_path, reference, image):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    path = tmp_path / "encoder.safetensors"
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    safetensors_torch.save_file(state, str(path))
    _assert_same_outputs(build_image_encoder(NAME, checkpoint=str(path)), reference, image)


def test_loading_keeps_device_and_dtype(tmp_path, reference):
    path = tmp_path / "encoder.pt"
    torch.save(reference.state_dict(), path)
    encoder = build_image_encoder(NAME, dtype=torch.bfloat16)
    load_checkpoint(encoder, path)
    assert {p.dtype for p in encoder.parameters()} == {torch.bfloat16}


def test_missing_and_unexpected_keys_are_listed(tmp_path, reference):
    state = dict(reference.state_dict())
    del state["trunk.blocks.0.attn.qkv.weight"]
    state["trunk.blocks.99.mlp.layers.0.weight"] = torch.zeros(1)
    path = tmp_path / "broken.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(build_image_encoder(NAME), path)
    message = str(info.value)
    assert "missing keys: trunk.blocks.0.attn.qkv.weight" in message
    assert "unexpected keys: trunk.blocks.99.mlp.layers.0.weight" in message


def test_shape_mismatch_names_key_and_both_shapes(tmp_path):
    # A base_plus checkpoint into a tiny encoder: same key names up to block 11, other widths.
    path = tmp_path / "base_plus.pt"
    torch.save(build_image_encoder("sam2.1_hiera_base_plus").state_dict(), path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(build_image_encoder(NAME), path)
    assert "shape mismatch for trunk.patch_embed.proj.weight: checkpoint has (112, 3, 7, 7), " \
           "the encoder expects (96, 3, 7, 7)" in str(info.value)


def test_missing_file_and_non_tensor_entries(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint file not found"):
        load_checkpoint(build_image_encoder(NAME), tmp_path / "nope.pt")
    path = tmp_path / "odd.pt"
    torch.save({"trunk.pos_embed": [1, 2]}, path)
    with pytest.raises(CheckpointError, match="not tensors: trunk.pos_embed"):
        load_checkpoint(build_image_encoder(NAME), path)


def test_checkpoint_with_code_is_refused(tmp_path):
    # weights_only loading: a pickle that would run code is rejected, not executed.
    path = tmp_path / "evil.pt"
    torch.save({"model": {"image_encoder.x": torch.zeros(1)}, "hook": sam2_fast.build_image_encoder}, path)
    with pytest.raises(Exception, match="[Ww]eights only load failed|weights_only"):
        load_checkpoint(build_image_encoder(NAME), path)
