"""Image files to SAM-2 encoder inputs, exactly as SAM-2 prepares them.

SAM-2 (``SAM2Transforms``) turns an RGB image into floats in [0, 1], resizes it to the model's square size with
bilinear interpolation and antialiasing (torchvision's ``Resize`` on a tensor), and normalises it with the ImageNet
mean and std. Pillow decodes; the resize is torch's ``interpolate``, the same call torchvision makes, so the
result matches SAM-2's without torchvision.

Files come to RGB as SAM-2 brings them: ``np.array(Image.open(path).convert("RGB"))``, the line of its notebooks
before ``SAM2ImagePredictor.set_image`` and of its video frame loader (``sam2.utils.misc._load_img_as_tensor``).
``set_image`` itself takes only 3-channel images. What Pillow's ``convert("RGB")`` does, and so what SAM-2 and
we do, for each mode:

- ``L`` (grayscale), ``1`` (bilevel, as 0 or 255): the one channel repeated three times.
- ``RGBA``, ``LA``: the alpha channel dropped, not composited over a background.
- ``P`` (palette): each index looked up in the palette; a transparent index keeps its palette colour.
- ``I;16``, ``I`` (16- and 32-bit integers), ``F`` (float): values clipped to 0..255, not rescaled, so a
  16-bit image whose values pass 255 comes out mostly white, as it does in SAM-2.
- ``CMYK``: Pillow's plain conversion, without any ICC profile.
- EXIF orientation is not applied (neither ``Image.open`` nor ``convert`` applies it, and SAM-2 calls no
  ``ImageOps.exif_transpose``): a photo whose EXIF says "rotate 90 degrees" is encoded as stored.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F

# SAM-2's image normalisation (ImageNet statistics), applied after scaling pixels to [0, 1].
PIXEL_MEAN = (0.485, 0.456, 0.406)
PIXEL_STD = (0.229, 0.224, 0.225)
# What a folder is searched for (case-insensitive); files named explicitly are tried whatever their name.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")


def is_image_name(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in IMAGE_SUFFIXES


class ImageError(OSError):
    """An image file that cannot be read: missing, a folder, unreadable, empty, not an image, cut short or damaged.
    The message names the file and the reason."""


def text_start(head: bytes) -> Optional[str]:
    """The start of a file (its first bytes, ``head``) as text, if it reads as text, else None: tells a text file
    named ``.png`` or ``.pt`` from a damaged image or checkpoint."""
    text = head.decode("utf-8", errors="replace")
    readable = sum(character.isprintable() and character != "\ufffd" or character in "\t\r\n" for character in text)
    if not text or "\x00" in text or readable < 0.95 * len(text):
        return None
    start = " ".join(text.split())
    return start[:40] + ("..." if len(start) > 40 else "")


def _unreadable_reason(path: str, error: Exception) -> str:
    """Why Pillow could not open or decode ``path``, in a user's words."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(error, FileNotFoundError):
        return "no such file"
    if isinstance(error, IsADirectoryError) or os.path.isdir(path):
        return "a folder, not an image file"
    if isinstance(error, PermissionError):
        return "permission denied: this user may not read it"
    if isinstance(error, Image.DecompressionBombError):
        return f"too large to decode ({error})"
    if isinstance(error, UnidentifiedImageError):
        with open(path, "rb") as file:
            head = file.read(512)
        if not head:
            return "the file is empty (0 bytes)"
        start = text_start(head)
        if start is not None:
            return f"not an image: this looks like a text file (it starts with {start!r})"
        return "not an image file Pillow can read (an unknown format, or damaged before the end of its header)"
    return f"the image data is cut short or damaged (Pillow: {error}); re-export or re-download it"


def read_rgb(path: str) -> torch.Tensor:
    """The image file at ``path`` as a (H, W, 3) uint8 tensor, converted to RGB as SAM-2 converts it (see the
    module's doc for each mode; EXIF orientation is not applied). Raises :class:`ImageError` naming the file and
    the reason when it cannot be read, chained from Pillow's or the OS's error."""
    try:
        from PIL import Image
    except ImportError as error:
        raise ImportError("reading image files needs Pillow: pip install pillow") from error
    import numpy as np

    # Pillow's decoders raise OSError for most bad data, and SyntaxError, ValueError, struct.error and others for
    # some damaged headers: every failure here is the file's.
    try:
        with Image.open(path) as image:
            return torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8))
    except Exception as error:
        raise ImageError(f"image {path}: {_unreadable_reason(path, error)}") from error


def resize(rgb: torch.Tensor, size: int) -> torch.Tensor:
    """A (H, W, 3) uint8 image as a (3, size, size) float tensor in [0, 1], resized as SAM-2 resizes (no aspect
    ratio kept)."""
    pixels = rgb.permute(2, 0, 1).float().div_(255.0)
    return F.interpolate(pixels[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]


def normalize(images: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) pixels in [0, 1] minus the ImageNet mean, over its std."""
    mean = torch.tensor(PIXEL_MEAN, dtype=images.dtype).view(3, 1, 1)
    std = torch.tensor(PIXEL_STD, dtype=images.dtype).view(3, 1, 1)
    return (images - mean) / std


def load_image(path: str, size: int) -> torch.Tensor:
    """An image file as a (3, size, size) tensor in [0, 1], resized as SAM-2 resizes."""
    return resize(read_rgb(path), size)


def model_input(path: str, size: int) -> torch.Tensor:
    """An image file as SAM-2's encoder takes it: (3, size, size), resized and normalised."""
    return normalize(load_image(path, size))
