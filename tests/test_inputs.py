"""Bad inputs raise errors that say what was expected and what came; image files come to RGB as SAM-2 brings them,
and one that cannot be read raises an error naming it and the reason."""

import io

import numpy as np
import pytest
import torch

from sam2_fast import build_image_encoder
from sam2_fast.io.images import ImageError, read_rgb

from helpers import refuse_reads

try:
    from PIL import Image, ImageOps
except ImportError:  # Pillow is a test dependency; without it only the image-file tests are skipped
    Image = ImageOps = None

needs_pillow = pytest.mark.skipif(Image is None, reason="needs Pillow")


@pytest.fixture(scope="module")
def encoder():
    return build_image_encoder("sam2.1_hiera_tiny")


@pytest.mark.parametrize(
    "shape,match",
    [
        ((3, 64, 64), r"expected input of shape \(B, 3, H, W\), got \(3, 64, 64\)"),
        ((1, 4, 64, 64), r"expected input of shape \(B, 3, H, W\), got \(1, 4, 64, 64\)"),
        ((1, 3, 100, 64), r"H, W positive multiples of 32, got \(1, 3, 100, 64\).*windowed positional embedding.*128x64"),
        ((1, 3, 64, 48), r"multiples of 32, got \(1, 3, 64, 48\)"),
        ((0, 3, 64, 64), r"B >= 1"),
    ],
)
def test_bad_shapes(encoder, shape, match):
    with pytest.raises(ValueError, match=match):
        encoder(torch.zeros(shape))


def test_integer_image_is_refused(encoder):
    with pytest.raises(TypeError, match=r"expected a floating-point input .*got torch.uint8"):
        encoder(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))


def test_dtype_must_match_weights_outside_autocast(encoder):
    with pytest.raises(TypeError, match=r"expected input of dtype torch.float32 .*got torch.bfloat16"):
        encoder(torch.zeros(1, 3, 64, 64, dtype=torch.bfloat16))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = encoder(torch.zeros(1, 3, 64, 64, dtype=torch.bfloat16))
    assert out["vision_features"].shape == (1, 256, 4, 4)


def test_device_must_match_weights(encoder):
    with pytest.raises(ValueError, match=r"expected input on cpu .*got meta"):
        encoder(torch.zeros(1, 3, 64, 64, device="meta"))


def test_not_a_tensor(encoder):
    with pytest.raises(TypeError, match="expected a torch.Tensor"):
        encoder([[0.0]])


def test_unknown_config():
    with pytest.raises(KeyError, match="unknown SAM-2 encoder config 'hiera_huge'"):
        build_image_encoder("hiera_huge")


# ----------------------------------------------------------------------------------------------------------------
# Image files: converted to RGB as SAM-2 converts them; unreadable ones named with the reason.

SIDE = 24  # square, so that the reference's loader resizes to the same size, which Pillow does as a plain copy


def _reference_rgb(path) -> torch.Tensor:
    """(H, W, 3) uint8 as SAM-2's own image loader (its video frames') decodes the file: Image.open, convert("RGB")."""
    misc = pytest.importorskip("sam2.utils.misc")
    pixels, height, width = misc._load_img_as_tensor(str(path), SIDE)
    assert (height, width) == (SIDE, SIDE)
    return torch.from_numpy((pixels * 255).round().numpy()).to(torch.uint8).permute(1, 2, 0)


def _saved(image, path, **options):
    image.save(path, **options)
    return path


def _palette_image(rng, transparency):
    image = Image.fromarray(rng.integers(0, 256, (SIDE, SIDE), dtype=np.uint8), mode="L").convert("P")
    image.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tobytes())
    return image, {} if transparency is None else {"transparency": transparency}


def _mode_file(mode: str, folder, rng):
    """A SIDE x SIDE image of ``mode`` with seeded random pixels, written in a format that keeps the mode."""
    if mode in ("P", "P-transparent"):
        image, options = _palette_image(rng, None if mode == "P" else 7)
        return _saved(image, folder / f"{mode}.png", **options)
    channels = {"L": None, "LA": 2, "RGBA": 4, "CMYK": 4}
    if mode in channels:
        shape = (SIDE, SIDE) if channels[mode] is None else (SIDE, SIDE, channels[mode])
        image = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode)
        return _saved(image, folder / f"{mode}.{'tiff' if mode == 'CMYK' else 'png'}")
    arrays = {
        "1": lambda: rng.integers(0, 2, (SIDE, SIDE)).astype(bool),
        "I;16": lambda: rng.integers(0, 1024, (SIDE, SIDE), dtype=np.uint16),  # a quarter of them below 256
        "I": lambda: rng.integers(-300, 600, (SIDE, SIDE), dtype=np.int32),
        "F": lambda: rng.uniform(-50.0, 300.0, (SIDE, SIDE)).astype(np.float32),
    }
    image = Image.fromarray(arrays[mode]())
    assert image.mode == mode
    return _saved(image, folder / f"{mode.replace(';', '_')}.{'png' if mode in ('1', 'I;16') else 'tiff'}")


