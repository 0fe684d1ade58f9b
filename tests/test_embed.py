"""sam2-fast embed: embeddings equal to calling the encoder, unreadable files reported without stopping the run,
resume after a killed run or a cut-short shard, and torchrun processes that together embed every image once."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import sam2_fast
from sam2_fast.apps import cli, embed
from sam2_fast.io.images import model_input

from helpers import FP32_RELATIVE_TOLERANCE, assert_close_verbose, seeded_state

Image = pytest.importorskip("PIL.Image")
safetensors_torch = pytest.importorskip("safetensors.torch")
np = pytest.importorskip("numpy")

CONFIG = "sam2.1_hiera_tiny"
IMAGE_SIZE = 64  # the real model's is 1024; the pipeline is the same at any multiple of 32
GOOD = ["a.png", "b.jpg", "c_gray.png", "d_rgba.png", "sub/e.png", "sub/f.bmp"]
BAD = ["broken.jpg", "notes.png"]  # a JPEG cut in half; a text file with an image name


def _write_images(folder, names, seed: int = 0):
    rng = np.random.default_rng(seed)
    for i, name in enumerate(names):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        height, width = 37 + 9 * i, 51 + 5 * i  # odd sizes, none square
        mode, channels = {"gray": ("L", None), "rgba": ("RGBA", 4)}.get(name.split("_")[-1].split(".")[0], ("RGB", 3))
        shape = (height, width) if channels is None else (height, width, channels)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(path)


@pytest.fixture(scope="module")
def image_set(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    _write_images(folder, GOOD)
    good_jpeg = (folder / "b.jpg").read_bytes()
    (folder / "broken.jpg").write_bytes(good_jpeg[: len(good_jpeg) // 2])
    (folder / "notes.png").write_text("not an image")
    (folder / "readme.md").write_text("not searched for: no image suffix")
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "encoder.pt"
    torch.save(seeded_state(CONFIG, seed=41), path)
    return str(path)


@pytest.fixture(scope="module")
def encoder(checkpoint):
    return sam2_fast.build_image_encoder(CONFIG, checkpoint=checkpoint)


def _arguments(out, checkpoint, *extra):
    return ["--out", str(out), "--config", CONFIG, "--checkpoint", checkpoint, "--image-size", str(IMAGE_SIZE),
            "--batch-size", "3", "--shard-size", "4", *extra]


def _index(out) -> list:
    with open(os.path.join(out, "index.jsonl")) as index:
        return [json.loads(line) for line in index]


def _embedded(out) -> dict:
    """path -> {feature: tensor} over every complete shard; fails if an image is in two shards."""
    complete, incomplete = embed.scan_shards(str(out), remove_incomplete=False)
    assert not incomplete
    rows = {}
    for shard, record in complete.items():
        tensors = safetensors_torch.load_file(os.path.join(out, "shards", shard))
        for row, path in enumerate(record["paths"]):
            assert path not in rows, f"{path} embedded twice"
            rows[path] = {name: tensor[row] for name, tensor in tensors.items()}
    return rows


def _assert_same_embeddings(actual: dict, expected: dict):
    assert sorted(actual) == sorted(expected)
    for path, features in expected.items():
        assert sorted(actual[path]) == sorted(features)
        for name, tensor in features.items():
            # Batches group images differently across runs and processes: only float summation order differs.
            scale = max(tensor.abs().max().item(), 1.0)
            assert_close_verbose(actual[path][name], tensor, atol=FP32_RELATIVE_TOLERANCE * scale, name=f"{path} {name}")


@pytest.fixture(scope="module")
def single_process_run(image_set, checkpoint, tmp_path_factory):
    """One in-process run through the console script's entry point, with decoding workers, over the folder, a
    list file (naming an image again, and a missing one) and a non-image named explicitly."""
    out = tmp_path_factory.mktemp("single") / "embeddings"
    listing = image_set / "more.txt"
    listing.write_text("a.png\n# a comment\n\nmissing.png\n")
    assert cli.main(["embed", str(image_set), str(listing), str(image_set / "readme.md"),
                     *_arguments(out, checkpoint, "--workers", "2")]) == 0
    return out


def test_embeddings_equal_the_encoder_and_failures_are_indexed(single_process_run, image_set, encoder):
    index = _index(single_process_run)
    statuses = {os.path.relpath(line["path"], image_set): line["status"] for line in index}
    # One line per input, each once: the folder's images in order, then the list's new entry, then the explicit file.
    assert list(statuses) == sorted(GOOD + BAD) + ["missing.png", "readme.md"]
    assert {name for name, status in statuses.items() if status == "ok"} == set(GOOD)
    errors = {os.path.relpath(line["path"], image_set): line["error"] for line in index if line["status"] == "error"}
    # Each names the file and the reason, as read_rgb's ImageError says it.
    reasons = {name: error[len(f"image {image_set / name}: "):] for name, error in errors.items()}
    assert all(error.startswith(f"image {image_set / name}: ") for name, error in errors.items())
    assert reasons["broken.jpg"].startswith("the image data is cut short or damaged (Pillow: image file is truncated")
    assert reasons["notes.png"] == "not an image: this looks like a text file (it starts with 'not an image')"
    assert reasons["readme.md"].startswith("not an image: this looks like a text file (it starts with 'not searched")
    assert reasons["missing.png"] == "no such file"

    embedded = _embedded(single_process_run)
    for line in index:
        if line["status"] != "ok":
            continue
        with Image.open(line["path"]) as image:
            assert line["original_size"] == [image.height, image.width]
        tensors = safetensors_torch.load_file(os.path.join(single_process_run, line["shard"]))
        with torch.no_grad():
            expected = encoder(model_input(line["path"], IMAGE_SIZE)[None])
        stored = {name: tensors[name][line["row"]] for name in embed.FEATURES}
        for name, tensor in stored.items():
            assert torch.equal(tensor, embedded[line["path"]][name])
        _assert_same_embeddings({line["path"]: stored}, {line["path"]: {
            "vision_features": expected["vision_features"][0],
            "backbone_fpn.0": expected["backbone_fpn"][0][0],
            "backbone_fpn.1": expected["backbone_fpn"][1][0],
        }})


def _embed_command(*arguments):
    return [sys.executable, "-m", "sam2_fast.embed", *arguments]


def test_resume_after_a_killed_run_and_a_cut_short_shard(tmp_path, capsys, checkpoint, encoder):
    folder = tmp_path / "many"
    names = [f"img{i:02d}.png" for i in range(12)]
    held = 5
    _write_images(folder, names[:held] + names[held + 1:], seed=1)
    # A named pipe that nobody writes to: reading it blocks, so the run is killed at a known point, with the
    # images before it embedded (one shard each) and the ones after it not started.
    os.mkfifo(folder / names[held])
    out = tmp_path / "embeddings"
    shards = out / "shards"
    arguments = _arguments(out, checkpoint, "--batch-size", "1", "--shard-size", "1", "--workers", "0",
                           "--features", "vision_features,backbone_fpn.1")
    process = subprocess.Popen(_embed_command(str(folder), *arguments), cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if shards.is_dir() and len([p for p in shards.iterdir() if p.suffix == ".safetensors"]) >= held:
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    os.remove(folder / names[held])
    _write_images(folder, [names[held]], seed=2)

    kept = sorted(p.name for p in shards.iterdir() if p.suffix == ".safetensors")
    assert len(kept) == held
    # What a crash while writing leaves: a temporary file, and (a filesystem that lost the tail of a renamed file)
    # a shard cut short.
    (shards / ".interrupted.safetensors.tmp").write_bytes(b"partial")
    cut = shards / kept[0]
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    before = {name: (shards / name).stat().st_mtime_ns for name in kept[1:]}

    assert embed.main([str(folder), *arguments]) == 0
    stdout = capsys.readouterr().out
    assert f"removed shards/{kept[0]}: cut short" in stdout
    assert f"{len(names)} inputs: {len(kept) - 1} already embedded" in stdout
    assert not (shards / ".interrupted.safetensors.tmp").exists()
    for name, mtime in before.items():  # finished shards are kept as they were
        assert (shards / name).stat().st_mtime_ns == mtime
    embedded = _embedded(out)
    assert sorted(embedded) == sorted(str(folder / name) for name in names)
    assert [line["status"] for line in _index(out)] == ["ok"] * len(names)
    with torch.no_grad():
        expected = encoder(model_input(str(folder / names[0]), IMAGE_SIZE)[None])
    _assert_same_embeddings({"first": embedded[str(folder / names[0])]}, {"first": {
        "vision_features": expected["vision_features"][0], "backbone_fpn.1": expected["backbone_fpn"][1][0]}})


def _torchrun(processes: int, inputs, arguments, cwd):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
               "-m", "sam2_fast.embed", *inputs, *arguments]
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _index_summary(out) -> list:
    return sorted((line["path"], line["status"], line.get("original_size")) for line in _index(out))


def test_torchrun_two_processes_after_one_embed_each_image_once(tmp_path, image_set, checkpoint, single_process_run):
    # A first run of one process over half the images, then two gloo processes under torchrun over all of them:
    # the second splits only what is left, and together they give the single-process result exactly once each.
    out = tmp_path / "resumed"
    first_half = tmp_path / "first_half.txt"
    first_half.write_text("\n".join(str(image_set / name) for name in GOOD[:3]) + "\n")
    assert embed.main([str(first_half), *_arguments(out, checkpoint, "--workers", "0")]) == 0
    first_shards = set(os.listdir(out / "shards"))

    inputs = [str(image_set), str(image_set / "more.txt"), str(image_set / "readme.md")]
    stdout = _torchrun(2, inputs, _arguments(out, checkpoint, "--batch-size", "1", "--shard-size", "1",
                                             "--workers", "1"), tmp_path)
    assert "10 inputs: 3 already embedded, 7 to embed over 2 processes" in stdout
    shards = set(os.listdir(out / "shards"))
    assert first_shards <= shards
    assert {name.split("-rank")[1][:3] for name in shards - first_shards} == {"000", "001"}
    assert _index_summary(out) == _index_summary(single_process_run)
    _assert_same_embeddings(_embedded(out), _embedded(single_process_run))


def test_other_settings_in_the_same_folder_are_refused(tmp_path, image_set, checkpoint, single_process_run):
    with pytest.raises(SystemExit, match="holds embeddings made with other settings"):
        embed.main([str(image_set / "a.png"), *_arguments(single_process_run, checkpoint, "--workers", "0",
                                                          "--features", "vision_features")])


def test_bad_arguments_are_explained(tmp_path, capsys):
    with pytest.raises(SystemExit, match="--image-size must be a multiple of 32"):
        embed.main(["x.png", "--out", str(tmp_path), "--image-size", "100"])
    with pytest.raises(SystemExit):
        embed.main(["x.png", "--out", str(tmp_path), "--features", "vision_features,mask"])
    assert "expected a comma-separated subset of vision_features, backbone_fpn.0" in capsys.readouterr().err


def test_a_foreign_file_among_the_shards_is_left_alone(tmp_path):
    shards = tmp_path / "out" / "shards"
    shards.mkdir(parents=True)
    safetensors_torch.save_file({"weights": torch.zeros(3)}, str(shards / "mine.safetensors"))
    with pytest.raises(SystemExit, match="mine.safetensors is a safetensors file but not a sam2-fast embed shard"):
        embed.main(["x.png", "--out", str(tmp_path / "out")])
    assert (shards / "mine.safetensors").exists()
