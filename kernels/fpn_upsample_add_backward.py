"""The backward of the FPN top-down fusion ``lateral + nearest_upsample_2x(prev.float())`` with respect to prev: the
sum of each 2x2 block of the output's gradient, in one pass over it (lateral's gradient is the output's, cast)."""

from __future__ import annotations

from typing import Iterator, Tuple

import torch
import triton
import triton.language as tl

from .fpn_upsample_add import _BLOCK_C, _BLOCK_X, _NUM_WARPS
from .launch import TRITON_DTYPES, checked_operand, launchable


@triton.jit
def _fpn_upsample_add_backward_kernel(
    grad_ptr, grad_prev_ptr,
    channels, prev_height, prev_width,
    stride_gb, stride_gc, stride_gh, stride_gw,
    BLOCK_C: tl.constexpr, BLOCK_X: tl.constexpr,
):
    """grad_prev[b, c, i, j] = sum over dy, dx in {0, 1} of grad[b, c, 2i + dy, 2j + dx], summed in fp32.

    Layout: grad (B, C, 2h, 2w) fp32 with any strides; grad_prev contiguous (B, C, h, w), prev's dtype.
    Grid: (B * h, cdiv(w, BLOCK_X), cdiv(C, BLOCK_C)); one program sums a BLOCK_C x BLOCK_X patch of one prev row.
    """
    prev_row_index = tl.program_id(0)
    batch = (prev_row_index // prev_height).to(tl.int64)
    prev_row = (prev_row_index % prev_height).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_X + tl.arange(0, BLOCK_X)
    chans = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (chans < channels)[:, None] & (cols < prev_width)[None, :]
    base = grad_ptr + batch * stride_gb + 2 * prev_row * stride_gh
    offsets = (chans * stride_gc)[:, None] + (2 * cols * stride_gw)[None, :]
    total = tl.zeros([BLOCK_C, BLOCK_X], dtype=tl.float32)
    for corner in tl.static_range(4):
        total += tl.load(base + (corner // 2) * stride_gh + (corner % 2) * stride_gw + offsets, mask=mask).to(tl.float32)
    out_offsets = ((batch * channels + chans[:, None]) * prev_height + prev_row) * prev_width + cols[None, :]
    tl.store(grad_prev_ptr + out_offsets, total.to(grad_prev_ptr.dtype.element_ty), mask=mask)


def fpn_upsample_add_backward(grad: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """prev's gradient in ``fpn_upsample_add(lateral, prev)`` given that of its (B, C, 2h, 2w) output: the 2x2 block
    sums of it, a contiguous map of prev's dtype (lateral's gradient is the output's, cast to lateral's dtype)."""
    op = "fpn_upsample_add_backward"
    # Only prev's shape, dtype and device are used: the kernel does not read it.
    prev = checked_operand(op, "prev", prev, ("B", "C", "h", "w"), TRITON_DTYPES, "strided")
    batch, channels, prev_height, prev_width = prev.shape
    grad = checked_operand(op, "grad", grad, (batch, channels, 2 * prev_height, 2 * prev_width), (torch.float32,),
                           "strided", prev.device)
    grad_prev = torch.empty(prev.shape, dtype=prev.dtype, device=prev.device)
    if grad_prev.numel() > 0:
        grid = (batch * prev_height, triton.cdiv(prev_width, _BLOCK_X), triton.cdiv(channels, _BLOCK_C))
        launchable(_fpn_upsample_add_backward_kernel, grad)[grid](
            grad, grad_prev, channels, prev_height, prev_width, *grad.stride(),
            BLOCK_C=_BLOCK_C, BLOCK_X=_BLOCK_X, num_warps=_NUM_WARPS,
        )
    return grad_prev


def aot_variants() -> Iterator[Tuple[str, object, dict, dict, dict]]:
    """(name, kernel, signature, constexprs, launch options): the output's gradient is fp32 (contiguous, W stride a
    constexpr 1, or channels-last, C stride 1); prev in fp32, bf16 or fp16."""
    for type_name in TRITON_DTYPES.values():
        for layout, unit in (("contiguous", "w"), ("channels_last", "c")):
            signature = {"grad_ptr": "*fp32", "grad_prev_ptr": f"*{type_name}", "channels": "i32",
                         "prev_height": "i32", "prev_width": "i32"}
            signature.update({f"stride_g{axis}": "i32" for axis in "bchw"})
            signature[f"stride_g{unit}"] = "constexpr"
            signature.update(BLOCK_C="constexpr", BLOCK_X="constexpr")
            constexprs = {f"stride_g{unit}": 1, "BLOCK_C": _BLOCK_C, "BLOCK_X": _BLOCK_X}
            yield (f"fpn_upsample_add_backward_{type_name}_grad_{layout}", _fpn_upsample_add_backward_kernel, signature,
                   constexprs, {"num_warps": _NUM_WARPS})
