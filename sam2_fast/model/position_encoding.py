"""Sine position encoding of a feature map, as SAM-2's FPN neck uses it."""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.nn as nn

from .. import ops


class PositionEmbeddingSine(nn.Module):
    """Sine/cosine encoding of (y, x) positions, ``num_pos_feats`` channels (half for y, half for x).

    Same values and constructor as `sam2.modeling.position_encoding.PositionEmbeddingSine`. One encoding is
    computed per (height, width, device, dtype) and cached; ``forward`` returns it expanded over the batch (a
    broadcast view, not the reference's per-image copy), so treat the result as read-only.
    """

    def __init__(
        self,
        num_pos_feats: int,
        temperature: int = 10000,
        normalize: bool = True,
        scale: Optional[float] = None,
        warmup_cache: bool = True,
        image_size: int = 1024,
        strides: Tuple[int, ...] = (4, 8, 16, 32),
    ):
        super().__init__()
        if num_pos_feats % 2:
            raise ValueError(f"num_pos_feats must be even (half for y, half for x), got {num_pos_feats}")
        if scale is not None and not normalize:
            raise ValueError("normalize should be True if scale is passed")
        self.num_pos_feats = num_pos_feats // 2
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale
        self.cache: dict = {}
        if warmup_cache and torch.cuda.is_available():
            for stride in strides:
                self.encoding(image_size // stride, image_size // stride, torch.device("cuda"), torch.float32)

    def _compute(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        return ops.sine_position_encoding(
            height, width, self.num_pos_feats, float(self.temperature), self.normalize, float(self.scale), device
        )

    def encoding(self, height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The (1, 2 * num_pos_feats, height, width) encoding on ``device`` in ``dtype`` (cached)."""
        if torch.compiler.is_compiling():
            return self._compute(height, width, device).to(dtype)
        key = (height, width, torch.device(device), dtype)
        cached = self.cache.get(key)
        if cached is None:
            with torch.no_grad():
                cached = self._compute(height, width, device).to(dtype)
            self.cache[key] = cached
        return cached

    def cached_tensors(self) -> List[torch.Tensor]:
        """Every encoding computed so far (a captured CUDA graph returns them as its ``vision_pos_enc``)."""
        return list(self.cache.values())

    def cache_sources(self) -> List[torch.Tensor]:
        """None: the encodings depend on the constructor's arguments only."""
        return []

    @torch.no_grad()
    def forward(self, x: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """Encoding for the map ``x`` (B, C, H, W): (B, num_pos_feats * 2, H, W), fp32 unless ``dtype`` is given."""
        encoding = self.encoding(x.shape[-2], x.shape[-1], x.device, dtype or torch.float32)
        return encoding.expand(x.shape[0], -1, -1, -1)

    def _encode_xy(self, x: torch.Tensor, y: torch.Tensor):
        if not (len(x) == len(y) and x.ndim == y.ndim == 1):
            raise ValueError(f"expected two 1-D tensors of equal length, got shapes {tuple(x.shape)} and {tuple(y.shape)}")
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=x.device)
        dim_t = self.temperature ** (2 * (dim_t // 2) / self.num_pos_feats)
        pos_x = (x * self.scale)[:, None] / dim_t
        pos_y = (y * self.scale)[:, None] / dim_t
        pos_x = torch.stack((pos_x[:, 0::2].sin(), pos_x[:, 1::2].cos()), dim=2).flatten(1)
        pos_y = torch.stack((pos_y[:, 0::2].sin(), pos_y[:, 1::2].cos()), dim=2).flatten(1)
        return pos_x, pos_y

    @torch.no_grad()
    def encode_boxes(self, x, y, w, h):
        pos_x, pos_y = self._encode_xy(x, y)
        return torch.cat((pos_y, pos_x, h[:, None], w[:, None]), dim=1)

    encode = encode_boxes

    @torch.no_grad()
    def encode_points(self, x, y, labels):
        (bx, nx), (by, ny), (bl, nl) = x.shape, y.shape, labels.shape
        if not (bx == by == bl and nx == ny == nl):
            raise ValueError(f"x, y and labels must have one shape, got {(bx, nx)}, {(by, ny)}, {(bl, nl)}")
        pos_x, pos_y = self._encode_xy(x.flatten(), y.flatten())
        pos_x, pos_y = pos_x.reshape(bx, nx, -1), pos_y.reshape(by, ny, -1)
        return torch.cat((pos_y, pos_x, labels[:, :, None]), dim=2)
