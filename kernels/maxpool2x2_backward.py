"""The backward of the 2x2 max-pool (stride 2, floor) of a channels-last map: each pooled gradient goes to the token
``max_pool2d`` took in its window, found again from the input (the forward saves no indices)."""

from __future__ import annotations

from typing import Iterator, Tuple

import torch
import triton
import triton.language as tl

from .launch import TRITON_DTYPES, checked_operand, launchable
from .maxpool2x2 import _NUM_WARPS, _block_sizes, check_map


@triton.jit
def _maxpool2x2_backward_kernel(
    x_ptr, grad_out_ptr, grad_x_ptr,
    height, width, out_height, out_width, channels,
    stride_xb, stride_xh, stride_xw, stride_xc,
    BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """grad_x[b, 2i + dy, 2j + dx, c] = grad_out[b, i, j, c] for the (dy, dx) max_pool2d takes, else 0.

    Layout: x (B, height, width, C) with any strides; grad_out contiguous (B, out_height, out_width, C) and grad_x
    contiguous (B, height, width, C), both of x's dtype; grad_x's odd last row and column are not written (the
    launcher zeroes them). The winner is the first of top-left, top-right, bottom-left, bottom-right holding the
    max, or the last NaN (compared in float32, exact). Grid: (B * out_height, cdiv(out_width, BLOCK_W),
    cdiv(channels, BLOCK_C)).
    """
    out_row_index = tl.program_id(0)
    batch = (out_row_index // out_height).to(tl.int64)
    out_row = out_row_index % out_height
    out_cols = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    chans = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (out_cols < out_width)[:, None] & (chans < channels)[None, :]

    top_left = (x_ptr + batch * stride_xb + (2 * out_row).to(tl.int64) * stride_xh
                + (2 * out_cols * stride_xw)[:, None] + (chans * stride_xc)[None, :])
    best = tl.load(top_left, mask=mask).to(tl.float32)
    winner = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.int32)
    for corner in tl.static_range(1, 4):
        value = tl.load(top_left + (corner // 2) * stride_xh + (corner % 2) * stride_xw, mask=mask).to(tl.float32)
        take = (value > best) | (value != value)
        best = tl.where(take, value, best)
        winner = tl.where(take, corner, winner)

    grad = tl.load(grad_out_ptr + out_row_index.to(tl.int64) * out_width * channels + out_cols[:, None] * channels
                   + chans[None, :], mask=mask)
    grad_row = grad_x_ptr + (batch * height + 2 * out_row) * width * channels
    for corner in tl.static_range(4):
        grad_ptrs = (grad_row + (corner // 2) * width * channels + ((2 * out_cols + corner % 2) * channels)[:, None]
                     + chans[None, :])
        tl.store(grad_ptrs, tl.where(winner == corner, grad, 0.0).to(grad_x_ptr.dtype.element_ty), mask=mask)


def maxpool2x2_backward(grad_out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The gradient of ``maxpool2x2(x)`` given that of its output: a contiguous (B, H, W, C) map of x's dtype."""
    op = "maxpool2x2_backward"
    x = check_map(x, op)
    batch, height, width, channels = x.shape
    out_height, out_width = height // 2, width // 2
    grad_out = checked_operand(op, "grad_out", grad_out, (batch, out_height, out_width, channels), (x.dtype,),
                               "contiguous", x.device)
    grad_x = torch.zeros(x.shape, dtype=x.dtype, device=x.device)
    if grad_out.numel() == 0:
        return grad_x
    block_w, block_c = _block_sizes(channels)
    grid = (batch * out_height, triton.cdiv(out_width, block_w), triton.cdiv(channels, block_c))
    launchable(_maxpool2x2_backward_kernel, x)[grid](
        x, grad_out, grad_x, height, width, out_height, out_width, channels, *x.stride(),
        BLOCK_W=block_w, BLOCK_C=block_c, num_warps=_NUM_WARPS,
    )
    return grad_x


def aot_variants() -> Iterator[Tuple[str, object, dict, dict, dict]]:
    """(name, kernel, signature, constexprs, launch options) for every stage width of the configs in fp32, bf16 and
    fp16, on a channels-last map with channel stride 1 (a JIT constexpr, as here)."""
    from sam2_fast.io.configs import CONFIGS

    channel_counts = sorted({cfg.embed_dim * 2**stage for cfg in CONFIGS.values() for stage in range(len(cfg.stages))})
    for type_name in TRITON_DTYPES.values():
        for block_w, block_c in sorted({_block_sizes(channels) for channels in channel_counts}):
            signature = {"x_ptr": f"*{type_name}", "grad_out_ptr": f"*{type_name}", "grad_x_ptr": f"*{type_name}"}
            signature.update({name: "i32" for name in (
                "height", "width", "out_height", "out_width", "channels", "stride_xb", "stride_xh", "stride_xw")})
            signature.update(stride_xc="constexpr", BLOCK_W="constexpr", BLOCK_C="constexpr")
            constexprs = {"stride_xc": 1, "BLOCK_W": block_w, "BLOCK_C": block_c}
            yield (f"maxpool2x2_backward_{type_name}_w{block_w}_c{block_c}", _maxpool2x2_backward_kernel, signature,
                   constexprs, {"num_warps": _NUM_WARPS})
