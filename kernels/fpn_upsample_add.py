"""FPN top-down fusion: ``lateral + nearest_upsample_2x(prev.float())`` in one pass.

The reference materializes the float32 upsampled map (4x the size of ``prev``) and then adds it; here each
program reads one row of ``prev`` once, adds it to the two lateral rows it covers and writes the float32 sum, so
memory traffic is the lateral read, the output write and a quarter-size read of ``prev``.
"""

from __future__ import annotations

from typing import Iterator, Tuple

import torch
import triton
import triton.language as tl

from .launch import TRITON_DTYPES, checked_operand, launchable

# One program writes 2 x BLOCK_C x BLOCK_X float32 outputs (32 per thread at 4 warps).
_BLOCK_C = 32
_BLOCK_X = 64
_NUM_WARPS = 4


@triton.jit
def _fpn_upsample_add_kernel(
    lateral_ptr,
    prev_ptr,
    out_ptr,
    channels,
    prev_height,
    prev_width,
    stride_lb,
    stride_lc,
    stride_lh,
    stride_lw,
    stride_pb,
    stride_pc,
    stride_ph,
    stride_pw,
    BLOCK_C: tl.constexpr,
    BLOCK_X: tl.constexpr,
):
    """out[b, c, y, x] = float32(lateral[b, c, y, x]) + float32(prev[b, c, y // 2, x // 2]).

    Layout: lateral is (B, C, 2h, 2w) and prev (B, C, h, w), each with any strides (contiguous NCHW or
    channels_last; a stride of 1 is specialized by the JIT and vectorized along); both float32, bfloat16 or
    float16. out is a contiguous (B, C, 2h, 2w) tensor, float32 for these dtypes. Both casts to float32 are exact
    and the sum is one float32 add, so the result equals the reference's bit for bit.

    Grid: (B * h, cdiv(2w, BLOCK_X), cdiv(C, BLOCK_C)); one program reads a BLOCK_C x BLOCK_X / 2 patch of one
    prev row once and writes the two output rows it upsamples to.
    """
    prev_row_index = tl.program_id(0)
    batch = (prev_row_index // prev_height).to(tl.int64)
    prev_row = (prev_row_index % prev_height).to(tl.int64)
    x0 = tl.program_id(1) * BLOCK_X
    c0 = tl.program_id(2) * BLOCK_C
    tile_chans = tl.arange(0, BLOCK_C)
    tile_cols = tl.arange(0, BLOCK_X)
    out_height = 2 * prev_height
    out_width = 2 * prev_width
    mask = ((c0 + tile_chans) < channels)[:, None] & ((x0 + tile_cols) < out_width)[None, :]

    # 64-bit scalar bases, 32-bit offsets inside the tile.
    prev_base = prev_ptr + batch * stride_pb + prev_row * stride_ph + c0 * stride_pc + (x0 // 2) * stride_pw
    prev_offsets = (tile_chans * stride_pc)[:, None] + ((tile_cols // 2) * stride_pw)[None, :]
    top_down = tl.load(prev_base + prev_offsets, mask=mask).to(tl.float32)

    lateral_offsets = (tile_chans * stride_lc)[:, None] + (tile_cols * stride_lw)[None, :]
    out_offsets = (tile_chans * out_height * out_width)[:, None] + tile_cols[None, :]
    for row_in_pair in tl.static_range(2):
        out_row = 2 * prev_row + row_in_pair
        lateral_base = lateral_ptr + batch * stride_lb + out_row * stride_lh + c0 * stride_lc + x0 * stride_lw
        lateral = tl.load(lateral_base + lateral_offsets, mask=mask).to(tl.float32)
        out_base = out_ptr + ((batch * channels + c0) * out_height + out_row) * out_width + x0
        tl.store(out_base + out_offsets, (lateral + top_down).to(out_ptr.dtype.element_ty), mask=mask)


def fpn_upsample_add(lateral: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """``lateral + nearest_upsample_2x(prev.float())`` of (B, C, 2h, 2w) and (B, C, h, w) maps -> contiguous
    (B, C, 2h, 2w) of dtype ``torch.promote_types(lateral.dtype, torch.float32)``."""
    op = "fpn_upsample_add"
    prev = checked_operand(op, "prev", prev, ("B", "C", "h", "w"), TRITON_DTYPES, "strided")
    batch, channels, prev_height, prev_width = prev.shape
    out_shape = (batch, channels, 2 * prev_height, 2 * prev_width)
    lateral = checked_operand(op, "lateral", lateral, out_shape, TRITON_DTYPES, "strided", prev.device)
    out = torch.empty(out_shape, dtype=torch.promote_types(lateral.dtype, torch.float32), device=lateral.device)
    if out.numel() == 0:
        return out
    grid = (batch * prev_height, triton.cdiv(2 * prev_width, _BLOCK_X), triton.cdiv(channels, _BLOCK_C))
    launchable(_fpn_upsample_add_kernel, lateral)[grid](
        lateral, prev, out, channels, prev_height, prev_width, *lateral.stride(), *prev.stride(),
        BLOCK_C=_BLOCK_C, BLOCK_X=_BLOCK_X, num_warps=_NUM_WARPS,
    )
    return out


# Which stride is 1 (and so a JIT constexpr) in each memory format of an NCHW tensor.
_UNIT_STRIDE = {"contiguous": "w", "channels_last": "c"}


def aot_variants() -> Iterator[Tuple[str, object, dict, dict, int]]:
    """(name, kernel, signature, constexprs, num_warps) for every kernel the encoder configs launch.

    The neck fuses one level per forward, lateral and prev both coming out of its 1x1 convs in the encoder's
    dtype (fp32, bf16 or fp16); the block sizes do not depend on the config (d_model is 256 in all of them).
    Each of lateral and prev may be contiguous NCHW or channels_last, whose unit stride the JIT makes a constexpr.
    """
    for dtype, type_name in TRITON_DTYPES.items():
        out_name = TRITON_DTYPES[torch.promote_types(dtype, torch.float32)]
        for lateral_format, lateral_unit in _UNIT_STRIDE.items():
            for prev_format, prev_unit in _UNIT_STRIDE.items():
                signature = {
                    "lateral_ptr": f"*{type_name}",
                    "prev_ptr": f"*{type_name}",
                    "out_ptr": f"*{out_name}",
                    "channels": "i32",
                    "prev_height": "i32",
                    "prev_width": "i32",
                }
                signature.update({f"stride_l{axis}": "i32" for axis in "bchw"})
                signature.update({f"stride_p{axis}": "i32" for axis in "bchw"})
                signature[f"stride_l{lateral_unit}"] = "constexpr"
                signature[f"stride_p{prev_unit}"] = "constexpr"
                signature.update(BLOCK_C="constexpr", BLOCK_X="constexpr")
                constexprs = {
                    f"stride_l{lateral_unit}": 1, f"stride_p{prev_unit}": 1, "BLOCK_C": _BLOCK_C, "BLOCK_X": _BLOCK_X
                }
                name = f"fpn_upsample_add_{type_name}_lateral_{lateral_format}_prev_{prev_format}"
                yield name, _fpn_upsample_add_kernel, signature, constexprs, _NUM_WARPS
