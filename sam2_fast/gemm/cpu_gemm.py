"""fp32 GEMMs of the encoder's linear layers on oneDNN, on CPUs where its kernels beat the BLAS torch links.

ATen computes fp32 ``F.linear`` and its gradients with the BLAS torch links (MKL in the x86-64 wheels). MKL takes
its AVX-512 kernels on Intel CPUs only; on other CPUs with AVX-512 it runs a narrower code path (its verbose mode
names it "Intel(R) Architecture processors" on an AMD EPYC Zen 4), while oneDNN, which torch also links, picks its
kernels from the CPU's units alone. Measured on an AMD EPYC Zen 4 (AVX-512, AVX512-BF16, 2 threads) at the
encoder's shapes, interleaved: oneDNN's fp32 GEMM took 1.06x-1.67x less time than MKL's for ``x W^T + b``. With
both capped at AVX2 the two were even (0.77x-1.37x), so AVX2-only CPUs keep the BLAS.

:func:`fp32_library` says which library runs, ``"onednn"`` or ``"blas"``: by default (``"auto"``) oneDNN on non-Intel
CPUs with AVX-512 where torch was built with oneDNN; :func:`set_fp32_library` or the ``SAM2_FAST_CPU_FP32_GEMM``
environment variable (``auto``, ``onednn``, ``blas``) choose otherwise. Only eager fp32 inference without autocast
takes this path; which GEMM runs where is decided in one place, :mod:`sam2_fast.gemm.policy`.

Where gradients are needed, whatever the inference library, the products run on the extension's kernels on ATen's
fp32 brgemm (:class:`_Linear`), which sum the reduction in blocks: at or below MKL's rounding error, and over the 55
layers of a tiny 512x512 training step 1.12x less time than MKL for the products and 1.23x less for the input's
gradients (same AMD EPYC Zen 4, 2 threads).

Numerics: fp32 products accumulated in fp32, in another order than the BLAS (within the fp32 tolerance of the
parity tests); oneDNN's fp32 math mode is left at torch's default (strict fp32, no bf16 or tf32 rounding).
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch

from ..backends.precision import extension_flag

LIBRARIES = ("auto", "onednn", "blas")
ENV_VAR = "SAM2_FAST_CPU_FP32_GEMM"


def _check_library(name: str, source: str = "") -> str:
    if name not in LIBRARIES:
        raise ValueError(f"unknown CPU fp32 GEMM library {name!r}{source}: expected one of {', '.join(LIBRARIES)}")
    return name


def onednn_available() -> bool:
    """Whether torch has oneDNN here, enabled (``torch.backends.mkldnn``)."""
    return torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled


@functools.lru_cache(maxsize=None)
def _auto_prefers_onednn() -> bool:
    capabilities = torch._C._cpu._get_cpu_capability()
    intel = "intel" in str(capabilities.get("cpu_name", "")).lower()
    return bool(capabilities.get("avx512_f", False)) and not intel


# The library set through set_fp32_library; None: the environment variable's (read at each use, so that setting it
# after import takes effect).
_setting: Optional[str] = None


def set_fp32_library(name: str) -> None:
    """Choose the library of eager fp32 CPU GEMMs: ``"auto"`` (see the module's doc), ``"onednn"`` or ``"blas"``."""
    global _setting
    _setting = _check_library(name)


def get_fp32_library_setting() -> str:
    if _setting is not None:
        return _setting
    value = os.environ.get(ENV_VAR, "").strip() or "auto"  # unset or empty: auto
    return _check_library(value, f" in the environment variable {ENV_VAR}")


def fp32_library() -> str:
    """The library eager fp32 CPU GEMMs run on with the current setting: ``"onednn"`` or ``"blas"``."""
    setting = get_fp32_library_setting()
    wants_onednn = setting == "onednn" or (setting == "auto" and _auto_prefers_onednn())
    return "onednn" if wants_onednn and onednn_available() else "blas"


def _product(rows: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], post_op: str = "none",
             algorithm: str = "") -> torch.Tensor:
    """``rows @ weight^T + bias`` (rows: (M, K), weight: (N, K), any strides), then the post-op, on oneDNN."""
    return torch.ops.mkldnn._linear_pointwise(rows, weight, bias, post_op, [], algorithm)


