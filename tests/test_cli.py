"""The sam2-fast command line: its commands, and bad image or checkpoint files reported in one line on stderr with
exit status 2 (the traceback with --debug)."""

import io
import subprocess
import sys

import numpy as np
import pytest
import torch

from sam2_fast.apps import cli


def test_info_lists_every_backend(capsys):
    assert cli.main(["info", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for backend in ("torch:", "triton:", "extension:"):
        assert backend in out
    assert "window_attention" in out


def test_encode_generated_sample_with_reference_and_save(tmp_path, capsys):
    out_file = tmp_path / "emb.pt"
    assert cli.main(["encode", "--size", "64", "--repeats", "1", "--compare-reference", "--out", str(out_file)]) == 0
    out = capsys.readouterr().out
    assert "vision_features     (1, 256, 4, 4) torch.float32" in out
    assert "max |ours - sam2|" in out
    errors = [float(line.split("=")[1].split()[0]) for line in out.splitlines() if "max |ours - sam2|" in line]
    assert len(errors) == 7 and max(errors) < 1e-3
    saved = torch.load(out_file, weights_only=True)
    assert saved[0]["vision_features"].shape == (1, 256, 4, 4)


def test_encode_image_files(tmp_path, capsys):
    image_module = pytest.importorskip("PIL.Image")
    paths = []
    for i in range(2):
        path = tmp_path / f"img{i}.png"
        image_module.new("RGB", (50, 40), color=(10 * i, 100, 200)).save(path)
        paths.append(str(path))
    assert cli.main(["encode", *paths, "--size", "64", "--repeats", "1", "--out", str(tmp_path / "e.pt")]) == 0
    saved = torch.load(tmp_path / "e.pt", weights_only=True)
    assert [entry["source"] for entry in saved] == paths
    assert not torch.equal(saved[0]["vision_features"], saved[1]["vision_features"])


def test_encode_rejects_bad_size():
    with pytest.raises(ValueError, match="multiples of 32"):
        cli.main(["encode", "--size", "100", "--repeats", "1"])


# ----------------------------------------------------------------------------------------------------------------
# Bad files

def _jpeg_bytes() -> bytes:
    image_module = pytest.importorskip("PIL.Image")
    pixels = np.random.default_rng(21).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    with io.BytesIO() as buffer:
        image_module.fromarray(pixels).save(buffer, format="JPEG")
        return buffer.getvalue()


def _bad_image(folder, case: str) -> str:
    """A bad image input of kind ``case`` in ``folder``; its path."""
    path = folder / {"text-named-png": "notes.png", "cut-short-jpeg": "half.jpg", "folder": "photos",
                     "missing": "gone.png"}[case]
    if case == "text-named-png":
        path.write_text("not an image\n")
    elif case == "cut-short-jpeg":
        path.write_bytes(_jpeg_bytes()[:-300])
    elif case == "folder":
        path.mkdir()
    return str(path)


BAD_IMAGE_REASONS = {
    "text-named-png": "not an image: this looks like a text file (it starts with 'not an image')",
    "cut-short-jpeg": "the image data is cut short or damaged (Pillow: image file is truncated",
    "folder": "a folder, not an image file",
    "missing": "no such file",
}


def _one_error_line(capsys, command: str) -> str:
    """The message of the one line on stderr (after "sam2-fast COMMAND: error: "), with nothing on stdout."""
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"sam2-fast {command}: error: "), lines[0]
    return lines[0][len(f"sam2-fast {command}: error: "):]


@pytest.mark.parametrize("case", list(BAD_IMAGE_REASONS))
def test_encode_bad_image_exits_2_with_one_line(tmp_path, capsys, case):
    good = tmp_path / "good.jpg"
    good.write_bytes(_jpeg_bytes())
    bad = _bad_image(tmp_path, case)
    # After a good image: every image is read before any work, so nothing is encoded or printed.
    assert cli.main(["encode", str(good), bad, "--size", "64", "--repeats", "1"]) == 2
    assert _one_error_line(capsys, "encode").startswith(f"image {bad}: {BAD_IMAGE_REASONS[case]}")


def _text_checkpoint(folder) -> str:
    path = folder / "sam2.1_hiera_tiny.pt"
    path.write_text("404: Not Found")
    return str(path)


def test_encode_bad_checkpoint_exits_2_with_one_line(tmp_path, capsys):
    checkpoint = _text_checkpoint(tmp_path)
    assert cli.main(["encode", "--size", "64", "--repeats", "1", "--checkpoint", checkpoint]) == 2
    assert _one_error_line(capsys, "encode") == (
        f"checkpoint {checkpoint}: this looks like a text file (it starts with '404: Not Found'), not a checkpoint; "
        "expected a SAM-2 .pt or .safetensors checkpoint")


def test_embed_bad_checkpoint_exits_2_before_touching_the_output(tmp_path, capsys):
    image = tmp_path / "a.jpg"
    image.write_bytes(_jpeg_bytes())
    out = tmp_path / "embeddings"
    missing = tmp_path / "weights" / "sam2.1_hiera_tiny.pt"
    assert cli.main(["embed", str(image), "--out", str(out), "--checkpoint", str(missing), "--image-size", "64",
                     "--workers", "0"]) == 2
    assert _one_error_line(capsys, "embed") == f"checkpoint {missing}: no such file"
    assert not out.exists()


def test_embed_unreadable_list_exits_2(tmp_path, capsys):
    listing = tmp_path / "images.txt"
    listing.write_bytes(b"\xff\xfe\x00binary")
    assert cli.main(["embed", str(listing), "--out", str(tmp_path / "out"), "--workers", "0"]) == 2
    assert _one_error_line(capsys, "embed") == f"image list {listing}: not a text file (one image path a line)"
    missing = tmp_path / "gone.txt"
    assert cli.main(["embed", str(missing), "--out", str(tmp_path / "out"), "--workers", "0"]) == 2
    assert _one_error_line(capsys, "embed") == f"image list {missing}: cannot be read (No such file or directory)"


def test_debug_shows_the_traceback_and_the_cause(tmp_path, capsys):
    bad = _bad_image(tmp_path, "text-named-png")
    assert cli.main(["encode", bad, "--size", "64", "--debug"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):")
    assert "PIL.UnidentifiedImageError: cannot identify image file" in err  # the chained cause
    assert "The above exception was the direct cause of the following exception" in err
    assert err.splitlines()[-1] == f"sam2-fast encode: error: image {bad}: " + BAD_IMAGE_REASONS["text-named-png"]


@pytest.mark.parametrize("module,command", [("sam2_fast", "encode"), ("sam2_fast.embed", "embed")])
def test_process_exit_status_is_2(tmp_path, module, command):
    # The real process: what a shell sees from the console script's main (python -m sam2_fast.embed is embed's).
    image, checkpoint = tmp_path / "a.jpg", _text_checkpoint(tmp_path)
    image.write_bytes(_jpeg_bytes())
    arguments = {"encode": ["encode", str(image), "--size", "64"],
                 "embed": [str(image), "--out", str(tmp_path / "out")]}[command]
    result = subprocess.run([sys.executable, "-m", module, *arguments, "--checkpoint", checkpoint],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        f"sam2-fast {command}: error: checkpoint {checkpoint}: this looks like a text file (it starts with "
        "'404: Not Found'), not a checkpoint; expected a SAM-2 .pt or .safetensors checkpoint"]
