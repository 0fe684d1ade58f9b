"""nn.Linear and nn.Conv2d that compute through :mod:`sam2_fast.gemm.dense` (same parameters, same state_dict keys)."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..gemm import dense


class Linear(nn.Linear):
    """An ``nn.Linear`` whose product goes through :func:`sam2_fast.gemm.dense.linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dense.linear(x, self.weight, self.bias)


class Conv2d(nn.Conv2d):
    """An ``nn.Conv2d`` (zero padding, no groups or dilation) going through :func:`sam2_fast.gemm.dense.conv2d`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.groups != 1 or self.dilation != (1, 1) or self.padding_mode != "zeros" or isinstance(self.padding, str):
            raise NotImplementedError(
                "sam2_fast.model.layers.Conv2d supports numeric zero padding without groups or dilation, got "
                f"groups={self.groups}, dilation={self.dilation}, padding={self.padding!r}, padding_mode={self.padding_mode!r}"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dense.conv2d(x, self.weight, self.bias, self.stride, self.padding)
