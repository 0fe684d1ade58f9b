"""The backward of windowed and global attention (``window_attention``, ``global_attention``): gradients of the qkv
map and of the qkv bias, flash-attention style, reading and writing the map in place.

Two kernels over the same (window, query block) grid as the forward:
- ``_attention_backward_dq_kernel``, per block of queries: the log-sum-exp of its scores (one pass over the keys;
  the forward keeps none), D = rowsum(dO * O) from the saved output, then dQ = (P * (dO V^T - D)) K * scale in a
  second pass, routed back to the tokens q came from (with q-pooling, per channel to the token ``max_pool2d``
  took); it stores the log-sum-exp and D for the other kernel.
- ``_attention_backward_dkdv_kernel``, per block of keys: dV = P^T dO and dK = (P * (dP - D))^T Q * scale over all
  query blocks of its window, stored to the tokens' k and v channels; padding keys (tokens past the map, whose k
  and v are the qkv bias) add their gradients to the bias's.
Global attention is the same with one window covering the map. Products in fp32 (3xTF32 for fp32 inputs, 16-bit
operands with fp32 accumulation otherwise), softmax in base 2 as in the forward.
"""

from __future__ import annotations

import math
from typing import Iterator, Optional, Tuple

import torch
import triton
import triton.language as tl

from ..backends.shapes import queries_per_window
from ..backends.torch_ops import add_qkv_bias
from .launch import checked_operand, launchable
from .window_attention import (
    _LOG2_E, LaunchConfig, _head_fills, _head_pointers, _load_query_rows, _load_token_rows, check_qkv, check_qkv_bias,
    dot_in_fp32, in_every_dtype, padded_head_dim,
)


@triton.jit
def _mm(a, b, DOT_IN_FP32: tl.constexpr):
    """a @ b accumulated in fp32: fp32 operands as 3xTF32, else ``a`` cast to ``b``'s 16-bit dtype."""
    if DOT_IN_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="tf32x3")
    return tl.dot(a.to(b.dtype), b)


@triton.jit
def _query_places(query, window_y, window_x, out_height, out_width, num_queries, out_window,
                  POOL: tl.constexpr, GLOBAL: tl.constexpr):
    """(token y, token x, output y, output x, valid, kept) of the window's queries ``query``: the top-left token
    each q is read (or pooled) from, where its output lands, whether it exists and whether it survives the crop."""
    valid = query < num_queries
    if GLOBAL:
        query_y = query // out_width
        query_x = query % out_width
    else:
        query_y = query // out_window
        query_x = query % out_window
    out_y = window_y // POOL + query_y
    out_x = window_x // POOL + query_x
    kept = valid & (out_y < out_height) & (out_x < out_width)
    return window_y + POOL * query_y, window_x + POOL * query_x, out_y, out_x, valid, kept


