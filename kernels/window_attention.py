"""Windowed multi-head attention of Hiera (partition, padding, q-pooling, attention and unpartition in one kernel).

The tile loaders and the attention loop (``_attend``) defined here are shared with ``global_attention``, whose
kernel is the same loop over one window the size of the whole map.
"""

from __future__ import annotations

import math
import os
from typing import Iterable, Iterator, NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from ..backends.shapes import queries_per_window
from ..backends.torch_ops import add_qkv_bias
from .launch import TRITON_DTYPES, checked_operand, launchable

_LOG2_E = 1.4426950408889634


def dot_in_fp32(dtype: torch.dtype) -> bool:
    """Whether the kernels' matmuls take fp32 operands (as 3xTF32: fp32-level accuracy on tensor cores) rather
    than ``dtype`` ones.

    fp32 inputs always do (plain tf32 would lose the precision the caller asked for). Under the Triton interpreter
    every dtype does, because the interpreter's ``tl.dot`` on bf16 operands returns wrong values.
    """
    return dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _head_pointers(qkv_ptr, stride_qkv_b, dim, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's head (grid axis 1) and image (axis 2), the head's channel offsets padded to BLOCK_D and their
    mask, and where its q, k and v channels start in the image's qkv map (last dim split as (3, heads, HEAD_DIM))."""
    head = tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    q_ptr = qkv_ptr + batch * stride_qkv_b + head * HEAD_DIM
    k_ptr = q_ptr + dim
    v_ptr = k_ptr + dim
    return head, batch, offs_d, d_mask, q_ptr, k_ptr, v_ptr


@triton.jit
def _head_fills(bias_ptr, head, dim, offs_d, d_mask, dtype, HEAD_DIM: tl.constexpr, HAS_BIAS: tl.constexpr,
                BLOCK_D: tl.constexpr):
    """The q, k and v of this head's padding tokens (its channels of the qkv bias, or zeros)."""
    if HAS_BIAS:
        q_fill = tl.load(bias_ptr + head * HEAD_DIM + offs_d, mask=d_mask, other=0.0)
        k_fill = tl.load(bias_ptr + dim + head * HEAD_DIM + offs_d, mask=d_mask, other=0.0)
        v_fill = tl.load(bias_ptr + 2 * dim + head * HEAD_DIM + offs_d, mask=d_mask, other=0.0)
    else:
        q_fill = tl.zeros([BLOCK_D], dtype=dtype)
        k_fill = q_fill
        v_fill = q_fill
    return q_fill, k_fill, v_fill


@triton.jit
def _load_token_rows(
    base_ptr, y, x, valid, height, width, stride_h, stride_w, offs_d, fill,
    HEAD_DIM: tl.constexpr, HAS_FILL: tl.constexpr,
):
    """Rows of one head's q, k or v for tokens at map positions (y, x): a (len(y), BLOCK_D) tile.

    Tokens outside the map (padding) read as ``fill`` (the qkv bias of this head, cast to the qkv dtype), or as
    zeros without ``HAS_FILL``; so do columns past ``HEAD_DIM`` (zeros) and rows with ``valid`` false.
    """
    in_map = valid & (y < height) & (x < width)
    ptrs = base_ptr + y[:, None] * stride_h + x[:, None] * stride_w + offs_d[None, :]
    d_mask = offs_d < HEAD_DIM
    rows = tl.load(ptrs, mask=in_map[:, None] & d_mask[None, :], other=0.0)
    if HAS_FILL:
        rows = tl.where(in_map[:, None], rows, fill[None, :])
    return rows


@triton.jit
def _load_query_rows(
    base_ptr, y, x, valid, height, width, stride_h, stride_w, offs_d, fill,
    HEAD_DIM: tl.constexpr, HAS_FILL: tl.constexpr, Q_POOL: tl.constexpr,
):
    """Query rows at map positions (y, x); with ``Q_POOL``, the max over the 2x2 group whose top-left is (y, x).

    The max is taken in fp32 (exact, and the interpreter's bf16 max compares raw bits), then cast back.
    """
    q = _load_token_rows(base_ptr, y, x, valid, height, width, stride_h, stride_w, offs_d, fill, HEAD_DIM, HAS_FILL)
    if Q_POOL:
        pooled = q.to(tl.float32)
        for corner in tl.static_range(1, 4):
            rows = _load_token_rows(
                base_ptr, y + corner // 2, x + corner % 2, valid, height, width, stride_h, stride_w, offs_d, fill,
                HEAD_DIM, HAS_FILL,
            )
            pooled = tl.maximum(pooled, rows.to(tl.float32), propagate_nan=tl.PropagateNan.ALL)
        q = pooled.to(q.dtype)
    return q


@triton.jit
def _online_softmax_step(q, k, v, key_valid, row_max, row_sum, acc, qk_scale, DOT_IN_FP32: tl.constexpr):
    """Fold one block of keys into the running softmax of ``q``: (row_max, row_sum, acc) in base 2, fp32.

    q: (BLOCK_M, BLOCK_D), k and v: (BLOCK_N, BLOCK_D) in the qkv dtype; ``qk_scale`` = softmax scale * log2(e).
    Every block holds at least one valid key, so ``row_max`` is finite after the first step.
    """
    if DOT_IN_FP32:
        scores = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="tf32x3")
    else:
        scores = tl.dot(q, tl.trans(k))
    scores = tl.where(key_valid[None, :], scores * qk_scale, float("-inf"))
    new_max = tl.maximum(row_max, tl.max(scores, axis=1))
    rescale = tl.exp2(row_max - new_max)
    probs = tl.exp2(scores - new_max[:, None])
    row_sum = row_sum * rescale + tl.sum(probs, axis=1)
    if DOT_IN_FP32:
        acc = acc * rescale[:, None] + tl.dot(probs, v.to(tl.float32), input_precision="tf32x3")
    else:
        acc = acc * rescale[:, None] + tl.dot(probs.to(v.dtype), v)
    return new_max, row_sum, acc


