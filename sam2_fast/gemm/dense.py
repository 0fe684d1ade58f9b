"""The encoder's GEMMs: linear layers (alone, with their GELU, with their residual add) and 1x1 convolutions.

These are ATen GEMMs arranged to spend fewer passes over memory than ``F.linear`` followed by separate
elementwise ops, on every device and backend:

- ``linear_add``: ``residual + linear(x)`` starts from ``residual + bias`` (one pass) and lets the GEMM accumulate
  into it (``addmm_`` with beta=1). ``residual + F.linear(x)`` instead broadcasts the bias into a fresh output, runs
  the GEMM, and adds the residual in a third pass into a second fresh buffer.
- ``linear_gelu``: the GELU runs in place on the GEMM's output when no gradient needs its input; in fp32 on a
  backend with a fused bias + GELU kernel (the CPU extension), the GEMM skips its bias and that kernel adds it.
- ``conv2d``: a 1x1, stride-1 convolution of a channels-last map is a GEMM over its pixels; it is computed as one
  and returned as a channels-last (B, C, H, W) view. In CPU training off sam2_fast.gemm.cpu_gemm's path it stays ATen's
  convolution, whose backward reads an NCHW gradient as it lies.

Rounding is the reference's wherever a low-precision dtype is involved: under autocast, and in bf16/fp16, each
GEMM's result is rounded before the residual add, as ``residual + F.linear(x)`` does; only fp32 without autocast
folds (fp32 addition in another order, within an ulp). On CPUs without bf16/fp16 units the low-precision GEMMs run
in fp32 on rounded operands (see :mod:`sam2_fast.backends.precision`).

On CPUs with bf16 units, bf16 inference GEMMs (bf16 weights, or bf16 autocast) run on oneDNN with each weight
prepacked once into its blocked bf16 layout (cached per weight, rebuilt when it changes); ``F.linear`` repacks the
weight on every call, which took 15-25% of a GEMM's time at the encoder's shapes on an AVX512-BF16 AMD EPYC. The
MLP's GELU runs as the GEMM's post-op on the fp32 accumulator, so its output is rounded to bf16 once (the reference
rounds the GEMM's output, then the GELU's).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair
from torch.utils.weak import WeakIdKeyDictionary

from . import cpu_gemm
from .. import ops
from ..backends.precision import CPU_NATIVE_LOW_PRECISION, emulated_compute_dtype, rounded_fp32


def _needs_grad(*tensors: Optional[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _in_compute_dtype(fn: Callable, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], *args):
    """``fn(x, weight, bias, *args)``, or on CPUs that lack bf16/fp16 units the same in fp32 on operands rounded to
    the low-precision dtype, with the result rounded to it once."""
    dtype = emulated_compute_dtype(x, weight)
    if dtype is None:
        return fn(x, weight, bias, *args)
    with torch.autocast("cpu", enabled=False):
        out = fn(rounded_fp32(x, dtype), rounded_fp32(weight, dtype), rounded_fp32(bias, dtype), *args)
    return out.to(dtype)


# weight -> ((version, data_ptr, dtype), the weight prepacked in bf16 for oneDNN); entries leave with their weights.
_PACKED_BF16_WEIGHTS = WeakIdKeyDictionary()


def _packs_bf16(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    """Whether ``linear(x, weight, bias)`` runs on a prepacked bf16 weight: eager CPU inference computing in bf16
    (bf16 weights, or bf16 autocast) where the CPU has bf16 units and oneDNN is enabled. Not for a weight created
    under ``torch.inference_mode``: it has no version counter, so its pack could not follow in-place updates."""
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else weight.dtype
    return (
        dtype == torch.bfloat16
        and x.device.type == "cpu"
        and CPU_NATIVE_LOW_PRECISION[torch.bfloat16]
        and not torch.compiler.is_compiling()
        and not _needs_grad(x, weight, bias)
        and type(x) is torch.Tensor
        and not weight.is_inference()
        and cpu_gemm.onednn_available()
    )


def _packed_bf16_weight(weight: torch.Tensor) -> torch.Tensor:
    """A linear weight (out, in), or a 1x1 convolution's (out, in, 1, 1), prepacked in bf16; cached on the weight
    itself, so that a convolution's is not packed again for each flattened view."""
    key = (weight._version, weight.data_ptr(), weight.dtype)
    entry = _PACKED_BF16_WEIGHTS.get(weight)
    if entry is None or entry[0] != key:
        with torch.no_grad():
            # The row-count hint does not change the layout oneDNN picks at these shapes.
            matrix = weight.detach().flatten(1).to(torch.bfloat16)
            entry = (key, torch.ops.mkldnn._reorder_linear_weight(matrix, 4096))
        _PACKED_BF16_WEIGHTS[weight] = entry
    return entry[1]


