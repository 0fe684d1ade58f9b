"""Bicubic resizing as two small matrix products, for the trunk's positional embedding where it takes gradients.

``F.interpolate(x, size, mode="bicubic")`` (align_corners=False, no antialiasing) is separable: each output row mixes
four input rows and each output column four input columns, with the cubic convolution weights of ATen (A = -0.75)
and the taps clamped at the borders. So ``resize(x) = Ah @ x @ Aw^T`` with Ah (out_h, in_h) and Aw (out_w, in_w)
holding those weights. Its gradient is ``Ah^T @ g @ Aw``: two small products, where ATen's CPU bicubic backward
scatters 16 taps per output pixel one by one. For the tiny trunk's 96 x 7 x 7 table resized to 128 x 128, forward
and backward took 2.0 ms here against 24.7 ms through ``F.interpolate`` (AMD EPYC Zen 4, 2 threads).

The weights are computed as ATen computes them (in fp32 for fp32 and lower-precision maps, in fp64 for fp64), and the
columns are interpolated before the rows, as ATen does: results agree with ``F.interpolate`` to within the rounding
of a four-term sum.
"""

from __future__ import annotations

import functools
from typing import Tuple

import torch

_A = -0.75  # ATen's cubic convolution parameter


def _cubic_weights(t: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """The four tap weights at fractional offsets t, in ATen's formulas."""
    a = _A

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return far(t + 1), near(t), near(1 - t), far(2 - t)


@functools.lru_cache(maxsize=32)
def _matrix(in_size: int, out_size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The (out_size, in_size) matrix of ATen's bicubic resize along one axis (align_corners=False), its weights
    computed in ``dtype`` (fp32 or fp64) as ATen computes them for maps of that dtype."""
    scale = torch.tensor(float(in_size), dtype=dtype) / out_size  # ATen's scale: a division in that dtype
    source = (torch.arange(out_size, dtype=dtype) + 0.5) * scale - 0.5  # not clamped for cubic
    first = torch.floor(source)
    weights = _cubic_weights(source - first)
    matrix = torch.zeros(out_size, in_size, dtype=dtype)
    rows = torch.arange(out_size)
    for tap, weight in enumerate(weights):  # taps at first - 1 .. first + 2, clamped to the map
        columns = (first.long() + tap - 1).clamp(0, in_size - 1)
        matrix.index_put_((rows, columns), weight, accumulate=True)
    return matrix.to(device)


def resize(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """``F.interpolate(x, size=size, mode="bicubic")`` of a (B, C, H, W) map, as two matrix products (see the
    module's doc): fp32 products for fp32 and lower-precision maps, rounded once to x's dtype, fp64 for fp64; no
    autocast inside."""
    if x.dim() != 4:
        raise ValueError(f"bicubic resize: expected a (B, C, H, W) map, got shape {tuple(x.shape)}")
    out_h, out_w = (int(s) for s in size)
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    rows = _matrix(x.shape[-2], out_h, compute, x.device)
    columns = _matrix(x.shape[-1], out_w, compute, x.device)
    with torch.autocast(x.device.type, enabled=False):
        out = torch.matmul(rows, torch.matmul(x.to(compute), columns.t()))
    return out.to(x.dtype)