@triton.jit
def _window_of(program, blocks_per_window, window_cols, height, width, WINDOW: tl.constexpr, GLOBAL: tl.constexpr):
    """(block index in its window, window index, window's top-left y and x, its keys, keys per row) of a program."""
    block = program % blocks_per_window
    window = program // blocks_per_window
    if GLOBAL:
        return block, window, 0, 0, height * width, width
    return block, window, (window // window_cols) * WINDOW, (window % window_cols) * WINDOW, WINDOW * WINDOW, WINDOW


@triton.jit
def _attention_backward_dq_kernel(
    qkv_ptr, bias_ptr, out_ptr, grad_out_ptr, grad_qkv_ptr, lse_ptr, delta_ptr,
    height, width, out_height, out_width, window_cols, dim, num_queries, query_blocks, slots_per_head,
    stride_qkv_b, stride_qkv_h, stride_qkv_w,
    stride_out_b, stride_out_h, stride_out_w,
    stride_grad_out_b, stride_grad_out_h, stride_grad_out_w,
    qk_scale, sm_scale,
    WINDOW: tl.constexpr, Q_POOL: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_BIAS: tl.constexpr,
    GLOBAL: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dQ of BLOCK_M queries of one window (or image, GLOBAL) and head; stores their log-sum-exp and D.

    Layout: qkv (B, height, width, 3 * dim) with strides (stride_qkv_b, stride_qkv_h, stride_qkv_w, 1), its last
    dim split as (3, heads, HEAD_DIM), already holding the bias if the forward added it; bias (3 * dim,) in qkv's
    dtype; out (B, out_height, out_width, dim) with strides (stride_out_b, stride_out_h, stride_out_w, 1) and
    grad_out likewise with the stride_grad_out_* ones, both in qkv's dtype; grad_qkv contiguous (B, height, width,
    3 * dim), zero where nothing is stored; lse and delta fp32 (B, heads, slots_per_head), slot
    (window * query_blocks + block) * BLOCK_M + row. num_queries: queries per window (all outputs when GLOBAL).

    Grid: (windows * query_blocks, heads, B).
    """
    POOL: tl.constexpr = 2 if Q_POOL else 1
    OUT_WINDOW: tl.constexpr = WINDOW // POOL
    q_block, window, window_y, window_x, num_keys, keys_per_row = _window_of(
        tl.program_id(0), query_blocks, window_cols, height, width, WINDOW, GLOBAL
    )
    head, batch, offs_d, d_mask, q_ptr, k_ptr, v_ptr = _head_pointers(qkv_ptr, stride_qkv_b, dim, HEAD_DIM, BLOCK_D)
    q_fill, k_fill, v_fill = _head_fills(bias_ptr, head, dim, offs_d, d_mask, qkv_ptr.dtype.element_ty, HEAD_DIM,
                                         HAS_BIAS, BLOCK_D)

    query = q_block * BLOCK_M + tl.arange(0, BLOCK_M)
    token_y, token_x, out_y, out_x, valid, kept = _query_places(
        query, window_y, window_x, out_height, out_width, num_queries, OUT_WINDOW, POOL, GLOBAL
    )
    q = _load_query_rows(q_ptr, token_y, token_x, valid, height, width, stride_qkv_h, stride_qkv_w, offs_d, q_fill,
                         HEAD_DIM, HAS_BIAS, Q_POOL)
    channel = head * HEAD_DIM + offs_d[None, :]
    out_offsets = batch * stride_out_b + out_y[:, None] * stride_out_h + out_x[:, None] * stride_out_w + channel
    grad_out_offsets = (batch * stride_grad_out_b + out_y[:, None] * stride_grad_out_h
                        + out_x[:, None] * stride_grad_out_w + channel)
    row_mask = kept[:, None] & d_mask[None, :]
    # Queries the crop drops have no output and so no gradient: their dO is zero.
    grad_o = tl.load(grad_out_ptr + grad_out_offsets, mask=row_mask, other=0.0)
    delta = tl.sum(grad_o.to(tl.float32) * tl.load(out_ptr + out_offsets, mask=row_mask, other=0.0).to(tl.float32), 1)

    # Pass 1: the log-sum-exp of each query's scores (base 2).
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    for key_start in range(0, num_keys, BLOCK_N):
        key = key_start + tl.arange(0, BLOCK_N)
        key_valid = key < num_keys
        k = _load_token_rows(k_ptr, window_y + key // keys_per_row, window_x + key % keys_per_row, key_valid, height,
                             width, stride_qkv_h, stride_qkv_w, offs_d, k_fill, HEAD_DIM, HAS_BIAS)
        scores = tl.where(key_valid[None, :], _mm(q, tl.trans(k), DOT_IN_FP32) * qk_scale, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        row_sum = row_sum * tl.exp2(row_max - new_max) + tl.sum(tl.exp2(scores - new_max[:, None]), axis=1)
        row_max = new_max
    lse = row_max + tl.log2(row_sum)

    # Pass 2: dQ = dS K * scale, dS = P * (dO V^T - D).
    grad_q = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for key_start in range(0, num_keys, BLOCK_N):
        key = key_start + tl.arange(0, BLOCK_N)
        key_valid = key < num_keys
        key_y = window_y + key // keys_per_row
        key_x = window_x + key % keys_per_row
        k = _load_token_rows(k_ptr, key_y, key_x, key_valid, height, width, stride_qkv_h, stride_qkv_w, offs_d, k_fill,
                             HEAD_DIM, HAS_BIAS)
        v = _load_token_rows(v_ptr, key_y, key_x, key_valid, height, width, stride_qkv_h, stride_qkv_w, offs_d, v_fill,
                             HEAD_DIM, HAS_BIAS)
        probs = tl.exp2(_mm(q, tl.trans(k), DOT_IN_FP32) * qk_scale - lse[:, None])
        probs = tl.where(key_valid[None, :], probs, 0.0)
        grad_scores = probs * (_mm(grad_o, tl.trans(v), DOT_IN_FP32) - delta[:, None])
        grad_q += _mm(grad_scores, k, DOT_IN_FP32)
    grad_q = grad_q * sm_scale

    slots = (batch * tl.num_programs(1) + head) * slots_per_head + tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    tl.store(lse_ptr + slots, lse)
    tl.store(delta_ptr + slots, delta)

    grad_row = 3 * dim * width
    grad_base = grad_qkv_ptr + batch * (height * grad_row) + head * HEAD_DIM + offs_d[None, :]
    if Q_POOL:
        # max_pool2d's choice per channel: the first of the 2x2 tokens holding the max, or the last NaN.
        pooled = q.to(tl.float32)
        winner = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.int32)
        found = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.int32)
        last_nan = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.int32)
        for corner in tl.static_range(4):
            value = _load_token_rows(q_ptr, token_y + corner // 2, token_x + corner % 2, kept, height, width,
                                     stride_qkv_h, stride_qkv_w, offs_d, q_fill, HEAD_DIM, HAS_BIAS).to(tl.float32)
            hit = (value == pooled) & (found == 0)
            winner = tl.where(hit, corner, winner)
            found = tl.where(hit, 1, found)
            last_nan = tl.where(value != value, corner, last_nan)
        winner = tl.where(pooled != pooled, last_nan, winner)
        for corner in tl.static_range(4):
            offsets = (token_y + corner // 2)[:, None] * grad_row + (token_x + corner % 2)[:, None] * (3 * dim)
            tl.store(grad_base + offsets, tl.where(winner == corner, grad_q, 0.0).to(grad_qkv_ptr.dtype.element_ty),
                     mask=row_mask)
    else:
        offsets = token_y[:, None] * grad_row + token_x[:, None] * (3 * dim)
        tl.store(grad_base + offsets, grad_q.to(grad_qkv_ptr.dtype.element_ty), mask=row_mask)


@triton.jit
def _attention_backward_dkdv_kernel(
    qkv_ptr, bias_ptr, grad_out_ptr, grad_qkv_ptr, grad_bias_ptr, lse_ptr, delta_ptr,
    height, width, out_height, out_width, window_cols, dim, num_queries, query_blocks, key_blocks, slots_per_head,
    stride_qkv_b, stride_qkv_h, stride_qkv_w,
    stride_grad_out_b, stride_grad_out_h, stride_grad_out_w,
    qk_scale, sm_scale,
    WINDOW: tl.constexpr, Q_POOL: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_BIAS: tl.constexpr,
    GLOBAL: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dK and dV of BLOCK_N keys of one window (or image, GLOBAL) and head, over all its query blocks.

    Layout as ``_attention_backward_dq_kernel``'s (lse and delta as it stored them); grad_bias fp32 (3 * dim,),
    to which padding keys add their k and v gradients. Grid: (windows * key_blocks, heads, B).
    """
    POOL: tl.constexpr = 2 if Q_POOL else 1
    OUT_WINDOW: tl.constexpr = WINDOW // POOL
    k_block, window, window_y, window_x, num_keys, keys_per_row = _window_of(
        tl.program_id(0), key_blocks, window_cols, height, width, WINDOW, GLOBAL
    )
    head, batch, offs_d, d_mask, q_ptr, k_ptr, v_ptr = _head_pointers(qkv_ptr, stride_qkv_b, dim, HEAD_DIM, BLOCK_D)
    q_fill, k_fill, v_fill = _head_fills(bias_ptr, head, dim, offs_d, d_mask, qkv_ptr.dtype.element_ty, HEAD_DIM,
                                         HAS_BIAS, BLOCK_D)

    key = k_block * BLOCK_N + tl.arange(0, BLOCK_N)
    key_valid = key < num_keys
    key_y = window_y + key // keys_per_row
    key_x = window_x + key % keys_per_row
    k = _load_token_rows(k_ptr, key_y, key_x, key_valid, height, width, stride_qkv_h, stride_qkv_w, offs_d, k_fill,
                         HEAD_DIM, HAS_BIAS)
    v = _load_token_rows(v_ptr, key_y, key_x, key_valid, height, width, stride_qkv_h, stride_qkv_w, offs_d, v_fill,
                         HEAD_DIM, HAS_BIAS)
    grad_k = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    grad_v = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    head_slots = (batch * tl.num_programs(1) + head) * slots_per_head + window * query_blocks * BLOCK_M
    for q_block in range(0, query_blocks):
        query = q_block * BLOCK_M + tl.arange(0, BLOCK_M)
        token_y, token_x, out_y, out_x, valid, kept = _query_places(
            query, window_y, window_x, out_height, out_width, num_queries, OUT_WINDOW, POOL, GLOBAL
        )
        q = _load_query_rows(q_ptr, token_y, token_x, valid, height, width, stride_qkv_h, stride_qkv_w, offs_d,
                             q_fill, HEAD_DIM, HAS_BIAS, Q_POOL)
        grad_out_offsets = (batch * stride_grad_out_b + out_y[:, None] * stride_grad_out_h
                            + out_x[:, None] * stride_grad_out_w + head * HEAD_DIM + offs_d[None, :])
        grad_o = tl.load(grad_out_ptr + grad_out_offsets, mask=kept[:, None] & d_mask[None, :], other=0.0)
        slots = head_slots + q_block * BLOCK_M + tl.arange(0, BLOCK_M)
        lse = tl.load(lse_ptr + slots)
        delta = tl.load(delta_ptr + slots)
        probs_t = tl.exp2(_mm(k, tl.trans(q), DOT_IN_FP32) * qk_scale - lse[None, :])
        probs_t = tl.where(key_valid[:, None] & valid[None, :], probs_t, 0.0)
        grad_v += _mm(probs_t, grad_o, DOT_IN_FP32)
        grad_scores_t = probs_t * (_mm(v, tl.trans(grad_o), DOT_IN_FP32) - delta[None, :])
        grad_k += _mm(grad_scores_t, q, DOT_IN_FP32)
    grad_k = grad_k * sm_scale

    in_map = key_valid & (key_y < height) & (key_x < width)
    grad_row = 3 * dim * width
    grad_ptrs = (grad_qkv_ptr + batch * (height * grad_row) + key_y[:, None] * grad_row + key_x[:, None] * (3 * dim)
                 + dim + head * HEAD_DIM + offs_d[None, :])
    store_mask = in_map[:, None] & d_mask[None, :]
    tl.store(grad_ptrs, grad_k.to(grad_qkv_ptr.dtype.element_ty), mask=store_mask)
    tl.store(grad_ptrs + dim, grad_v.to(grad_qkv_ptr.dtype.element_ty), mask=store_mask)
    if HAS_BIAS:
        padding = (key_valid & ~in_map)[:, None]
        bias_channels = grad_bias_ptr + dim + head * HEAD_DIM + offs_d
        tl.atomic_add(bias_channels, tl.sum(tl.where(padding, grad_k, 0.0), axis=0), mask=d_mask)
        tl.atomic_add(bias_channels + dim, tl.sum(tl.where(padding, grad_v, 0.0), axis=0), mask=d_mask)


def backward_blocks(window_size: int, q_pool: bool, head_dim: int, dtype: torch.dtype) -> LaunchConfig:
    """Tiles of the backward kernels (window_size 0: global attention): blocks of 64 queries and 64 keys (32 in fp32,
    whose tiles are twice the bytes), or 16 where a window has no more (window 4, pooled window 8). A backward
    program holds q, k, v, dO and two fp32 accumulators, so 16-bit head dims over 64 take 8 warps, and fp32 ones
    load without pipelining (two stages of fp32 128-wide tiles need more shared memory than an A100 has)."""
    cap = 32 if dtype == torch.float32 else 64
    block_d = padded_head_dim(head_dim)
    queries, keys = (queries_per_window(window_size, q_pool), window_size**2) if window_size else (cap, cap)
    block_m, block_n = (16 if count <= 16 else cap for count in (queries, keys))
    num_warps = 8 if block_d > 64 and cap == 64 else 4
    return LaunchConfig(block_m, block_n, block_d, num_warps, 1 if dtype == torch.float32 and block_d > 64 else 2)


def attention_backward(
    grad_out: torch.Tensor, qkv: torch.Tensor, qkv_bias: Optional[torch.Tensor], out: torch.Tensor, num_heads: int,
    window_size: int, q_pool: bool, add_bias: bool = False, config: Optional[LaunchConfig] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gradients (grad_qkv, grad_qkv_bias) of ``window_attention`` (``window_size`` > 0) or of ``global_attention``
    (``window_size`` 0, no bias) from the gradient of its output and that output; the same arguments as the forward
    otherwise. grad_qkv is contiguous in qkv's dtype, grad_qkv_bias in the bias's dtype (shape (0,) without one), as
    the C++ extension's ``attention_backward`` returns them. ``config`` overrides the tiles (for tuning)."""
    op = "attention_backward"
    qkv, head_dim = check_qkv(qkv, num_heads, op)
    if window_size < 0 or (window_size and q_pool and window_size % 2):
        raise ValueError(f"{op}: expected window_size 0 (global) or >= 1 (even with q_pool), got {window_size}")
    batch, height, width, channels3 = qkv.shape
    dim = channels3 // 3
    out_height, out_width = (height // 2, width // 2) if q_pool else (height, width)
    out_shape = (batch, out_height, out_width, dim)
    grad_out = checked_operand(op, "grad_out", grad_out, out_shape, (qkv.dtype,), "rows", qkv.device)
    out = checked_operand(op, "out", out, out_shape, (qkv.dtype,), "rows", qkv.device)
    bias = check_qkv_bias(qkv_bias, qkv, op)
    if add_bias:  # a contiguous sum: its layout would otherwise follow qkv's strides, unchecked
        qkv = add_qkv_bias(qkv, bias).contiguous()
    grad_qkv = torch.zeros(qkv.shape, dtype=qkv.dtype, device=qkv.device)
    grad_bias = None if bias is None else torch.zeros(channels3, dtype=torch.float32, device=qkv.device)
    if out.numel() > 0:
        config = config or backward_blocks(window_size, q_pool, head_dim, qkv.dtype)
        if window_size:
            windows = triton.cdiv(height, window_size) * triton.cdiv(width, window_size)
            window_cols, num_queries, num_keys = triton.cdiv(width, window_size), queries_per_window(window_size, q_pool), window_size**2
        else:
            windows, window_cols, num_queries, num_keys = 1, 1, out_height * out_width, height * width
        query_blocks, key_blocks = triton.cdiv(num_queries, config.block_m), triton.cdiv(num_keys, config.block_n)
        slots_per_head = windows * query_blocks * config.block_m
        lse = torch.empty(batch, num_heads, slots_per_head, dtype=torch.float32, device=qkv.device)
        delta = torch.empty_like(lse)
        common = dict(
            WINDOW=window_size, Q_POOL=q_pool, HEAD_DIM=head_dim, HAS_BIAS=bias is not None, GLOBAL=window_size == 0,
            DOT_IN_FP32=dot_in_fp32(qkv.dtype), BLOCK_M=config.block_m, BLOCK_N=config.block_n,
            BLOCK_D=config.block_d, **config.options(),
        )
        scales = (_LOG2_E / math.sqrt(head_dim), 1.0 / math.sqrt(head_dim))
        fill = qkv if bias is None else bias
        launchable(_attention_backward_dq_kernel, qkv)[(windows * query_blocks, num_heads, batch)](
            qkv, fill, out, grad_out, grad_qkv, lse, delta,
            height, width, out_height, out_width, window_cols, dim, num_queries, query_blocks, slots_per_head,
            *qkv.stride()[:3], *out.stride()[:3], *grad_out.stride()[:3], *scales, **common,
        )
        launchable(_attention_backward_dkdv_kernel, qkv)[(windows * key_blocks, num_heads, batch)](
            qkv, fill, grad_out, grad_qkv, lse if grad_bias is None else grad_bias, lse, delta,
            height, width, out_height, out_width, window_cols, dim, num_queries, query_blocks, key_blocks,
            slots_per_head, *qkv.stride()[:3], *grad_out.stride()[:3], *scales, **common,
        )
    if grad_bias is not None and add_bias:
        grad_bias += grad_qkv.sum(dim=(0, 1, 2), dtype=torch.float32)
    if grad_bias is None:
        return grad_qkv, qkv.new_empty(0)
    return grad_qkv, grad_bias.to(qkv_bias.dtype)


def _attention_shapes() -> Iterator[Tuple[int, bool, int]]:
    """(window_size, q_pool, head_dim) of every attention block of the eight configs: windowed ones, and the
    global blocks (window_size 0; they never pool q)."""
    from sam2_fast.io.configs import CONFIGS

    from .window_attention import _windowed_attention_shapes

    yield from _windowed_attention_shapes()
    for config in CONFIGS.values():
        if config.global_att_blocks:
            yield 0, False, config.embed_dim // config.num_heads


def aot_variants() -> Iterator[Tuple[str, object, dict, dict, dict]]:
    """(name, kernel, signature, constexprs, launch options) of both backward kernels for every attention block of
    the configs, in fp16, bf16 and fp32, with the qkv bias windows have (global blocks: none); duplicates once."""
    for window_size, q_pool, head_dim, dtype, triton_dtype in in_every_dtype(_attention_shapes()):
        config = backward_blocks(window_size, q_pool, head_dim, dtype)
        constexprs = dict(
            WINDOW=window_size, Q_POOL=q_pool, HEAD_DIM=head_dim, HAS_BIAS=window_size > 0,
            GLOBAL=window_size == 0, DOT_IN_FP32=dtype == torch.float32, BLOCK_M=config.block_m,
            BLOCK_N=config.block_n, BLOCK_D=config.block_d,
        )
        sizes = ("height", "width", "out_height", "out_width", "window_cols", "dim", "num_queries", "query_blocks")
        shape = f"w{window_size}{'_qpool' if q_pool else ''}" if window_size else "global"
        for kernel, pointers, counts, strided in (
            (_attention_backward_dq_kernel, ("qkv", "bias", "out", "grad_out", "grad_qkv"), (),
             ("qkv", "out", "grad_out")),
            (_attention_backward_dkdv_kernel, ("qkv", "bias", "grad_out", "grad_qkv"), ("key_blocks",),
             ("qkv", "grad_out")),
        ):
            signature = {f"{name}_ptr": f"*{triton_dtype}" for name in pointers}
            if kernel is _attention_backward_dkdv_kernel:
                signature["grad_bias_ptr"] = "*fp32"
            signature.update(lse_ptr="*fp32", delta_ptr="*fp32")
            strides = [f"stride_{name}_{axis}" for name in strided for axis in "bhw"]
            signature.update({name: "i32" for name in (*sizes, *counts, "slots_per_head", *strides)})
            signature.update(qk_scale="fp32", sm_scale="fp32")
            signature.update({name: "constexpr" for name in constexprs})
            part = "dq" if kernel is _attention_backward_dq_kernel else "dkdv"
            yield (f"attention_backward_{part}_{shape}_hd{head_dim}_{triton_dtype}", kernel, signature,
                   constexprs, config.options())
