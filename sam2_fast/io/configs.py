"""The one source of truth for SAM-2's image-encoder variants (sam2 and sam2.1 x tiny, small, base_plus, large).

The values are those of the `sam2` package's hydra configs (``configs/sam2*/sam2*_hiera_{t,s,b+,l}.yaml``); the
image encoder is the same in sam2 and sam2.1, only the checkpoints differ.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Tuple


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Everything needed to build one image encoder: the Hiera trunk, the FPN neck, the scalp."""

    name: str
    embed_dim: int
    num_heads: int
    stages: Tuple[int, ...]
    global_att_blocks: Tuple[int, ...]
    window_pos_embed_bkg_spatial_size: Tuple[int, int]
    window_spec: Tuple[int, ...] = (8, 4, 14, 7)
    d_model: int = 256
    fpn_top_down_levels: Tuple[int, ...] = (2, 3)
    fpn_interp_model: str = "nearest"
    scalp: int = 1

    @property
    def backbone_channel_list(self) -> Tuple[int, ...]:
        """Trunk channels per stage, coarsest first (each stage doubles the width)."""
        return tuple(self.embed_dim * 2**stage for stage in reversed(range(len(self.stages))))

    def trunk_kwargs(self) -> dict:
        return dict(
            embed_dim=self.embed_dim,
            num_heads=self.num_heads,
            stages=self.stages,
            global_att_blocks=self.global_att_blocks,
            window_pos_embed_bkg_spatial_size=self.window_pos_embed_bkg_spatial_size,
            window_spec=self.window_spec,
        )

    def position_encoding_kwargs(self) -> dict:
        return dict(num_pos_feats=self.d_model, normalize=True, scale=None, temperature=10000)

    def neck_kwargs(self) -> dict:
        return dict(
            d_model=self.d_model,
            backbone_channel_list=list(self.backbone_channel_list),
            fpn_top_down_levels=list(self.fpn_top_down_levels),
            fpn_interp_model=self.fpn_interp_model,
        )


_SIZES = {
    "tiny": dict(embed_dim=96, num_heads=1, stages=(1, 2, 7, 2), global_att_blocks=(5, 7, 9),
                 window_pos_embed_bkg_spatial_size=(7, 7)),
    "small": dict(embed_dim=96, num_heads=1, stages=(1, 2, 11, 2), global_att_blocks=(7, 10, 13),
                  window_pos_embed_bkg_spatial_size=(7, 7)),
    "base_plus": dict(embed_dim=112, num_heads=2, stages=(2, 3, 16, 3), global_att_blocks=(12, 16, 20),
                      window_pos_embed_bkg_spatial_size=(14, 14)),
    "large": dict(embed_dim=144, num_heads=2, stages=(2, 6, 36, 4), global_att_blocks=(23, 33, 43),
                  window_pos_embed_bkg_spatial_size=(7, 7), window_spec=(8, 4, 16, 8)),
}

SIZES = tuple(_SIZES)
CONFIGS: Dict[str, EncoderConfig] = {
    f"{family}_hiera_{size}": EncoderConfig(name=f"{family}_hiera_{size}", **params)
    for family in ("sam2", "sam2.1")
    for size, params in _SIZES.items()
}
# The short names the sam2 checkpoints and yaml files use.
_ALIASES = {"t": "tiny", "s": "small", "b+": "base_plus", "l": "large"}
DEFAULT_CONFIG = "sam2.1_hiera_tiny"


def get_config(name: str) -> EncoderConfig:
    """The config called ``name``: ``sam2.1_hiera_base_plus``, also ``sam2.1_hiera_b+``, ``base_plus`` (sam2.1)."""
    if name in CONFIGS:
        return CONFIGS[name]
    family, _, size = name.rpartition("_hiera_")
    if not family:
        family, size = "sam2.1", name
    size = _ALIASES.get(size, size)
    key = f"{family}_hiera_{size}"
    if key not in CONFIGS:
        raise KeyError(f"unknown SAM-2 encoder config {name!r}: expected one of {', '.join(CONFIGS)}")
    return CONFIGS[key]