class _Linear(torch.autograd.Function):
    """``x @ weight^T + bias`` over the last dimension of ``x`` where gradients are needed (the policy's
    ``training_kernels``, where :func:`brgemm_kernels`). Not on oneDNN: its fp32 products sum each output in one chain
    over the whole reduction and measured 1.6x-4x the BLAS's worst rounding error at the encoder's depths, which the
    float64 gradient comparison of tests/test_training.py notices. The product and the input's gradient come from the
    extension's ``linear`` (chains of at most 128 products, at or below the BLAS's error and faster than it), the
    weight's and bias's from one pass of ``linear_weight_grad``; a channels-first gradient (see
    :func:`_is_channels_first_map`) from ATen's GEMMs, per image."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        rows = _rows(x)
        ctx.save_for_backward(rows, weight)
        ctx.has_bias, ctx.input_shape = bias is not None, x.shape
        return _linear_product(rows, weight, bias).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        rows, weight = ctx.saved_tensors
        needs_bias = ctx.has_bias and ctx.needs_input_grad[2]
        if _is_channels_first_map(grad):
            grad_rows, grad_weight, grad_bias = _channels_first_gradients(ctx, grad, rows, weight, needs_bias)
            return grad_rows, grad_weight, grad_bias
        grad = _rows(grad)
        grad_rows = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_rows = _linear_product(grad, weight.t(), None).view(ctx.input_shape)
        if ctx.needs_input_grad[1]:
            grad_weight, grad_bias = _linear_weight_grad(grad, rows, needs_bias)
        elif needs_bias:
            grad_bias = grad.sum(0)
        return grad_rows, grad_weight, grad_bias if needs_bias else None


def _is_channels_first_map(grad: torch.Tensor) -> bool:
    """Whether ``grad`` (B, H, W, C) is the channels-last view of a contiguous (B, C, H, W) map: the gradient a 1x1
    convolution computed as a GEMM over the pixels of a channels-last map (dense.conv2d) gets from an NCHW loss.
    Its rows are not contiguous, so ``reshape`` would copy (transpose) the whole map first."""
    return (
        grad.dim() == 4
        and grad.shape[-1] > 1
        and grad.permute(0, 3, 1, 2).is_contiguous()
        and not grad.is_contiguous()
    )


def _channels_first_gradients(ctx, grad: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor, needs_bias: bool):
    """The gradients of :class:`_Linear` for a ``grad`` of which :func:`_is_channels_first_map`, per image from
    its (C, H*W) matrix as it lies in memory (ATen GEMMs read transposed operands as they are)."""
    batch, channels = grad.shape[0], grad.shape[-1]
    per_image = grad.permute(0, 3, 1, 2).reshape(batch, channels, -1)  # (B, C, H*W): a view
    images = rows.view(batch, per_image.shape[-1], rows.shape[-1])
    grad_rows = grad_weight = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_rows = rows.new_empty(images.shape)
        for image in range(batch):
            torch.mm(per_image[image].t(), weight, out=grad_rows[image])
        grad_rows = grad_rows.view(ctx.input_shape)
    if ctx.needs_input_grad[1]:
        grad_weight = per_image[0].mm(images[0])
        for image in range(1, batch):
            grad_weight.addmm_(per_image[image], images[image])
    if needs_bias:
        grad_bias = per_image.sum((0, 2))
    return grad_rows, grad_weight, grad_bias


def brgemm_kernels() -> bool:
    """Whether the extension's fp32 brgemm kernels (linear, linear_weight_grad) can run the products of training
    (the policy's ``training_kernels``); else ATen's run them."""
    return _use_brgemm_kernels and bool(extension_flag("brgemm_f32_usable"))


def _linear_product(rows: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return torch.ops.sam2_fast_ext.linear(rows, weight, bias)


def _linear_weight_grad(grad: torch.Tensor, rows: torch.Tensor, with_bias: bool):
    return torch.ops.sam2_fast_ext.linear_weight_grad(grad, rows, with_bias)


# False: the products of training on ATen (F.linear, mm and sum), e.g. to compare the two in one process.
_use_brgemm_kernels = True


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def training_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` with gradients on the extension's kernels (the policy's ``training_kernels``)."""
    return _Linear.apply(x, weight, bias)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` on oneDNN, no gradient (the policy's ``onednn_fp32``)."""
    return _product(_rows(x), weight, bias).view(*x.shape[:-1], weight.shape[0])


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``F.gelu(F.linear(x, weight, bias))`` (exact, erf GELU) with the GELU as the GEMM's post-op, applied to the
    fp32 accumulator; no gradient."""
    return _product(_rows(x), weight, bias, "gelu", "none").view(*x.shape[:-1], weight.shape[0])


def linear_add(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
               residual: torch.Tensor) -> torch.Tensor:
    """``residual + F.linear(x, weight, bias)``, the residual added by the GEMM's binary post-op as the reference
    adds it (after the bias); no gradient. ``residual`` is not changed."""
    rows = _rows(x)
    other = residual.reshape(rows.shape[0], weight.shape[0]).contiguous()  # a view where residual is contiguous
    out = torch.ops.mkldnn._linear_pointwise.binary(rows, other, weight, bias, "add")
    return out.view(*x.shape[:-1], weight.shape[0])
