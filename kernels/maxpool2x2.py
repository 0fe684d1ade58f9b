"""2x2 max-pool (stride 2, floor) of a channels-last (B, H, W, C) map, as Hiera pools its shortcut.

Pooling directly in channels-last saves the two permutes (and the copies they force) that
``F.max_pool2d(x.permute(0, 3, 1, 2))`` needs: every load is a run of contiguous channels.
"""

from __future__ import annotations

from typing import Iterator, Tuple

import torch
import triton
import triton.language as tl

from .launch import TRITON_DTYPES, checked_operand, launchable

# Elements of one program's output tile: 16 per thread at 4 warps, enough bytes in flight for a copy-like kernel.
_TILE_ELEMENTS = 2048
_NUM_WARPS = 4


@triton.jit
def _max_first_wins(current, candidate):
    """torch's max-pool update, ``candidate > current or isnan(candidate)``: NaN propagates, ties keep the first."""
    return tl.where((candidate > current) | (candidate != candidate), candidate, current)


@triton.jit
def _maxpool2x2_kernel(
    x_ptr,
    out_ptr,
    out_height,
    out_width,
    channels,
    stride_xb,
    stride_xh,
    stride_xw,
    stride_xc,
    BLOCK_W: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """out[b, i, j, c] = max(x[b, 2i, 2j, c], x[b, 2i, 2j+1, c], x[b, 2i+1, 2j, c], x[b, 2i+1, 2j+1, c]).

    Layout: x is (B, H, W, C) with any strides (the channel stride is 1 in practice, which the JIT specializes on
    and vectorizes along); out is a contiguous (B, H // 2, W // 2, C) tensor of x's dtype. An odd last row or
    column of x is never read (floor mode). The result is exact (a selection, compared in float32); NaN propagates
    and ties keep the first element in row-major window order, as in torch's max_pool2d.

    Grid: (B * out_height, cdiv(out_width, BLOCK_W), cdiv(channels, BLOCK_C)); one program pools BLOCK_W output
    pixels of one output row times BLOCK_C channels.
    """
    out_row_index = tl.program_id(0)
    batch = out_row_index // out_height
    out_row = out_row_index % out_height
    out_cols = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    chans = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (out_cols < out_width)[:, None] & (chans < channels)[None, :]

    # 64-bit scalar base (batch and row strides can exceed 2**31 elements together), 32-bit offsets inside the tile.
    window_base = x_ptr + batch.to(tl.int64) * stride_xb + (2 * out_row).to(tl.int64) * stride_xh
    top_left = window_base + (2 * out_cols * stride_xw)[:, None] + (chans * stride_xc)[None, :]
    # Compared in float32: widening and narrowing back are exact, and the interpreter keeps bfloat16 as raw
    # uint16 bits, which would compare as integers.
    pooled = tl.load(top_left, mask=mask).to(tl.float32)
    pooled = _max_first_wins(pooled, tl.load(top_left + stride_xw, mask=mask).to(tl.float32))
    pooled = _max_first_wins(pooled, tl.load(top_left + stride_xh, mask=mask).to(tl.float32))
    pooled = _max_first_wins(pooled, tl.load(top_left + stride_xh + stride_xw, mask=mask).to(tl.float32))

    out_base = out_ptr + out_row_index.to(tl.int64) * out_width * channels
    tl.store(out_base + out_cols[:, None] * channels + chans[None, :], pooled.to(out_ptr.dtype.element_ty), mask=mask)


def _block_sizes(channels: int) -> Tuple[int, int]:
    """(BLOCK_W, BLOCK_C) for a map with ``channels`` channels."""
    # The largest power of two up to 128 that divides C leaves no masked lanes for Hiera's widths (192 -> 64,
    # 224 -> 32, 1152 -> 128); odd channel counts without a divisor of at least 16 take the next power of two.
    block_c = min(128, channels & -channels)
    if block_c < 16:
        block_c = min(128, triton.next_power_of_2(channels))
    return _TILE_ELEMENTS // block_c, block_c


def check_map(x: torch.Tensor, op: str) -> torch.Tensor:
    """Check a channels-last (B, H, W, C) map the kernels pool (or route a pooled gradient back to); they read it
    with all four of its strides."""
    return checked_operand(op, "x", x, ("B", "H", "W", "C"), TRITON_DTYPES, "strided")


def maxpool2x2(x: torch.Tensor) -> torch.Tensor:
    """2x2 max-pool, stride 2, floor, of a channels-last (B, H, W, C) map -> contiguous (B, H // 2, W // 2, C)."""
    x = check_map(x, "maxpool2x2")
    batch, height, width, channels = x.shape
    out_height, out_width = height // 2, width // 2
    out = torch.empty((batch, out_height, out_width, channels), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    block_w, block_c = _block_sizes(channels)
    grid = (batch * out_height, triton.cdiv(out_width, block_w), triton.cdiv(channels, block_c))
    launchable(_maxpool2x2_kernel, x)[grid](
        x, out, out_height, out_width, channels, *x.stride(), BLOCK_W=block_w, BLOCK_C=block_c, num_warps=_NUM_WARPS
    )
    return out


def aot_variants() -> Iterator[Tuple[str, object, dict, dict, int]]:
    """(name, kernel, signature, constexprs, num_warps) for every kernel the encoder configs launch.

    Covers every stage width (C, 2C, 4C, 8C) of every config in fp32, bf16 and fp16, on a channels-last map with
    channel stride 1 (which the JIT turns into a constexpr, as here) and 32-bit sizes and strides.
    """
    from sam2_fast.io.configs import CONFIGS

    channel_counts = sorted({cfg.embed_dim * 2**stage for cfg in CONFIGS.values() for stage in range(len(cfg.stages))})
    block_sizes = sorted({_block_sizes(channels) for channels in channel_counts})
    for type_name in TRITON_DTYPES.values():
        for block_w, block_c in block_sizes:
            signature = {
                "x_ptr": f"*{type_name}",
                "out_ptr": f"*{type_name}",
                "out_height": "i32",
                "out_width": "i32",
                "channels": "i32",
                "stride_xb": "i32",
                "stride_xh": "i32",
                "stride_xw": "i32",
                "stride_xc": "constexpr",
                "BLOCK_W": "constexpr",
                "BLOCK_C": "constexpr",
            }
            constexprs = {"stride_xc": 1, "BLOCK_W": block_w, "BLOCK_C": block_c}
            yield f"maxpool2x2_{type_name}_w{block_w}_c{block_c}", _maxpool2x2_kernel, signature, constexprs, _NUM_WARPS
