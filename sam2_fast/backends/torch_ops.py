"""Plain-PyTorch implementations of sam2_fast's ops.

These are the reference semantics every fast backend is tested against, and the ``torch`` backend itself. Each
function reproduces what the `sam2` package computes, step for step where the step changes numbers (zero-padding
after norm1 shows up here as padded tokens whose q, k and v equal the qkv bias), and is written to be short and
obviously right rather than fast.

Where the torch backend runs something other than the plain function, it is here too, named for what it adds: the
attentions ``*_emulating_low_precision`` run in fp32 on CPUs without units for bf16/fp16 (at the end of the file).

Layouts (channels-last, as Hiera keeps its activations):
- ``qkv``: (B, H, W, 3 * dim), the qkv projection's output; its last dim splits as (3, num_heads, head_dim).
- attention outputs: (B, H_out, W_out, dim) with dim = num_heads * head_dim, before the output projection.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .precision import CPU_NATIVE_LOW_PRECISION, rounded_fp32


def _split_heads_pool_q(qkv: torch.Tensor, num_heads: int, q_pool: bool):
    """(N, h, w, 3 * dim) -> q, k, v as (N, heads, tokens, head_dim); q max-pooled 2x2 (floor) if asked."""
    num_maps, h, w, channels3 = qkv.shape
    dim = channels3 // 3
    head_dim = dim // num_heads
    q, k, v = qkv[..., :dim], qkv[..., dim : 2 * dim], qkv[..., 2 * dim :]
    if q_pool:
        q = maxpool2x2(q)
    return tuple(t.reshape(num_maps, -1, num_heads, head_dim).transpose(1, 2) for t in (q, k, v))


def add_qkv_bias(qkv: torch.Tensor, qkv_bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``qkv + qkv_bias`` in qkv's dtype: the map that ``window_attention(..., add_bias=True)`` attends over."""
    if qkv_bias is None:
        raise ValueError("window_attention: add_bias=True needs a qkv_bias, got None")
    return qkv + qkv_bias.to(qkv.dtype)