def _stored(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.array(image)


# What Pillow's convert("RGB") gives, and so SAM-2, for each mode, from the pixels as stored (None: the reference
# comparison alone; Pillow's CMYK and float conversions are its own formulas).
EXPECTED_RGB = {
    "L": lambda stored, path: np.repeat(stored[..., None], 3, axis=2),
    "1": lambda stored, path: np.repeat(stored[..., None].astype(np.uint8) * 255, 3, axis=2),
    "LA": lambda stored, path: np.repeat(stored[..., :1], 3, axis=2),  # alpha dropped, not composited
    "RGBA": lambda stored, path: stored[..., :3],
    "P": lambda stored, path: _palette(path)[stored],
    "P-transparent": lambda stored, path: _palette(path)[stored],  # the transparent index keeps its colour
    "I;16": lambda stored, path: np.repeat(np.minimum(stored, 255).astype(np.uint8)[..., None], 3, axis=2),
    "I": lambda stored, path: np.repeat(np.clip(stored, 0, 255).astype(np.uint8)[..., None], 3, axis=2),
    "CMYK": None,
    "F": None,
}


def _palette(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.array(image.getpalette(), dtype=np.uint8).reshape(-1, 3)


@needs_pillow
@pytest.mark.parametrize("mode", list(EXPECTED_RGB))
def test_image_modes_are_converted_as_sam2_converts_them(tmp_path, mode):
    path = _mode_file(mode, tmp_path, np.random.default_rng(sum(map(ord, mode))))
    with Image.open(path) as image:
        assert image.mode == mode.split("-")[0]
    ours = read_rgb(str(path))
    assert ours.dtype == torch.uint8 and ours.shape == (SIDE, SIDE, 3)
    assert torch.equal(ours, _reference_rgb(path))
    if EXPECTED_RGB[mode] is not None:
        assert torch.equal(ours, torch.from_numpy(EXPECTED_RGB[mode](_stored(path), path)))
    if mode == "I;16":  # values above 255 are clipped, not rescaled: most of a 16-bit image is white
        assert (ours == 255).float().mean() > 0.5


@needs_pillow
def test_exif_orientation_is_not_applied(tmp_path):
    # SAM-2 never calls ImageOps.exif_transpose: a photo whose EXIF says "rotate 90 degrees clockwise" (6) is
    # encoded as its pixels are stored, and so is it here.
    rng = np.random.default_rng(9)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    path = _saved(Image.fromarray(rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)), tmp_path / "photo.jpg",
                  exif=exif)
    with Image.open(path) as image:
        assert image.getexif()[0x0112] == 6
        upright = torch.from_numpy(np.array(ImageOps.exif_transpose(image).convert("RGB")))
    ours = read_rgb(str(path))
    assert torch.equal(ours, _reference_rgb(path))
    assert torch.equal(ours, torch.from_numpy(_stored(path)))
    assert not torch.equal(ours, upright)


def _image_bytes(suffix: str) -> bytes:
    rng = np.random.default_rng(3)
    with io.BytesIO() as buffer:
        Image.fromarray(rng.integers(0, 256, (37, 51, 3), dtype=np.uint8)).save(buffer, format=suffix)
        return buffer.getvalue()


def _damaged_png() -> bytes:
    data = bytearray(_image_bytes("PNG"))
    data[-60:-40] = b"\x00" * 20  # inside the compressed pixel data
    return bytes(data)


BAD_IMAGES = {
    # name: (file name, its contents (None: no such file; "folder": a folder), what the message says after
    # "image PATH: ", the error it is chained from)
    "missing": ("gone.png", None, "no such file", FileNotFoundError),
    "folder": ("photos", "folder", "a folder, not an image file", IsADirectoryError),
    "empty": ("empty.png", lambda: b"", "the file is empty (0 bytes)", OSError),
    "text-named-png": ("notes.png", lambda: b"a shopping list\nmilk\n",
                       "not an image: this looks like a text file (it starts with 'a shopping list milk')", OSError),
    "random-bytes": ("noise.jpg", lambda: np.random.default_rng(4).integers(0, 256, 3000, dtype=np.uint8).tobytes(),
                     "not an image file Pillow can read", OSError),
    "cut-short-jpeg": ("half.jpg", lambda: _image_bytes("JPEG")[:-400],
                       "the image data is cut short or damaged (Pillow: image file is truncated", OSError),
    "cut-short-png": ("half.png", lambda: _image_bytes("PNG")[:-400],
                      "the image data is cut short or damaged (Pillow: image file is truncated", OSError),
    "damaged-png": ("damaged.png", _damaged_png, "the image data is cut short or damaged (Pillow: ", OSError),
}


def make_bad_image(folder, case: str) -> str:
    """The file (or folder) of BAD_IMAGES[case] in ``folder``; its path."""
    name, contents = BAD_IMAGES[case][:2]
    path = folder / name
    if contents == "folder":
        path.mkdir()
    elif contents is not None:
        path.write_bytes(contents())
    return str(path)


@needs_pillow
@pytest.mark.parametrize("case", list(BAD_IMAGES))
def test_unreadable_image_names_itself_and_the_reason(tmp_path, case):
    path = make_bad_image(tmp_path, case)
    says, cause = BAD_IMAGES[case][2:]
    with pytest.raises(ImageError) as info:
        read_rgb(path)
    assert isinstance(info.value, OSError)  # what Pillow raised before: old except clauses hold
    assert str(info.value).startswith(f"image {path}: {says}"), str(info.value)
    assert "\n" not in str(info.value)
    assert isinstance(info.value.__cause__, cause), repr(info.value.__cause__)


@needs_pillow
def test_image_without_read_permission(tmp_path, monkeypatch):
    path = tmp_path / "private.png"
    path.write_bytes(_image_bytes("PNG"))
    refuse_reads(monkeypatch, path)
    with pytest.raises(ImageError, match=f"^image {path}: permission denied: this user may not read it$"):
        read_rgb(str(path))
