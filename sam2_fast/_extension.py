"""Loading the compiled C++/CUDA extension ``sam2_fast._C`` and what it was built for.

The extension registers its ops with ``TORCH_LIBRARY`` in the ``sam2_fast_ext`` namespace (schemas in
csrc/ops.cpp, kernels in csrc/<op>.cpp and csrc/cuda/<op>.cu). Loading it is optional: if it is missing or broken,
:func:`load_error` says why and sam2_fast runs on its other backends. Once it is loaded, each op gets its fake (meta)
implementation here, so that ``torch.compile(fullgraph=True)`` and ``torch.export`` can trace through it.
"""

from __future__ import annotations

import importlib
import os
from typing import Optional, Tuple

import torch

DISABLE_ENV_VAR = "SAM2_FAST_DISABLE_EXT"


def _load() -> Tuple[Optional[str], Tuple[str, ...]]:
    if os.environ.get(DISABLE_ENV_VAR) == "1":
        return f"the C++ extension is disabled by {DISABLE_ENV_VAR}=1", ()
    try:
        module = importlib.import_module("sam2_fast._C")
    except ImportError as error:
        return (
            f"the C++ extension sam2_fast._C is not built ({error}); reinstall with "
            "`pip install --no-build-isolation .` and a C++ compiler to build it",
            (),
        )
    except Exception as error:  # e.g. an undefined symbol after a torch upgrade
        return f"the C++ extension sam2_fast._C failed to load ({type(error).__name__}: {error})", ()
    devices = ("cpu", "cuda") if module.built_with_cuda() else ("cpu",)
    _register_fakes()
    return None, devices


def _attention_out_shape(qkv: torch.Tensor, num_heads: int, q_pool: bool) -> Tuple[int, int, int, int]:
    torch._check(qkv.dim() == 4, lambda: f"expected qkv of shape (B, H, W, 3 * dim), got {tuple(qkv.shape)}")
    torch._check(
        qkv.shape[3] % (3 * num_heads) == 0,
        lambda: f"qkv's last dim {qkv.shape[3]} is not a multiple of 3 * num_heads = {3 * num_heads}",
    )
    batch, height, width, channels3 = qkv.shape
    if q_pool:
        height, width = height // 2, width // 2
    return batch, height, width, channels3 // 3


def _register_fakes() -> None:
    """Fake (meta) implementations of the sam2_fast_ext ops: output shape, dtype and (contiguous) layout."""

    @torch.library.register_fake("sam2_fast_ext::window_attention")
    def _(qkv, qkv_bias, num_heads, window_size, q_pool):
        torch._check(window_size > 0, lambda: f"expected a positive window_size, got {window_size}")
        torch._check(not q_pool or window_size % 2 == 0, lambda: f"q_pool needs an even window_size, got {window_size}")
        return qkv.new_empty(_attention_out_shape(qkv, num_heads, q_pool))

    @torch.library.register_fake("sam2_fast_ext::global_attention")
    def _(qkv, num_heads, q_pool):
        return qkv.new_empty(_attention_out_shape(qkv, num_heads, q_pool))

    @torch.library.register_fake("sam2_fast_ext::maxpool2x2")
    def _(x):
        torch._check(x.dim() == 4, lambda: f"expected a (B, H, W, C) map, got shape {tuple(x.shape)}")
        return x.new_empty(x.shape[0], x.shape[1] // 2, x.shape[2] // 2, x.shape[3])

    @torch.library.register_fake("sam2_fast_ext::fpn_upsample_add")
    def _(lateral, prev):
        torch._check(
            lateral.dim() == 4 and prev.dim() == 4 and lateral.shape[:2] == prev.shape[:2]
            and lateral.shape[2] == 2 * prev.shape[2] and lateral.shape[3] == 2 * prev.shape[3],
            lambda: f"expected lateral (B, C, 2h, 2w) and prev (B, C, h, w), got {tuple(lateral.shape)} and "
            f"{tuple(prev.shape)}",
        )
        return lateral.new_empty(lateral.shape, dtype=torch.promote_types(lateral.dtype, torch.float32))

    @torch.library.register_fake("sam2_fast_ext::sine_position_encoding")
    def _(height, width, num_pos_feats, temperature, normalize, scale, device):
        return torch.empty(1, 2 * num_pos_feats, height, width, dtype=torch.float32, device=device)


_LOAD_ERROR, _DEVICE_TYPES = _load()


def load_error() -> Optional[str]:
    """Why the extension is unavailable, or None when it is loaded."""
    return _LOAD_ERROR


def device_types() -> Tuple[str, ...]:
    """The device types the loaded extension has kernels for."""
    return _DEVICE_TYPES