def window_attention(
    qkv: torch.Tensor, qkv_bias: Optional[torch.Tensor], num_heads: int, window_size: int, q_pool: bool,
    add_bias: bool = False,
) -> torch.Tensor:
    """Windowed multi-head attention of Hiera, with partition, padding, q-pooling and unpartition.

    The map is padded up to a multiple of ``window_size``; padded tokens carry q = k = v = ``qkv_bias`` (the
    reference pads the normed input with zeros before the qkv projection) and attend unmasked. With ``q_pool``,
    q is max-pooled 2x2 inside each window and the output lands at (H // 2, W // 2), the shape of the pooled
    shortcut the reference crops to.

    With ``add_bias``, ``qkv`` is the projection without its bias and ``qkv_bias`` (cast to qkv's dtype) is added
    to it first: a backend that adds it while reading the tokens saves the GEMM a pass over the qkv map.
    """
    if add_bias:
        qkv = add_qkv_bias(qkv, qkv_bias)
    if q_pool and window_size % 2:
        raise ValueError(
            f"q_pool pools 2x2 inside each window and needs an even window_size, got {window_size} "
            "(the reference cannot unpartition such a block either)"
        )
    batch, height, width, channels3 = qkv.shape
    dim = channels3 // 3
    pad_h = (window_size - height % window_size) % window_size
    pad_w = (window_size - width % window_size) % window_size
    if pad_h or pad_w:
        fill = qkv.new_zeros(channels3) if qkv_bias is None else qkv_bias.to(qkv.dtype)
        padded = fill.expand(batch, height + pad_h, width + pad_w, channels3).clone()
        padded[:, :height, :width] = qkv
        qkv = padded
    padded_h, padded_w = height + pad_h, width + pad_w
    rows, cols = padded_h // window_size, padded_w // window_size
    windows = (
        qkv.reshape(batch, rows, window_size, cols, window_size, channels3)
        .permute(0, 1, 3, 2, 4, 5)
        .reshape(batch * rows * cols, window_size, window_size, channels3)
    )
    q, k, v = _split_heads_pool_q(windows, num_heads, q_pool)
    out = F.scaled_dot_product_attention(q, k, v)
    out_window = window_size // 2 if q_pool else window_size
    out = (
        out.transpose(1, 2)
        .reshape(batch, rows, cols, out_window, out_window, dim)
        .permute(0, 1, 3, 2, 4, 5)
        .reshape(batch, rows * out_window, cols * out_window, dim)
    )
    out_h, out_w = (height // 2, width // 2) if q_pool else (height, width)
    return out[:, :out_h, :out_w]


def global_attention(qkv: torch.Tensor, num_heads: int, q_pool: bool) -> torch.Tensor:
    """Multi-head attention over all H * W tokens of each image (Hiera's global blocks); q max-pooled if asked."""
    batch, height, width, channels3 = qkv.shape
    q, k, v = _split_heads_pool_q(qkv, num_heads, q_pool)
    out = F.scaled_dot_product_attention(q, k, v)
    out_h, out_w = (height // 2, width // 2) if q_pool else (height, width)
    return out.transpose(1, 2).reshape(batch, out_h, out_w, channels3 // 3)


def maxpool2x2(x: torch.Tensor) -> torch.Tensor:
    """2x2 max-pool, stride 2, floor, of a channels-last (B, H, W, C) map -> (B, H // 2, W // 2, C)."""
    return F.max_pool2d(x.permute(0, 3, 1, 2), kernel_size=2, stride=2).permute(0, 2, 3, 1)


def fpn_upsample_add(lateral: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """FPN top-down fusion: ``lateral + nearest_upsample_2x(prev.float())``.

    ``lateral`` is (B, C, 2h, 2w), ``prev`` (B, C, h, w). The top-down term is float32 as in the reference, so
    the result's dtype is ``torch.promote_types(lateral.dtype, torch.float32)``.
    """
    upsampled = F.interpolate(prev.to(torch.float32), scale_factor=2.0, mode="nearest")
    return lateral + upsampled


def bias_gelu_(x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``x = gelu(x + bias)`` in place (the exact, erf GELU), returning ``x``; ``bias`` is (C,) for x's last dim C,
    or None. The MLP's first GEMM run without its bias, then this: one pass instead of the bias broadcast plus the
    GELU pass, where a backend fuses it."""
    if bias is not None:
        x.add_(bias)
    return torch.ops.aten.gelu_(x)


def sine_position_encoding(
    height: int,
    width: int,
    num_pos_feats: int,
    temperature: float,
    normalize: bool,
    scale: float,
    device: torch.device,
) -> torch.Tensor:
    """The sine position encoding of an (height, width) map as a (1, 2 * num_pos_feats, height, width) fp32 tensor.

    ``num_pos_feats`` is per axis (half the output channels); the first half of the channels encodes y, the
    second x, each as interleaved sin/cos pairs, as `PositionEmbeddingSine` does.
    """
    y_embed = torch.arange(1, height + 1, dtype=torch.float32, device=device)
    x_embed = torch.arange(1, width + 1, dtype=torch.float32, device=device)
    if normalize:
        eps = 1e-6
        y_embed = y_embed / (y_embed[-1:] + eps) * scale
        x_embed = x_embed / (x_embed[-1:] + eps) * scale
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=device)
    dim_t = temperature ** (2 * (dim_t // 2) / num_pos_feats)
    pos_x = x_embed[:, None] / dim_t
    pos_y = y_embed[:, None] / dim_t
    pos_x = torch.stack((pos_x[:, 0::2].sin(), pos_x[:, 1::2].cos()), dim=2).flatten(1)
    pos_y = torch.stack((pos_y[:, 0::2].sin(), pos_y[:, 1::2].cos()), dim=2).flatten(1)
    channels = 2 * num_pos_feats
    pos = torch.cat(
        (pos_y[:, None, :].expand(height, width, num_pos_feats), pos_x[None, :, :].expand(height, width, num_pos_feats)),
        dim=2,
    )
    return pos.permute(2, 0, 1).reshape(1, channels, height, width).contiguous()


# ----------------------------------------------------------------------------------------------------------------
# What the torch backend runs for the attentions. On CPUs without bf16/fp16 units ATen's SDPA in those dtypes runs
# several times slower than in fp32; its products accumulate in fp32 and round once, so running it in fp32 on the
# rounded operands and rounding the result gives the same numbers up to summation order, much sooner.

def emulated_attention_dtype(qkv: torch.Tensor) -> Optional[torch.dtype]:
    """qkv's dtype where the torch backend runs its attention in fp32 instead (a bf16/fp16 qkv on a CPU without
    units for it), else None."""
    if qkv.device.type != "cpu" or CPU_NATIVE_LOW_PRECISION.get(qkv.dtype, True):
        return None
    return qkv.dtype


def _in_fp32_where_emulated(attention: Callable, qkv: torch.Tensor, *args) -> torch.Tensor:
    """``attention(qkv, *args)``, in fp32 on operands rounded to qkv's dtype where :func:`emulated_attention_dtype`
    says so, the result rounded back to it."""
    dtype = emulated_attention_dtype(qkv)
    if dtype is None:
        return attention(qkv, *args)
    with torch.autocast("cpu", enabled=False):
        out = attention(qkv.float(), *(rounded_fp32(a, dtype) if isinstance(a, torch.Tensor) else a for a in args))
    return out.to(dtype)


def window_attention_emulating_low_precision(
    qkv: torch.Tensor, qkv_bias: Optional[torch.Tensor], num_heads: int, window_size: int, q_pool: bool,
    add_bias: bool = False,
) -> torch.Tensor:
    """The torch backend's window_attention: :func:`window_attention`, with the bias added in qkv's dtype first
    (``add_bias``), in fp32 where :func:`emulated_attention_dtype` says so."""
    if add_bias:
        qkv = add_qkv_bias(qkv, qkv_bias)
    return _in_fp32_where_emulated(window_attention, qkv, qkv_bias, num_heads, window_size, q_pool)


def global_attention_emulating_low_precision(qkv: torch.Tensor, num_heads: int, q_pool: bool) -> torch.Tensor:
    """The torch backend's global_attention: :func:`global_attention`, in fp32 where
    :func:`emulated_attention_dtype` says so."""
    return _in_fp32_where_emulated(global_attention, qkv, num_heads, q_pool)
