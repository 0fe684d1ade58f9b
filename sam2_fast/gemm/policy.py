"""The one place that decides where an encoder GEMM (a linear layer, a 1x1 convolution as a GEMM) runs.

:func:`choose` maps the facts of one call (:class:`GemmFacts`) to a :class:`GemmPath`; :func:`facts` reads them
from the operands and the settings; :mod:`sam2_fast.gemm.dense` runs the path. Rows are tried top to bottom, the
first that matches decides:

====  =====================================  ===================================================================
row   when                                   path
====  =====================================  ===================================================================
1     not on the CPU                         ``aten``: ``F.linear`` (cuBLAS, or what the compiler emits)
2     the backend asked for is ``torch``     ``aten``: plain PyTorch, the reference's own GEMMs and numerics
3     bf16/fp16 compute (a bf16/fp16 weight  ``emulated``: the GEMM in fp32 on operands rounded to that dtype,
      or autocast) on a CPU without units   the result rounded once (ATen's own is several times slower there)
      for that dtype
4     traced (``torch.compile``,             ``aten``: the compiler lowers ``F.linear`` itself
      ``torch.export``) or a tensor subclass
5     bf16 compute, no gradient, oneDNN,     ``packed_bf16``: oneDNN on the weight prepacked once in its blocked
      a weight with a version counter        bf16 layout (cached per weight), the GELU as its post-op
6     fp32 (no autocast) with gradients      ``training_kernels``: the extension's fp32 brgemm kernels (the
      and the extension's brgemm works      product, the input's gradient, the weight's and bias's gradients)
7     fp32 (no autocast), no gradient, and   ``onednn_fp32``: oneDNN's fp32 GEMM, the bias and GELU or residual
      oneDNN the fp32 inference library      as its post-ops
8     anything else                          ``aten``
====  =====================================  ===================================================================

Row 6 does not depend on the inference library (row 7's ``SAM2_FAST_CPU_FP32_GEMM``): training computes the same
numbers on every CPU whose ATen has the fp32 brgemm, Intel or AMD. Why those kernels: oneDNN's fp32 products sum
each output in one chain over the whole reduction (1.6x-4x the BLAS's worst rounding at the encoder's depths); the
kernels sum in blocks, at or below the BLAS's error, and ran faster than it on an AMD EPYC Zen 4
(:mod:`sam2_fast.gemm.cpu_gemm`). ``tests/test_gemm_policy.py`` walks this table.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Optional

import torch

from . import cpu_gemm
from .. import ops
from ..backends.precision import CPU_NATIVE_LOW_PRECISION

LOW_PRECISION = (torch.bfloat16, torch.float16)


class GemmPath(str, enum.Enum):
    ATEN = "aten"
    EMULATED = "emulated"
    PACKED_BF16 = "packed_bf16"
    TRAINING_KERNELS = "training_kernels"
    ONEDNN_FP32 = "onednn_fp32"


@dataclasses.dataclass(frozen=True)
class GemmFacts:
    """What decides a GEMM's path (see the table in the module's doc)."""

    device_type: str
    compute_dtype: torch.dtype  # autocast's dtype where autocast is on for the device, else the weight's
    autocast: bool
    operands_fp32: bool  # input and weight both fp32
    needs_grad: bool
    traced: bool  # torch.compile / torch.export is tracing
    plain_tensors: bool  # no tensor subclass (fake, functional, distributed tensors keep F.linear)
    backend: str  # the backend asked for (sam2_fast.get_backend())
    native_low_precision: bool  # the CPU has units for compute_dtype (where it is bf16/fp16)
    onednn: bool  # torch has oneDNN, enabled
    versioned_weight: bool  # the weight has a version counter (not made under inference_mode)
    brgemm_kernels: bool  # the extension's fp32 brgemm kernels can run
    fp32_library: str  # "onednn" or "blas": the fp32 inference library (sam2_fast.cpu_fp32_gemm())


def choose(f: GemmFacts) -> GemmPath:
    """The path of one GEMM: the first row of the module's table that matches."""
    if f.device_type != "cpu":  # 1
        return GemmPath.ATEN
    if f.backend == "torch":  # 2
        return GemmPath.ATEN
    if f.compute_dtype in LOW_PRECISION and not f.native_low_precision:  # 3
        return GemmPath.EMULATED
    if f.traced or not f.plain_tensors:  # 4
        return GemmPath.ATEN
    if f.compute_dtype == torch.bfloat16 and not f.needs_grad and f.onednn and f.versioned_weight:  # 5
        return GemmPath.PACKED_BF16
    fp32 = f.operands_fp32 and not f.autocast
    if fp32 and f.needs_grad and f.brgemm_kernels:  # 6
        return GemmPath.TRAINING_KERNELS
    if fp32 and not f.needs_grad and f.fp32_library == "onednn":  # 7
        return GemmPath.ONEDNN_FP32
    return GemmPath.ATEN  # 8


# Tensors oneDNN's ops take as they are.
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def needs_grad(*tensors: Optional[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def facts(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> GemmFacts:
    """The facts of ``linear(x, weight, bias)`` now (autocast, grad mode, tracing and the settings included)."""
    device_type = x.device.type
    autocast = torch.is_autocast_enabled(device_type) if device_type in ("cpu", "cuda") else False
    compute_dtype = torch.get_autocast_dtype(device_type) if autocast else weight.dtype
    traced = torch.compiler.is_compiling()
    plain_tensors = type(x) in _PLAIN_TYPES and type(weight) in _PLAIN_TYPES
    # What only rows 5-7 read is not looked up where they cannot be reached: off the CPU, or in a trace (asking the
    # extension there would break the graph).
    eager_cpu = device_type == "cpu" and not traced and plain_tensors
    return GemmFacts(
        device_type=device_type,
        compute_dtype=compute_dtype,
        autocast=autocast,
        operands_fp32=x.dtype == weight.dtype == torch.float32,
        needs_grad=needs_grad(x, weight, bias),
        traced=traced,
        plain_tensors=plain_tensors,
        backend=ops.get_backend(),
        native_low_precision=CPU_NATIVE_LOW_PRECISION.get(compute_dtype, True),
        onednn=eager_cpu and cpu_gemm.onednn_available(),
        versioned_weight=eager_cpu and not weight.is_inference(),
        brgemm_kernels=eager_cpu and cpu_gemm.brgemm_kernels(),
        fp32_library=cpu_gemm.fp32_library() if eager_cpu else "blas",
    )


def path(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> GemmPath:
    """:func:`choose` for ``linear(x, weight, bias)`` now."""
    return choose(facts(x, weight, bias))
