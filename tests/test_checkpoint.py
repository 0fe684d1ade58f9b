"""Checkpoint loading: full SAM-2 checkpoints, bare state_dicts, safetensors, and the errors for bad ones: each
names the file, says what is wrong and the likely fix, and is chained from the reader's own error."""

import pickle

import numpy as np
import pytest
import torch

import sam2_fast
from sam2_fast import CheckpointError, build_image_encoder, load_checkpoint
from sam2_fast.io.checkpoint import CheckpointNotFoundError
from sam2_fast.testing.reference import build_reference_encoder

from helpers import flat_outputs, randomize_, refuse_reads

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


@pytest.mark.parametrize("saved,into", [
    # Other widths (and depth): same key names up to block 11, other shapes.
    ("sam2.1_hiera_base_plus", NAME),
    # The same width: only the depth (and so where the stages change width) tells them apart.
    ("sam2_hiera_small", NAME),
])
def test_checkpoint_of_another_config_names_it(tmp_path, saved, into):
    path = tmp_path / "other.pt"
    torch.save(build_image_encoder(saved).state_dict(), path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(build_image_encoder(into), path)
    message = str(info.value)
    size = saved.split("_hiera_")[1]
    assert message.startswith(f"checkpoint {path} does not fit this encoder (")
    assert f"it is for sam2.1_hiera_{size} (or sam2_hiera_{size}, the same encoder), not for {into}" in message
    assert f"build_image_encoder('sam2.1_hiera_{size}', ...), sam2-fast --config sam2.1_hiera_{size}" in message
    assert "shape mismatches; shape mismatch for trunk." in message


def test_shape_mismatch_names_key_and_both_shapes(tmp_path):
    # The right config with one tensor of another shape: no other config to name, every problem listed.
    state = dict(build_image_encoder(NAME).state_dict())
    state["trunk.patch_embed.proj.weight"] = torch.zeros(112, 3, 7, 7)
    path = tmp_path / "edited.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(build_image_encoder(NAME), path)
    assert str(info.value) == (
        f"checkpoint {path} does not fit this encoder (is it the right config?): shape mismatch for "
        "trunk.patch_embed.proj.weight: checkpoint has (112, 3, 7, 7), the encoder expects (96, 3, 7, 7)"
    )


def test_missing_file_and_non_tensor_entries(tmp_path):
    # Missing: also a FileNotFoundError, as it was before it was a CheckpointError.
    (tmp_path / "sam2.1_hiera_tiny.pt").write_bytes(b"")
    with pytest.raises(CheckpointNotFoundError) as info:
        load_checkpoint(build_image_encoder(NAME), tmp_path / "nope.pt")
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value.__cause__, FileNotFoundError)
    assert str(info.value) == f"checkpoint {tmp_path / 'nope.pt'}: no such file; that folder holds sam2.1_hiera_tiny.pt"
    path = tmp_path / "odd.pt"
    torch.save({"trunk.pos_embed": [1, 2]}, path)
    with pytest.raises(CheckpointError, match=f"checkpoint {path}: entries that are not tensors: trunk.pos_embed"):
        load_checkpoint(build_image_encoder(NAME), path)


