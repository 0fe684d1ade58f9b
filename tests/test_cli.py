"""The sam2-fast command line."""

import pytest
import torch

from sam2_fast import cli


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
