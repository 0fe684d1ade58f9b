"""Image files to SAM-2 encoder inputs, exactly as SAM-2 prepares them.

SAM-2 (``SAM2Transforms``) turns an RGB image into floats in [0, 1], resizes it to the model's square size with
bilinear interpolation and antialiasing (torchvision's ``Resize`` on a tensor), and normalises it with the ImageNet
mean and std. Pillow decodes; the resize is torch's ``interpolate``, the same call torchvision makes, so the
result matches SAM-2's without torchvision.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

# SAM-2's image normalisation (ImageNet statistics), applied after scaling pixels to [0, 1].
PIXEL_MEAN = (0.485, 0.456, 0.406)
PIXEL_STD = (0.229, 0.224, 0.225)
# What a folder is searched for (case-insensitive); files named explicitly are tried whatever their name.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")


def is_image_name(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in IMAGE_SUFFIXES


def read_rgb(path: str) -> torch.Tensor:
    """The image file at ``path`` as a (H, W, 3) uint8 tensor. Raises what Pillow raises for files it cannot
    decode (``PIL.UnidentifiedImageError``, ``OSError`` for truncated data)."""
    try:
        from PIL import Image
    except ImportError as error:
        raise ImportError("reading image files needs Pillow: pip install pillow") from error
    import numpy as np

    with Image.open(path) as image:
        return torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8))


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
