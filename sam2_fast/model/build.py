"""Building an image encoder from a named config."""

from __future__ import annotations

import os
from typing import Optional, Union

import torch

from ..io.checkpoint import load_checkpoint
from ..io.configs import get_config
from .hiera import Hiera
from .image_encoder import FpnNeck, ImageEncoder
from .position_encoding import PositionEmbeddingSine


def build_image_encoder(
    name: str = "sam2.1_hiera_tiny",
    checkpoint: Optional[Union[str, os.PathLike]] = None,
    device: Optional[Union[str, torch.device]] = None,
    dtype: Optional[torch.dtype] = None,
    **trunk_overrides,
) -> ImageEncoder:
    """An :class:`ImageEncoder` for config ``name`` (e.g. ``"sam2.1_hiera_base_plus"``), in eval mode.

    With ``checkpoint``, loads SAM-2 weights from that file (see :func:`sam2_fast.load_checkpoint`; a file that
    cannot be loaded, or holds another config's weights, raises :class:`sam2_fast.CheckpointError` naming it and
    the likely fix); without, the weights are randomly initialised. ``device`` and ``dtype`` move the encoder
    after loading. ``trunk_overrides`` replace :class:`Hiera` arguments of the config, e.g.
    ``drop_path_rate=0.1`` or ``activation_checkpointing=True`` for fine-tuning.
    """
    config = get_config(name)
    trunk = Hiera(**{**config.trunk_kwargs(), **trunk_overrides})
    position_encoding = PositionEmbeddingSine(**config.position_encoding_kwargs(), warmup_cache=False)
    neck = FpnNeck(position_encoding, **config.neck_kwargs())
    encoder = ImageEncoder(trunk, neck, scalp=config.scalp)
    if checkpoint is not None:
        load_checkpoint(encoder, checkpoint)
    return encoder.to(device=device, dtype=dtype).eval()