def _packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], gelu: bool) -> torch.Tensor:
    """bf16 ``linear(x)`` (``gelu(linear(x))`` with ``gelu``) on the prepacked weight, as (..., out_features)."""
    rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()
    bias = None if bias is None else bias.to(torch.bfloat16)
    post_op, algorithm = ("gelu", "none") if gelu else ("none", "")  # "none": the exact (erf) GELU
    out = torch.ops.mkldnn._linear_pointwise(rows, _packed_bf16_weight(weight), bias, post_op, [], algorithm)
    return out.view(*x.shape[:-1], out.shape[-1])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``F.linear``, with the low-precision GEMM emulated in fp32 on CPUs that lack bf16/fp16 units and on a
    prepacked weight in bf16 CPU inference where they have them."""
    if _packs_bf16(x, weight, bias):
        return _packed_linear(x, weight, bias, gelu=False)
    if cpu_gemm.applies(x, weight):
        return cpu_gemm.linear(x, weight, bias)
    return _in_compute_dtype(F.linear, x, weight, bias)


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``F.gelu(linear(x))`` (exact, erf GELU), in place on the GEMM's output when no gradient needs it.

    In fp32 where the op layer has a fused bias + GELU kernel, the GEMM leaves the bias out and that kernel adds it
    in its one pass (adding it after the GEMM rounds as adding it inside does, see adds_in_fp32). In bf16 CPU
    inference on a prepacked weight, the GELU is the GEMM's post-op."""
    if _needs_grad(x, weight, bias):
        return F.gelu(linear(x, weight, bias))
    if _packs_bf16(x, weight, bias):
        return _packed_linear(x, weight, bias, gelu=True)
    if cpu_gemm.applies(x, weight):
        return cpu_gemm.linear_gelu(x, weight, bias)
    if adds_in_fp32(x, weight) and ops.bias_gelu_is_fused(x.device.type):
        return ops.bias_gelu_(linear(x, weight, None), bias)
    return torch.ops.aten.gelu_(linear(x, weight, bias))


def adds_in_fp32(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``linear(x, weight)`` computes and returns fp32, so that adding its bias (or a residual) after the
    GEMM rounds as adding it inside the GEMM does; a low-precision result would be rounded twice."""
    return not torch.is_autocast_enabled(x.device.type) and x.dtype == weight.dtype == torch.float32


def _folds_residual(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor) -> bool:
    return (
        adds_in_fp32(x, weight)
        and residual.dtype == torch.float32
        and residual.shape[-1] == weight.shape[0]
        and residual.shape[:-1] == x.shape[:-1]
    )


def linear_add(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], residual: torch.Tensor
) -> torch.Tensor:
    """``residual + linear(x)`` as one GEMM accumulating into ``residual + bias`` (fp32); ``residual`` is not changed.

    Where autograd records it, the plain sum: the GEMM accumulating in place into a view would cost the backward a
    clone and a copy of the map (CopySlices)."""
    if _needs_grad(x, weight, bias, residual) or not _folds_residual(x, weight, residual):
        return residual + linear(x, weight, bias)
    if cpu_gemm.applies(x, weight):
        return cpu_gemm.linear_add(x, weight, bias, residual)
    if bias is None:
        out = residual.clone(memory_format=torch.contiguous_format)
    else:
        out = torch.add(residual, bias)
        if not out.is_contiguous():
            out = out.contiguous()
    out.view(-1, out.shape[-1]).addmm_(x.reshape(-1, x.shape[-1]), weight.t())
    return out


def _is_channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 4 and x.permute(0, 2, 3, 1).is_contiguous()


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride, padding) -> torch.Tensor:
    """``F.conv2d`` (zero padding, no groups or dilation); a 1x1 stride-1 convolution of a channels-last map runs as
    a GEMM over its pixels, except where CPU training would take ATen's GEMM (see below). Low-precision convolutions
    are emulated in fp32 on CPUs that lack bf16/fp16 units."""
    pointwise = weight.shape[-2:] == (1, 1) and tuple(_pair(stride)) == (1, 1)
    if pointwise and tuple(_pair(padding)) == (0, 0) and _is_channels_last(x):
        pixels = x.permute(0, 2, 3, 1)
        if x.device.type == "cpu" and _needs_grad(x, weight, bias) and not cpu_gemm.applies(pixels, weight):
            # ATen's GEMM would get an NCHW loss's gradient as non-contiguous rows and copy the whole map first; the
            # convolution reads it as it lies. Forward + backward at the tiny neck's 128x128 level on an AMD EPYC
            # Zen 4: 40.6 against 51.1 ms under bf16 autocast, 95.2 against 107.9 ms in fp32 on the BLAS.
            return _in_compute_dtype(F.conv2d, x, weight, bias, stride, padding)
        if _packs_bf16(pixels, weight, bias):
            return _packed_linear(pixels, weight, bias, gelu=False).permute(0, 3, 1, 2)
        return linear(pixels, weight.flatten(1), bias).permute(0, 3, 1, 2)
    return _in_compute_dtype(F.conv2d, x, weight, bias, stride, padding)