@triton.jit
def _attend(
    q, k_ptr, v_ptr, origin_y, origin_x, num_keys, keys_per_row, height, width, stride_h, stride_w, offs_d,
    k_fill, v_fill, qk_scale,
    HEAD_DIM: tl.constexpr, HAS_FILL: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """softmax(q k^T * scale) v of a (BLOCK_M, BLOCK_D) query tile over ``num_keys`` tokens, fp32.

    Key i is the token at (origin_y + i // keys_per_row, origin_x + i % keys_per_row): a window's rows, or with
    ``keys_per_row`` = width the whole map. Keys outside the map read as the fills (see ``_load_token_rows``).
    """
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for key_start in range(0, num_keys, BLOCK_N):
        key = key_start + tl.arange(0, BLOCK_N)
        key_valid = key < num_keys
        key_y = origin_y + key // keys_per_row
        key_x = origin_x + key % keys_per_row
        k = _load_token_rows(
            k_ptr, key_y, key_x, key_valid, height, width, stride_h, stride_w, offs_d, k_fill, HEAD_DIM, HAS_FILL,
        )
        v = _load_token_rows(
            v_ptr, key_y, key_x, key_valid, height, width, stride_h, stride_w, offs_d, v_fill, HEAD_DIM, HAS_FILL,
        )
        row_max, row_sum, acc = _online_softmax_step(q, k, v, key_valid, row_max, row_sum, acc, qk_scale, DOT_IN_FP32)
    return acc / row_sum[:, None]


@triton.jit
def _window_attention_kernel(
    qkv_ptr, bias_ptr, out_ptr,
    height, width, out_height, out_width, window_cols, dim,
    stride_qkv_b, stride_qkv_h, stride_qkv_w,
    stride_out_b, stride_out_h, stride_out_w,
    qk_scale,
    WINDOW: tl.constexpr, Q_POOL: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_BIAS: tl.constexpr,
    DOT_IN_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[b, window, head] = softmax(q k^T * HEAD_DIM^-0.5) v over the WINDOW x WINDOW tokens of one window.

    Layout: qkv (B, height, width, 3 * dim) with strides (stride_qkv_b, stride_qkv_h, stride_qkv_w, 1), its last
    dim split as (3, heads, HEAD_DIM); bias (3 * dim,) in the qkv dtype; out (B, out_height, out_width, dim) with
    strides (stride_out_b, stride_out_h, stride_out_w, 1). Windows tile the map from the origin; positions past
    the map's edge are tokens whose q, k and v equal the bias (zero without HAS_BIAS) and attend unmasked, as
    the reference's zero padding before the qkv projection makes them. With Q_POOL, q is max-pooled 2x2 (stride
    2) inside the window while it is loaded, the window yields (WINDOW // 2)^2 outputs and outputs past
    (out_height, out_width) = (height // 2, width // 2) are dropped. Softmax in fp32 (base 2, online over
    BLOCK_N keys), head dim padded to BLOCK_D in registers.

    Grid: (num_windows * cdiv(num_queries, BLOCK_M), heads, B); a program computes BLOCK_M queries of one window
    and head.
    """
    OUT_WINDOW: tl.constexpr = WINDOW // 2 if Q_POOL else WINDOW
    NUM_QUERIES: tl.constexpr = OUT_WINDOW * OUT_WINDOW
    NUM_KEYS: tl.constexpr = WINDOW * WINDOW
    Q_BLOCKS: tl.constexpr = (NUM_QUERIES + BLOCK_M - 1) // BLOCK_M
    POOL: tl.constexpr = 2 if Q_POOL else 1

    window = tl.program_id(0) // Q_BLOCKS
    q_block = tl.program_id(0) % Q_BLOCKS
    head, batch, offs_d, d_mask, q_ptr, k_ptr, v_ptr = _head_pointers(qkv_ptr, stride_qkv_b, dim, HEAD_DIM, BLOCK_D)
    window_y = (window // window_cols) * WINDOW
    window_x = (window % window_cols) * WINDOW
    q_fill, k_fill, v_fill = _head_fills(bias_ptr, head, dim, offs_d, d_mask, qkv_ptr.dtype.element_ty, HEAD_DIM,
                                         HAS_BIAS, BLOCK_D)

    query = q_block * BLOCK_M + tl.arange(0, BLOCK_M)
    query_valid = query < NUM_QUERIES
    query_y = query // OUT_WINDOW
    query_x = query % OUT_WINDOW
    q = _load_query_rows(
        q_ptr, window_y + POOL * query_y, window_x + POOL * query_x, query_valid, height, width,
        stride_qkv_h, stride_qkv_w, offs_d, q_fill, HEAD_DIM, HAS_BIAS, Q_POOL,
    )

    out = _attend(
        q, k_ptr, v_ptr, window_y, window_x, NUM_KEYS, WINDOW, height, width, stride_qkv_h, stride_qkv_w, offs_d,
        k_fill, v_fill, qk_scale, HEAD_DIM, HAS_BIAS, DOT_IN_FP32, BLOCK_M, BLOCK_N, BLOCK_D,
    )
    out_y = window_y // POOL + query_y
    out_x = window_x // POOL + query_x
    store_mask = query_valid & (out_y < out_height) & (out_x < out_width)
    out_ptrs = (
        out_ptr + batch * stride_out_b + out_y[:, None] * stride_out_h + out_x[:, None] * stride_out_w
        + head * HEAD_DIM + offs_d[None, :]
    )
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=store_mask[:, None] & d_mask[None, :])


def max_block_n(dtype: torch.dtype) -> int:
    """The largest key block. fp32 uses 16: its k and v tiles are twice as big, and with 32 keys the pipelined key
    loop of a 3xTF32 kernel needs 160 KB of shared memory, at the edge of an A100's 163 KB."""
    return 16 if dtype == torch.float32 else 64


def padded_head_dim(head_dim: int) -> int:
    """BLOCK_D: the head dim padded to a power of two (at least 16, ``tl.dot``'s minimum) in registers."""
    return max(16, triton.next_power_of_2(head_dim))


class LaunchConfig(NamedTuple):
    """Tile sizes and launch options of one attention kernel variant."""

    block_m: int
    block_n: int
    block_d: int
    num_warps: int
    num_stages: int

    def options(self) -> dict:
        """The launch options (for a launch and for an ahead-of-time compile)."""
        return {"num_warps": self.num_warps, "num_stages": self.num_stages}


def _window_blocks(window_size: int, q_pool: bool, head_dim: int, dtype: torch.dtype) -> LaunchConfig:
    """The launch config for one window shape.

    Blocks are at least 16 (``tl.dot``'s minimum on GPUs). Query blocks are at most 64, or 128 with 8 warps for
    16-bit windows of more than 64 queries (windows 14 and 16): on an H200, base_plus's stage-3 windows (14x14,
    head dim 56) ran 11% (batch 1) and 16% (batch 8) faster so (``python -m bench.tune_attention``). Key blocks
    and the rest as measured best there for windows of 8.
    """
    num_queries = queries_per_window(window_size, q_pool)
    num_keys = window_size**2
    block_d = padded_head_dim(head_dim)
    block_n = min(max_block_n(dtype), max(16, triton.next_power_of_2(num_keys)))
    if num_queries > 64 and dtype != torch.float32:
        return LaunchConfig(128, block_n, block_d, 8, 3)
    block_m = min(64, max(16, triton.next_power_of_2(num_queries)))
    return LaunchConfig(block_m, block_n, block_d, 4 if block_m >= 64 else 2, 3)


def check_qkv(qkv: torch.Tensor, num_heads: int, op: str) -> Tuple[torch.Tensor, int]:
    """Check a (B, H, W, 3 * dim) qkv map (see ``launch.checked_operand``) whose last dim splits into num_heads
    heads; return it with unit channel stride (the kernels take its other strides) and head_dim."""
    qkv = checked_operand(op, "qkv", qkv, ("B", "H", "W", "3 * dim"), TRITON_DTYPES, "rows")
    if num_heads < 1 or qkv.shape[3] % (3 * num_heads) != 0:
        raise ValueError(
            f"{op}: expected qkv's last dim to be a multiple of 3 * num_heads = {3 * num_heads}, got {qkv.shape[3]}"
        )
    return qkv, qkv.shape[3] // (3 * num_heads)


def check_qkv_bias(qkv_bias: Optional[torch.Tensor], qkv: torch.Tensor, op: str) -> Optional[torch.Tensor]:
    """Check a (3 * dim,) qkv bias of a float dtype on qkv's device, or None; return it contiguous in qkv's dtype
    (under autocast the qkv projection's output is 16-bit while its bias stays fp32)."""
    if qkv_bias is None:
        return None
    qkv_bias = checked_operand(op, "qkv_bias", qkv_bias, (qkv.shape[3],), TRITON_DTYPES, "contiguous", qkv.device)
    return qkv_bias.to(qkv.dtype)


def window_attention(
    qkv: torch.Tensor, qkv_bias: Optional[torch.Tensor], num_heads: int, window_size: int, q_pool: bool,
    add_bias: bool = False, config: Optional[LaunchConfig] = None,
) -> torch.Tensor:
    """Triton launcher of ``sam2_fast.backends.torch_ops.window_attention``: same arguments, same (B, H', W', dim) result.

    ``add_bias`` adds the bias in a separate pass before the kernel: on GPU the qkv GEMM adds its bias in its
    epilogue for free, so the model never asks for it there. ``config`` overrides the launch config (for tuning).
    """
    qkv, head_dim = check_qkv(qkv, num_heads, "window_attention")
    if window_size < 1 or (q_pool and window_size % 2):
        raise ValueError(
            f"window_attention: expected a window_size >= 1 (even with q_pool), got {window_size} (q_pool={q_pool})"
        )
    qkv_bias = check_qkv_bias(qkv_bias, qkv, "window_attention")
    if add_bias:  # a contiguous sum: its layout would otherwise follow qkv's strides, unchecked
        qkv = add_qkv_bias(qkv, qkv_bias).contiguous()
    batch, height, width, channels3 = qkv.shape
    dim = channels3 // 3
    out_height, out_width = (height // 2, width // 2) if q_pool else (height, width)
    out = torch.empty(batch, out_height, out_width, dim, dtype=qkv.dtype, device=qkv.device)
    if out.numel() == 0:
        return out

    config = config or _window_blocks(window_size, q_pool, head_dim, qkv.dtype)
    window_rows, window_cols = triton.cdiv(height, window_size), triton.cdiv(width, window_size)
    num_queries = queries_per_window(window_size, q_pool)
    grid = (window_rows * window_cols * triton.cdiv(num_queries, config.block_m), num_heads, batch)
    launchable(_window_attention_kernel, qkv)[grid](
        qkv, qkv if qkv_bias is None else qkv_bias, out,
        height, width, out_height, out_width, window_cols, dim,
        qkv.stride(0), qkv.stride(1), qkv.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        _LOG2_E / math.sqrt(head_dim),
        WINDOW=window_size, Q_POOL=q_pool, HEAD_DIM=head_dim, HAS_BIAS=qkv_bias is not None,
        DOT_IN_FP32=dot_in_fp32(qkv.dtype), BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_D=config.block_d,
        **config.options(),
    )
    return out


def _windowed_attention_shapes() -> Iterator[Tuple[int, bool, int]]:
    """(window_size, q_pool, head_dim) of every windowed attention block of the eight configs (any input size)."""
    from sam2_fast.io.configs import CONFIGS

    for config in CONFIGS.values():
        head_dim = config.embed_dim // config.num_heads  # constant across stages: dim and heads double together
        for stage, window_size in enumerate(config.window_spec):
            yield window_size, False, head_dim
            if stage > 0:  # the stage's first block pools q with the previous stage's window
                yield config.window_spec[stage - 1], True, head_dim


def in_every_dtype(shapes: Iterable[Tuple[int, bool, int]]) -> Iterator[Tuple[int, bool, int, torch.dtype, str]]:
    """Each distinct (window_size, q_pool, head_dim) of ``shapes``, in first-seen order, with each dtype the kernels
    take and its Triton name."""
    for window_size, q_pool, head_dim in dict.fromkeys(shapes):
        for dtype, triton_dtype in TRITON_DTYPES.items():
            yield window_size, q_pool, head_dim, dtype, triton_dtype


def aot_variants() -> Iterator[Tuple[str, object, dict, dict, dict]]:
    """(name, kernel, signature, constexprs, launch options) of every compiled variant the configs use on a GPU.

    Covers the eight configs (the window shapes do not depend on the input size, so 1024x1024 included) in fp16,
    bf16 and fp32, with a qkv bias (Hiera's qkv projection always has one); duplicates are yielded once.
    """
    for window_size, q_pool, head_dim, dtype, triton_dtype in in_every_dtype(_windowed_attention_shapes()):
        config = _window_blocks(window_size, q_pool, head_dim, dtype)
        signature = {
            "qkv_ptr": f"*{triton_dtype}", "bias_ptr": f"*{triton_dtype}", "out_ptr": f"*{triton_dtype}",
            **{name: "i32" for name in (
                "height", "width", "out_height", "out_width", "window_cols", "dim",
                "stride_qkv_b", "stride_qkv_h", "stride_qkv_w", "stride_out_b", "stride_out_h", "stride_out_w",
            )},
            "qk_scale": "fp32",
        }
        constexprs = dict(
            WINDOW=window_size, Q_POOL=q_pool, HEAD_DIM=head_dim, HAS_BIAS=True,
            DOT_IN_FP32=dtype == torch.float32, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
            BLOCK_D=config.block_d,
        )
        signature.update({name: "constexpr" for name in constexprs})
        name = f"window_attention_w{window_size}{'_qpool' if q_pool else ''}_hd{head_dim}_{triton_dtype}"
        yield name, _window_attention_kernel, signature, constexprs, config.options()
