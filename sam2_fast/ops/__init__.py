"""The op layer: each hot op of the encoder declared once, and the one place that chooses a backend.

Where things are:
- ``spec``: what declares an op (:class:`~sam2_fast.ops.spec.OpSpec`: its schema, fake, torch reference, kernels and
  backward); ``specs``: the specs themselves, one block per op.
- ``dispatch``: which backend runs each op (what each backend can run, the setting, the resolution).
- ``registry``: everything derived from the specs (the custom ops and ``triton_op``s, the fakes, the autograd
  formulas) and :func:`~sam2_fast.ops.registry.call`, which runs an op on the backend it resolves to.
- this module: the entry points the model calls, one thin function per op, and the names the package exports.

Backends:
- ``torch``: the plain-PyTorch implementations in :mod:`sam2_fast.backends.torch_ops`, always available. The model
  calls them directly (not through a custom op), so ``torch.compile`` sees and fuses them and autograd differentiates
  them. Where this CPU lacks bf16/fp16 units, the attentions run in fp32 on rounded operands (the torch backend's
  own entries in torch_ops).
- ``triton``: fused Triton kernels from :mod:`sam2_fast.kernels`, on CUDA tensors (and on CPU tensors only under
  ``TRITON_INTERPRET=1``, the Triton interpreter, for testing).
- ``extension``: the compiled C++/CUDA extension ``sam2_fast._C`` (ops in the ``sam2_fast_ext`` namespace).

How the fast backends reach a graph (``torch.compile``, ``torch.export``, AOTInductor) and autograd:

- ``extension``: its ``sam2_fast_ext`` ops themselves, with fake implementations and autograd formulas registered
  from the specs, so a traced graph calls the compiled ops (an AOTInductor package on CPU runs them with no Python in
  between).
- ``triton`` on CUDA: ``torch.library.triton_op`` ops (``sam2_fast::triton_*``) whose launchers wrap their kernels
  with ``wrap_triton``, so inductor sees the kernels, compiles them into its output (and into AOTInductor packages)
  and can CUDA-graph the whole forward.
- ``triton`` under the Triton interpreter (CPU tensors, for testing): ``torch.library`` custom ops in the
  ``sam2_fast`` namespace, opaque to the compiler (an interpreted kernel cannot run on the compiler's fake tensors).

Gradients flow through every backend. Where a backend has a backward kernel for an op (the extension's CPU attention
and max-pool backward, Triton's attention, max-pool and FPN backward; the FPN fusion's exact formula on every
backend), its autograd formula runs it; elsewhere the formula recomputes the op's torch implementation and
differentiates that (correct but slower, with a one-time warning). :func:`active_backward` says which each op takes.
Eager inference with no gradient to record calls the kernels directly.

Choosing: ``SAM2_FAST_BACKEND=auto|torch|triton|extension`` (read when used), :func:`set_backend` or the
:func:`use_backend` context manager. ``auto`` takes, per op and device, the first available of
triton, extension, torch on CUDA (for global attention: torch, whose flash SDPA measured faster) and extension,
torch on CPU, with one warning when it has to fall back. Asking for a backend that cannot run raises
:class:`BackendUnavailableError` naming what is missing; an op that an asked-for backend has no kernel for on the
device (the sine encoding and the bias + GELU on Triton, attention and the bias + GELU in the extension's CUDA
build) runs on torch.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import specs
from .dispatch import (
    BACKEND_ENV_VAR, BACKENDS, OPS, BackendUnavailableError, active_backends, backend_status, get_backend,
    resolve_backend, runs_whole_encoder, set_backend, use_backend,
)
from .registry import active_backward, call

__all__ = [
    "BACKENDS", "BACKEND_ENV_VAR", "OPS", "BackendUnavailableError", "set_backend", "get_backend", "use_backend",
    "resolve_backend", "runs_whole_encoder", "backend_status", "active_backends", "active_backward",
    "window_attention", "window_attention_adds_bias", "global_attention", "maxpool2x2", "fpn_upsample_add",
    "bias_gelu_", "bias_gelu_is_fused", "sine_position_encoding",
]


# ----------------------------------------------------------------------------------------------------------------
# What the model calls: one entry point per op of specs.OP_SPECS, with the op's arguments.

def window_attention(
    qkv: torch.Tensor, qkv_bias: Optional[torch.Tensor], num_heads: int, window_size: int, q_pool: bool,
    add_bias: bool = False,
) -> torch.Tensor:
    """Windowed attention of a (B, H, W, 3 * dim) qkv map -> (B, H', W', dim); see torch_ops.window_attention.

    ``add_bias``: ``qkv`` lacks its bias and the op adds ``qkv_bias`` (fused into the token reads where
    :func:`window_attention_adds_bias` says so, else as a separate add).
    """
    return call(specs.WINDOW_ATTENTION, qkv.device.type, qkv, qkv_bias, num_heads, window_size, q_pool, add_bias)


def window_attention_adds_bias(device_type: str) -> bool:
    """Whether window_attention on ``device_type`` adds the qkv bias while reading the tokens, so that a caller
    gains by handing it the projection without its bias (``add_bias=True``): the CPU extension does."""
    return device_type == "cpu" and resolve_backend("window_attention", device_type) == "extension"


def global_attention(qkv: torch.Tensor, num_heads: int, q_pool: bool) -> torch.Tensor:
    """Attention over all tokens of each image of a (B, H, W, 3 * dim) qkv map -> (B, H', W', dim)."""
    return call(specs.GLOBAL_ATTENTION, qkv.device.type, qkv, num_heads, q_pool)


def maxpool2x2(x: torch.Tensor) -> torch.Tensor:
    """2x2 max-pool (stride 2, floor) of a channels-last (B, H, W, C) map."""
    return call(specs.MAXPOOL2X2, x.device.type, x)


def fpn_upsample_add(lateral: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """``lateral + nearest_upsample_2x(prev.float())`` of (B, C, 2h, 2w) and (B, C, h, w) maps."""
    return call(specs.FPN_UPSAMPLE_ADD, lateral.device.type, lateral, prev)


def bias_gelu_(x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``x = gelu(x + bias)`` in place (exact, erf GELU), returning ``x``: for a GEMM's fresh output that no
    gradient needs (the op has no autograd formula); see torch_ops.bias_gelu_."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, bias)):
        raise ValueError(
            "bias_gelu_ works in place and has no backward: it is for activations no gradient needs, got a tensor "
            "that requires grad (use torch.nn.functional.gelu(x + bias) where gradients are needed)"
        )
    call(specs.BIAS_GELU_, x.device.type, x, bias)
    return x


def bias_gelu_is_fused(device_type: str) -> bool:
    """Whether bias_gelu_ on ``device_type`` runs a fused kernel (the CPU extension's), so that a caller gains by
    running its GEMM without the bias and handing both to it, instead of a GEMM with bias and torch's GELU."""
    return resolve_backend("bias_gelu_", device_type) != "torch"


def sine_position_encoding(
    height: int, width: int, num_pos_feats: int, temperature: float, normalize: bool, scale: float,
    device: torch.device,
) -> torch.Tensor:
    """(1, 2 * num_pos_feats, height, width) fp32 sine position encoding; see torch_ops.sine_position_encoding."""
    device = torch.device(device)
    return call(specs.SINE_POSITION_ENCODING, device.type, height, width, num_pos_feats, temperature, normalize, scale,
                device)
