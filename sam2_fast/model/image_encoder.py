"""SAM-2's FPN neck and the image encoder (trunk + neck), with the reference's arguments and output dict."""

from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from .layers import Conv2d
from .position_encoding import PositionEmbeddingSine


class FpnNeck(nn.Module):
    """Feature pyramid over the trunk's stages: 1x1 lateral convs and a top-down path on ``fpn_top_down_levels``.

    The top-down term is upsampled in float32, as in the reference, so a top-down level comes out float32 under
    bf16 autocast while the other levels keep the conv's dtype.
    """

    def __init__(
        self,
        position_encoding: nn.Module,
        d_model: int,
        backbone_channel_list: List[int],
        kernel_size: int = 1,
        stride: int = 1,
        padding: int = 0,
        fpn_interp_model: str = "bilinear",
        fuse_type: str = "sum",
        fpn_top_down_levels: Optional[List[int]] = None,
    ):
        super().__init__()
        self.position_encoding = position_encoding
        self.convs = nn.ModuleList()
        self.backbone_channel_list = backbone_channel_list
        self.d_model = d_model
        for dim in backbone_channel_list:
            lateral = nn.Sequential()
            lateral.add_module(
                "conv", Conv2d(dim, d_model, kernel_size=kernel_size, stride=stride, padding=padding)
            )
            self.convs.append(lateral)
        self.fpn_interp_model = fpn_interp_model
        if fuse_type not in ("sum", "avg"):
            raise ValueError(f"fuse_type must be 'sum' or 'avg', got {fuse_type!r}")
        self.fuse_type = fuse_type
        if fpn_top_down_levels is None:
            fpn_top_down_levels = range(len(self.convs))
        self.fpn_top_down_levels = list(fpn_top_down_levels)

    def _top_down(self, lateral: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        if self.fpn_interp_model == "nearest" and lateral.shape[-2:] == tuple(2 * s for s in prev.shape[-2:]):
            fused = ops.fpn_upsample_add(lateral, prev)
        else:
            fused = lateral + F.interpolate(
                prev.to(torch.float32),
                scale_factor=2.0,
                mode=self.fpn_interp_model,
                align_corners=None if self.fpn_interp_model == "nearest" else False,
                antialias=False,
            )
        return fused / 2 if self.fuse_type == "avg" else fused

    def _position_encoding(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.position_encoding, PositionEmbeddingSine):
            return self.position_encoding(x, dtype=x.dtype)
        return self.position_encoding(x).to(x.dtype)

    def forward(self, xs: List[torch.Tensor]):
        if len(xs) != len(self.convs):
            raise ValueError(f"expected {len(self.convs)} feature maps (one per lateral conv), got {len(xs)}")
        out: List[Optional[torch.Tensor]] = [None] * len(self.convs)
        pos: List[Optional[torch.Tensor]] = [None] * len(self.convs)
        prev = None
        n = len(self.convs) - 1
        for i in range(n, -1, -1):
            lateral = self.convs[n - i](xs[i])
            if i in self.fpn_top_down_levels and prev is not None:
                prev = self._top_down(lateral, prev)
            else:
                prev = lateral
            out[i] = prev
            pos[i] = self._position_encoding(prev)
        return out, pos


class ImageEncoder(nn.Module):
    """Trunk + neck; ``forward(image)`` returns ``vision_features``, ``vision_pos_enc`` and ``backbone_fpn``.

    ``scalp`` drops that many of the coarsest levels. ``vision_pos_enc`` entries are broadcast views over the
    batch (read-only).
    """

    def __init__(self, trunk: nn.Module, neck: nn.Module, scalp: int = 0):
        super().__init__()
        self.trunk = trunk
        self.neck = neck
        self.scalp = scalp
        if list(self.trunk.channel_list) != list(self.neck.backbone_channel_list):
            raise ValueError(
                f"Channel dims of trunk and neck do not match. Trunk: {self.trunk.channel_list}, "
                f"neck: {self.neck.backbone_channel_list}"
            )

    def forward(self, sample: torch.Tensor) -> Dict[str, object]:
        return self.neck_outputs(self.trunk(sample))

    def neck_outputs(self, stages: List[torch.Tensor]) -> Dict[str, object]:
        """The output dict for the trunk's stage outputs ``stages`` (finest first)."""
        features, pos = self.neck(stages)
        if self.scalp > 0:
            features, pos = features[: -self.scalp], pos[: -self.scalp]
        return {"vision_features": features[-1], "vision_pos_enc": pos, "backbone_fpn": features}


def map_outputs(outputs: Dict[str, object], fn: Callable[[torch.Tensor], torch.Tensor]) -> Dict[str, object]:
    """An encoder's output dict with ``fn`` applied to each of its tensors (an entry is a tensor or a list of them)."""
    return {name: [fn(t) for t in value] if isinstance(value, list) else fn(value) for name, value in outputs.items()}
