"""Global multi-head attention of Hiera: flash-attention over all H * W tokens of each image, q optionally pooled.

The kernel reuses the window kernel's query loader and attention loop (``_attend``): it is the same loop with one
window covering the whole map (so no padding and no bias fill).
"""

from __future__ import annotations

import math
from typing import Iterator, Optional, Tuple

import torch
import triton
import triton.language as tl

from .launch import TRITON_DTYPES, launchable
from .window_attention import (
    _LOG2_E, LaunchConfig, _attend, _head_pointers, _load_query_rows, check_qkv, dot_in_fp32, max_block_n,
    padded_head_dim,
)


@triton.jit
def _global_attention_kernel(
    qkv_ptr, out_ptr,
    height, width, out_height, out_width, dim,
    stride_qkv_b, stride_qkv_h, stride_qkv_w,
    stride_out_b, stride_out_h, stride_out_w,
    qk_scale,
    Q_POOL: tl.constexpr, HEAD_DIM: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[b, :, :, head] = softmax(q k^T * HEAD_DIM^-0.5) v over all height * width tokens of image b.

    Layout: qkv (B, height, width, 3 * dim) with strides (stride_qkv_b, stride_qkv_h, stride_qkv_w, 1), its last
    dim split as (3, heads, HEAD_DIM); out (B, out_height, out_width, dim) with strides (stride_out_b,
    stride_out_h, stride_out_w, 1). With Q_POOL, q is max-pooled 2x2 (stride 2, floor) over the map while it is
    loaded and (out_height, out_width) = (height // 2, width // 2). Softmax in fp32 (base 2, online over BLOCK_N
    keys in row-major token order), head dim padded to BLOCK_D in registers.

    Grid: (cdiv(out_height * out_width, BLOCK_M), heads, B); a program computes BLOCK_M queries of one image and
    head.
    """
    POOL: tl.constexpr = 2 if Q_POOL else 1
    head, batch, offs_d, d_mask, q_ptr, k_ptr, v_ptr = _head_pointers(qkv_ptr, stride_qkv_b, dim, HEAD_DIM, BLOCK_D)
    no_fill = tl.zeros([BLOCK_D], dtype=qkv_ptr.dtype.element_ty)

    query = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    query_valid = query < out_height * out_width
    query_y = query // out_width
    query_x = query % out_width
    q = _load_query_rows(
        q_ptr, POOL * query_y, POOL * query_x, query_valid, height, width, stride_qkv_h, stride_qkv_w, offs_d,
        no_fill, HEAD_DIM, False, Q_POOL,
    )

    out = _attend(
        q, k_ptr, v_ptr, 0, 0, height * width, width, height, width, stride_qkv_h, stride_qkv_w, offs_d,
        no_fill, no_fill, qk_scale, HEAD_DIM, False, DOT_IN_FP32, BLOCK_M, BLOCK_N, BLOCK_D,
    )
    out_ptrs = (
        out_ptr + batch * stride_out_b + query_y[:, None] * stride_out_h + query_x[:, None] * stride_out_w
        + head * HEAD_DIM + offs_d[None, :]
    )
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=query_valid[:, None] & d_mask[None, :])


def _global_blocks(head_dim: int, dtype: torch.dtype) -> LaunchConfig:
    """The head dim is padded to a power of two in registers. 16-bit: 128 queries x 64 keys, 8 warps, the config
    that was within 15% of the best at every stage-3 global block of tiny, base_plus and large at 1024x1024, batch 1
    and 8, on an H200 (``python -m bench.tune_attention``). fp32 keeps 64 queries x 16 keys (see ``max_block_n``)."""
    block_d = padded_head_dim(head_dim)
    if dtype == torch.float32:
        return LaunchConfig(64, max_block_n(dtype), block_d, 4, 3)
    return LaunchConfig(128, 64, block_d, 8, 3)


def global_attention(
    qkv: torch.Tensor, num_heads: int, q_pool: bool, config: Optional[LaunchConfig] = None,
) -> torch.Tensor:
    """Triton launcher of ``sam2_fast.backends.torch_ops.global_attention``: same arguments, same (B, H', W', dim) result.
    ``config`` overrides the launch config (for tuning)."""
    qkv, head_dim = check_qkv(qkv, num_heads, "global_attention")
    batch, height, width, channels3 = qkv.shape
    dim = channels3 // 3
    out_height, out_width = (height // 2, width // 2) if q_pool else (height, width)
    out = torch.empty(batch, out_height, out_width, dim, dtype=qkv.dtype, device=qkv.device)
    if out.numel() == 0:
        return out

    config = config or _global_blocks(head_dim, qkv.dtype)
    grid = (triton.cdiv(out_height * out_width, config.block_m), num_heads, batch)
    launchable(_global_attention_kernel, qkv)[grid](
        qkv, out,
        height, width, out_height, out_width, dim,
        qkv.stride(0), qkv.stride(1), qkv.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        _LOG2_E / math.sqrt(head_dim),
        Q_POOL=q_pool, HEAD_DIM=head_dim, DOT_IN_FP32=dot_in_fp32(qkv.dtype),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_D=config.block_d,
        **config.options(),
    )
    return out


def aot_variants() -> Iterator[Tuple[str, object, dict, dict, dict]]:
    """(name, kernel, signature, constexprs, launch options) of every compiled variant the configs use on a GPU.

    The eight configs' global blocks never pool q and have head dims 96 (tiny, small), 56 (base_plus) and 72
    (large) at every input size, 1024x1024 included; each in fp16, bf16 and fp32, duplicates yielded once.
    """
    from sam2_fast.io.configs import CONFIGS

    head_dims = sorted({config.embed_dim // config.num_heads for config in CONFIGS.values() if config.global_att_blocks})
    for head_dim in head_dims:
        for dtype, triton_dtype in TRITON_DTYPES.items():
            config = _global_blocks(head_dim, dtype)
            signature = {
                "qkv_ptr": f"*{triton_dtype}", "out_ptr": f"*{triton_dtype}",
                **{name: "i32" for name in (
                    "height", "width", "out_height", "out_width", "dim",
                    "stride_qkv_b", "stride_qkv_h", "stride_qkv_w", "stride_out_b", "stride_out_h", "stride_out_w",
                )},
                "qk_scale": "fp32",
            }
            constexprs = dict(
                Q_POOL=False, HEAD_DIM=head_dim, DOT_IN_FP32=dtype == torch.float32,
                BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_D=config.block_d,
            )
            signature.update({name: "constexpr" for name in constexprs})
            name = f"global_attention_hd{head_dim}_{triton_dtype}"
            yield name, _global_attention_kernel, signature, constexprs, config.options()