def test_checkpoint_with_code_is_refused(tmp_path):
    # weights_only loading: a pickle that would run code is rejected, not executed.
    path = tmp_path / "evil.pt"
    torch.save({"model": {"image_encoder.x": torch.zeros(1)}, "hook": sam2_fast.build_image_encoder}, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(build_image_encoder(NAME), path)
    assert str(info.value).startswith(f"checkpoint {path}: torch.load(weights_only=True) refused it: it holds Python "
                                      "objects besides tensors (Unsupported global: GLOBAL sam2_fast.model.build.")
    assert str(info.value).endswith("save the weights alone: torch.save(model.state_dict(), path)")
    assert isinstance(info.value.__cause__, pickle.UnpicklingError)


# ----------------------------------------------------------------------------------------------------------------
# Files that are not (whole) checkpoints. Each maker writes the file into a folder and returns its path.

def _state() -> dict:
    # Large enough that half of the file cuts into the tensor data, not only into the header.
    return {"trunk.pos_embed": torch.arange(4096, dtype=torch.float32).reshape(1, 4, 32, 32)}


def _cut(path, fraction: float = 0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


def _torch_file(folder, name="encoder.pt", **save_options):
    path = folder / name
    torch.save(_state(), path, **save_options)
    return path


def _safetensors_file(folder, name="encoder.safetensors"):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    path = folder / name
    safetensors_torch.save_file(_state(), str(path))
    return path


def _text_file(text: str, name: str = "encoder.pt"):
    def make(folder):
        path = folder / name
        path.write_text(text)
        return path
    return make


def _random_bytes(folder):
    path = folder / "encoder.pt"
    path.write_bytes(np.random.default_rng(5).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    return path


def _damaged_safetensors_header(folder):
    path = _safetensors_file(folder)
    data = bytearray(path.read_bytes())
    data[12:20] = b"\xff" * 8  # inside the JSON header, after its opening brace
    path.write_bytes(bytes(data))
    return path


def _empty(folder):
    path = folder / "encoder.pt"
    path.write_bytes(b"")
    return path


def _folder(folder):
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / "sam2.1_hiera_tiny.pt").write_bytes(b"")
    return folder / "checkpoints"


def _tensor_alone(folder):
    path = folder / "encoder.pt"
    torch.save(torch.zeros(3), path)
    return path


BAD_FILES = {
    # name: (maker, what the message says after "checkpoint PATH", the reader's error type it is chained from)
    "empty": (_empty, ": the file is empty (0 bytes), left by a download or copy that did not finish; re-download it",
              type(None)),
    "cut-short": (lambda folder: _cut(_torch_file(folder)), ": the file is cut short or damaged (", Exception),
    "cut-short-legacy-format": (lambda folder: _cut(_torch_file(folder, _use_new_zipfile_serialization=False)),
                                ": the file is cut short or damaged (", Exception),
    "text": (_text_file("learning rate 0.1\nepochs 3\n"),
             ": this looks like a text file (it starts with 'learning rate 0.1 epochs 3'), not a checkpoint; expected "
             "a SAM-2 .pt or .safetensors checkpoint", Exception),
    "html-page": (_text_file("<!DOCTYPE html>\n<html><head><title>Sign in</title>"),
                  ": an HTML page (it starts with '<!DOCTYPE html> <html><head><title>Sign ...'), not a checkpoint: "
                  "the download got a web page", Exception),
    "git-lfs-pointer": (_text_file("version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 155\n"),
                        ": a Git LFS pointer (it starts with", Exception),
    "random-bytes": (_random_bytes, ": not a checkpoint: its first bytes are neither torch.save's (a zip archive or a "
                     "pickle) nor a safetensors header; expected a SAM-2 .pt or .safetensors checkpoint", Exception),
    "safetensors-cut-short": (lambda folder: _cut(_safetensors_file(folder)),
                              ": the file is cut short or damaged (SafetensorError: ", Exception),
    "safetensors-damaged-header": (_damaged_safetensors_header, ": the file is cut short or damaged (SafetensorError: ",
                                   Exception),
    "safetensors-text": (_text_file("hello", name="model.safetensors"), ": this looks like a text file", Exception),
    "safetensors-named-pt": (lambda folder: _safetensors_file(folder, name="encoder.pt"),
                             ": a safetensors file: rename it to .safetensors", pickle.UnpicklingError),
    "pt-named-safetensors": (lambda folder: _torch_file(folder, name="encoder.safetensors"),
                             ": a torch.save checkpoint, not a safetensors file: rename it to .pt", Exception),
    "folder": (_folder, " is a folder: pass the checkpoint file, not its folder (it holds sam2.1_hiera_tiny.pt)",
               IsADirectoryError),
    "not-a-state-dict": (_tensor_alone, ": holds a Tensor, not a state_dict (a dict of tensors)", type(None)),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_file_names_itself_the_problem_and_the_fix(tmp_path, case):
    make, says, cause = BAD_FILES[case]
    path = make(tmp_path)
    with pytest.raises(CheckpointError) as info:
        build_image_encoder(NAME, checkpoint=path)
    assert isinstance(info.value, RuntimeError)  # what CheckpointError has always been: old except clauses hold
    assert str(info.value).startswith(f"checkpoint {path}{says}"), str(info.value)
    assert "\n" not in str(info.value)
    assert isinstance(info.value.__cause__, cause), repr(info.value.__cause__)
    assert (case == "folder") == isinstance(info.value, CheckpointNotFoundError)


def test_unreadable_file(tmp_path, monkeypatch):
    path = _torch_file(tmp_path)
    refuse_reads(monkeypatch, path)
    with pytest.raises(CheckpointError) as info:
        build_image_encoder(NAME, checkpoint=path)
    assert str(info.value) == (f"checkpoint {path}: permission denied: this user may not read it; check the file's "
                               "permissions")
    assert isinstance(info.value.__cause__, PermissionError)
