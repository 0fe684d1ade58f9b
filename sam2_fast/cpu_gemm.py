"""fp32 GEMMs of the encoder's linear layers on oneDNN, on CPUs where its kernels beat the BLAS torch links.

ATen computes fp32 ``F.linear`` and its gradients with the BLAS torch links (MKL in the x86-64 wheels). MKL takes
its AVX-512 kernels on Intel CPUs only; on other CPUs with AVX-512 it runs a narrower code path (its verbose mode
names it "Intel(R) Architecture processors" on an AMD EPYC Zen 4), while oneDNN, which torch also links, picks its
kernels from the CPU's units alone. Measured on an AMD EPYC Zen 4 (AVX-512, AVX512-BF16, 2 threads) at the
encoder's shapes, interleaved: oneDNN's fp32 GEMM took 1.06x-1.67x less time than MKL's for ``x W^T + b``. With
both capped at AVX2 the two were even (0.77x-1.37x), so AVX2-only CPUs keep the BLAS.

:func:`fp32_library` says which library runs, ``"onednn"`` or ``"blas"``: by default (``"auto"``) oneDNN on non-Intel
CPUs with AVX-512 where torch was built with oneDNN; :func:`set_fp32_library` or the ``SAM2_FAST_CPU_FP32_GEMM``
environment variable (``auto``, ``onednn``, ``blas``) choose otherwise. Only eager fp32 without autocast takes this
path; under ``torch.compile`` and ``torch.export`` the GEMMs stay ``F.linear``, which the compiler lowers itself.

Where gradients are needed the products stay on the BLAS (see :class:`_Linear`); only the weight's and bias's
gradients change, to one extension pass on ATen's fp32 brgemm that also took less time than the BLAS (1.0x-1.3x).

Numerics: fp32 products accumulated in fp32, in another order than the BLAS (within the fp32 tolerance of the
parity tests); oneDNN's fp32 math mode is left at torch's default (strict fp32, no bf16 or tf32 rounding).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F

from .precision import extension_flag

LIBRARIES = ("auto", "onednn", "blas")
ENV_VAR = "SAM2_FAST_CPU_FP32_GEMM"


def _check_library(name: str, source: str = "") -> str:
    if name not in LIBRARIES:
        raise ValueError(f"unknown CPU fp32 GEMM library {name!r}{source}: expected one of {', '.join(LIBRARIES)}")
    return name


def onednn_available() -> bool:
    """Whether torch has oneDNN here, enabled (``torch.backends.mkldnn``)."""
    return torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled


def _auto_prefers_onednn() -> bool:
    capabilities = torch._C._cpu._get_cpu_capability()
    intel = "intel" in str(capabilities.get("cpu_name", "")).lower()
    return bool(capabilities.get("avx512_f", False)) and not intel


_setting = _check_library(os.environ.get(ENV_VAR, "auto"), f" in the environment variable {ENV_VAR}")
_AUTO_ONEDNN = _auto_prefers_onednn()


def set_fp32_library(name: str) -> None:
    """Choose the library of eager fp32 CPU GEMMs: ``"auto"`` (see the module's doc), ``"onednn"`` or ``"blas"``."""
    global _setting
    _setting = _check_library(name)


def get_fp32_library_setting() -> str:
    return _setting


def fp32_library() -> str:
    """The library eager fp32 CPU GEMMs run on with the current setting: ``"onednn"`` or ``"blas"``."""
    wants_onednn = _setting == "onednn" or (_setting == "auto" and _AUTO_ONEDNN)
    return "onednn" if wants_onednn and onednn_available() else "blas"


# Tensors oneDNN's ops take as they are; subclasses (fake, functional, distributed tensors) keep F.linear.
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``linear(x, weight)`` runs on oneDNN: eager fp32 on the CPU, no autocast, oneDNN chosen."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and weight.device.type == "cpu"
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
        and type(x) in _PLAIN_TYPES
        and type(weight) in _PLAIN_TYPES
        and fp32_library() == "onednn"
    )


def _product(rows: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], post_op: str = "none",
             algorithm: str = "") -> torch.Tensor:
    """``rows @ weight^T + bias`` (rows: (M, K), weight: (N, K), any strides), then the post-op, on oneDNN."""
    return torch.ops.mkldnn._linear_pointwise(rows, weight, bias, post_op, [], algorithm)


class _Linear(torch.autograd.Function):
    """``rows @ weight^T + bias`` where gradients are needed: the product and the input's gradient on the BLAS (as
    ATen's linear; oneDNN's fp32 products measured 1.6x-4x the BLAS's worst rounding error at the encoder's depths,
    which the float64 gradient comparison of tests/test_training.py notices), the weight's and bias's in one pass of
    the extension's ``linear_weight_grad`` on ATen's fp32 brgemm where it works (else ATen)."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        ctx.save_for_backward(rows, weight)
        ctx.has_bias = bias is not None
        return F.linear(rows, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        rows, weight = ctx.saved_tensors
        grad_rows = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_rows = grad.mm(weight)
        needs_bias = ctx.has_bias and ctx.needs_input_grad[2]
        if ctx.needs_input_grad[1] and _weight_grad_kernel():
            grad_weight, grad_bias = _linear_weight_grad(grad, rows, needs_bias)
            return grad_rows, grad_weight, grad_bias if needs_bias else None
        if ctx.needs_input_grad[1]:
            grad_weight = grad.t().mm(rows)
        if needs_bias:
            grad_bias = grad.sum(0)
        return grad_rows, grad_weight, grad_bias


def _weight_grad_kernel() -> bool:
    """Whether the extension's linear_weight_grad (fp32 brgemm) computes the weight and bias gradients; else ATen."""
    return _use_weight_grad_kernel and bool(extension_flag("brgemm_f32_usable"))


def _linear_weight_grad(grad: torch.Tensor, rows: torch.Tensor, with_bias: bool):
    return torch.ops.sam2_fast_ext.linear_weight_grad(grad, rows, with_bias)


# False: the weight and bias gradients on ATen (mm and sum), e.g. to compare the two in one process.
_use_weight_grad_kernel = True


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` (for where :func:`applies`): on oneDNN without gradients, else :class:`_Linear`."""
    rows = _rows(x)
    needs_grad = x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    if torch.is_grad_enabled() and needs_grad:
        out = _Linear.apply(rows, weight, bias)
    else:
        out = _product(rows, weight, bias)
    return out.view(*x.shape[:-1], weight.shape[0])


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
