"""Other libraries' SAM-2 encoder weights (Hugging Face transformers, timm) load into sam2_fast and give the
reference's outputs; a file of no known layout gets an error naming the layouts tried."""

import pytest
import torch

import sam2_fast
from sam2_fast import CheckpointError, build_image_encoder, load_checkpoint
from sam2_fast.io.checkpoint_formats import FORMATS
from sam2_fast.io.configs import get_config
from sam2_fast.testing.reference import build_reference_encoder
from sam2_fast.testing.transformers_models import build_transformers_model

import needs_torchvision
from helpers import assert_fp32_close, flat_outputs, randomize_

safetensors_torch = pytest.importorskip("safetensors.torch")


def _transformers_vision_model(name: str, whole_model: bool):
    """A Hugging Face transformers Sam2 model with config ``name``'s encoder, seeded random weights, eval mode, and
    its vision model: ``Sam2Model`` (the encoder under ``vision_encoder``) or ``Sam2VisionModel``."""
    pytest.importorskip("transformers")
    model = build_transformers_model("Sam2Model" if whole_model else "Sam2VisionModel", name, seed=11)
    return model, model.vision_encoder if whole_model else model


def _assert_outputs_close(actual: dict, expected: dict):
    for (name, want), (_, got) in zip(flat_outputs(expected), flat_outputs(actual)):
        assert_fp32_close(got, want, name)


IMAGE = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(12))


# The key map does not depend on the config: tiny has every kind of key (a larger config costs ~9 s more per case
# on 2 cores, for the same keys).
@pytest.mark.parametrize("whole_model", [False, True], ids=["Sam2VisionModel", "Sam2Model"])
@pytest.mark.parametrize("name", ["sam2.1_hiera_tiny"])
def test_transformers_weights_give_its_and_the_reference_outputs(tmp_path, name, whole_model):
    model, vision_model = _transformers_vision_model(name, whole_model)
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))

    ours = build_image_encoder(name, checkpoint=str(path))
    reference = build_reference_encoder(name)
    reference.load_state_dict(ours.state_dict())
    with torch.no_grad():
        peer_out = vision_model(IMAGE)
        expected, actual = reference(IMAGE), ours(IMAGE)
    # The peer is the reference's math under other names: every output equal up to float summation order.
    peer = {"vision_features": peer_out.fpn_hidden_states[-1], "backbone_fpn": list(peer_out.fpn_hidden_states),
            "vision_pos_enc": list(peer_out.fpn_position_encoding)}
    _assert_outputs_close(peer, expected)
    _assert_outputs_close(actual, expected)


@pytest.mark.parametrize("features_only", [False, True])
def test_timm_trunk_weights_give_its_and_the_reference_outputs(tmp_path, features_only):
    timm = needs_torchvision.import_module("timm")
    peer = randomize_(timm.create_model("sam2_hiera_tiny", pretrained=False, features_only=features_only), 13).eval()
    path = tmp_path / "timm.pth"
    torch.save(peer.state_dict(), path)

    ours = build_image_encoder("sam2.1_hiera_tiny")
    with pytest.raises(CheckpointError, match=r"holds no FPN neck weights.*load_checkpoint\(encoder.trunk, path\)"):
        load_checkpoint(ours, path)
    load_checkpoint(ours.trunk, path)
    reference = build_reference_encoder("sam2.1_hiera_tiny")
    reference.trunk.load_state_dict(ours.trunk.state_dict())
    with torch.no_grad():
        expected, actual = reference.trunk(IMAGE), ours.trunk(IMAGE)
        peer_out = peer(IMAGE) if features_only else peer.forward_intermediates(IMAGE, intermediates_only=True)
    for level, (want, got, theirs) in enumerate(zip(expected, actual, peer_out)):
        assert_fp32_close(got, want, f"trunk level {level} (ours)")
        assert_fp32_close(theirs, want, f"trunk level {level} (timm)")


def _renamed(state: dict, renames: dict) -> dict:
    renamed = {}
    for key, value in state.items():
        for old, new in renames.items():
            key = key.replace(old, new)
        renamed[key] = value
    return renamed


def test_timm_layout_loads_into_a_trunk_without_timm(tmp_path):
    # timm's layout written out from the documented key differences, so the loader's side of it is tested even
    # where timm cannot import: no trunk. prefix, mlp.fc1/fc2, a classifier head to leave out, model. prefix.
    reference = randomize_(build_reference_encoder("sam2.1_hiera_tiny"), seed=14)
    state = _renamed(reference.trunk.state_dict(), {"mlp.layers.0.": "mlp.fc1.", "mlp.layers.1.": "mlp.fc2."})
    state["head.norm.weight"] = torch.ones(768)
    path = tmp_path / "features_only.pth"
    torch.save({f"model.{key}": value for key, value in state.items()}, path)
    ours = load_checkpoint(build_image_encoder("sam2.1_hiera_tiny").trunk, path)
    for key, value in reference.trunk.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key


def test_full_sam2_checkpoint_loads_into_a_trunk(tmp_path):
    reference = randomize_(build_reference_encoder("sam2.1_hiera_tiny"), seed=15)
    path = tmp_path / "sam2.1_hiera_tiny.pt"
    torch.save({"model": {f"image_encoder.{k}": v for k, v in reference.state_dict().items()}}, path)
    trunk = load_checkpoint(sam2_fast.Hiera(**get_config("sam2.1_hiera_tiny").trunk_kwargs()), path)
    for key, value in reference.trunk.state_dict().items():
        assert torch.equal(trunk.state_dict()[key], value), key


@pytest.mark.parametrize("contents", [
    {"encoder.layers.0.weight": torch.zeros(2), "decoder.bias": torch.zeros(2)},
    {"model": {"backbone_fpn.0.weight": torch.zeros(2)}},
    {},
], ids=["other-model", "nested-other-model", "empty"])
def test_unknown_layout_names_the_formats_tried(tmp_path, contents):
    path = tmp_path / "other.pt"
    torch.save(contents, path)
    with pytest.raises(CheckpointError) as info:
        build_image_encoder("sam2.1_hiera_tiny", checkpoint=str(path))
    message = str(info.value)
    assert str(path) in message and "match none of the formats tried" in message
    for checkpoint_format in FORMATS:
        assert f"{checkpoint_format.name}: {checkpoint_format.description}" in message
    assert ("no keys at all" if not contents else next(iter(sorted(contents.get("model", contents))))) in message
