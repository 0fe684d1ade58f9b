"""The encoder's GEMMs: linear layers (alone, with their GELU, with their residual add) and 1x1 convolutions.

These are ATen GEMMs arranged to spend fewer passes over memory than ``F.linear`` followed by separate
elementwise ops, on every device and backend:

- ``linear_add``: ``residual + linear(x)`` starts from ``residual + bias`` (one pass) and lets the GEMM accumulate
  into it (``addmm_`` with beta=1). ``residual + F.linear(x)`` instead broadcasts the bias into a fresh output, runs
  the GEMM, and adds the residual in a third pass into a second fresh buffer.
- ``linear_gelu``: the GELU runs in place on the GEMM's output when no gradient needs its input; in fp32 on a
  backend with a fused bias + GELU kernel (the CPU extension), the GEMM skips its bias and that kernel adds it.
- ``conv2d``: a 1x1, stride-1 convolution of a channels-last map is a GEMM over its pixels; it is computed as one
  and returned as a channels-last (B, C, H, W) view. In CPU training on ATen's GEMM it stays ATen's convolution,
  whose backward reads an NCHW gradient as it lies.

Which GEMM runs (ATen's, oneDNN's fp32 or prepacked bf16, the extension's training kernels, fp32 emulation of
bf16/fp16) is decided in one place, :mod:`sam2_fast.gemm.policy`; this module runs the path it returns.

Rounding is the reference's wherever a low-precision dtype is involved: under autocast, and in bf16/fp16, each
GEMM's result is rounded before the residual add, as ``residual + F.linear(x)`` does; only fp32 without autocast
folds (fp32 addition in another order, within an ulp). On CPUs without bf16/fp16 units the low-precision GEMMs run
in fp32 on rounded operands (the policy's ``emulated`` path).

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
from .policy import GemmPath, needs_grad as _needs_grad, path as _path
from .. import ops
from ..backends.precision import rounded_fp32


def _emulated(fn: Callable, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], *args):
    """``fn(x, weight, bias, *args)`` computing in bf16/fp16 (the weight's dtype, or autocast's) as the policy's
    ``emulated`` path: in fp32 on operands rounded to that dtype, the result rounded to it once."""
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else weight.dtype
    with torch.autocast("cpu", enabled=False):
        out = fn(rounded_fp32(x, dtype), rounded_fp32(weight, dtype), rounded_fp32(bias, dtype), *args)
    return out.to(dtype)


# weight -> ((version, data_ptr, dtype), the weight prepacked in bf16 for oneDNN); entries leave with their weights.
_PACKED_BF16_WEIGHTS = WeakIdKeyDictionary()


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
    """``F.linear``, on the path :mod:`sam2_fast.gemm.policy` chooses."""
    return _linear_on(_path(x, weight, bias), x, weight, bias)


def _linear_on(path: GemmPath, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    if path is GemmPath.PACKED_BF16:
        return _packed_linear(x, weight, bias, gelu=False)
    if path is GemmPath.ONEDNN_FP32:
        return cpu_gemm.linear(x, weight, bias)
    if path is GemmPath.TRAINING_KERNELS:
        return cpu_gemm.training_linear(x, weight, bias)
    if path is GemmPath.EMULATED:
        return _emulated(F.linear, x, weight, bias)
    return F.linear(x, weight, bias)


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``F.gelu(linear(x))`` (exact, erf GELU), in place on the GEMM's output when no gradient needs it.

    In fp32 where the op layer has a fused bias + GELU kernel, the GEMM leaves the bias out and that kernel adds it
    in its one pass (adding it after the GEMM rounds as adding it inside does, see adds_in_fp32). In bf16 CPU
    inference on a prepacked weight, the GELU is the GEMM's post-op."""
    if _needs_grad(x, weight, bias):
        return F.gelu(linear(x, weight, bias))
    path = _path(x, weight, bias)
    if path is GemmPath.PACKED_BF16:
        return _packed_linear(x, weight, bias, gelu=True)
    if path is GemmPath.ONEDNN_FP32:
        return cpu_gemm.linear_gelu(x, weight, bias)
    if adds_in_fp32(x, weight) and ops.bias_gelu_is_fused(x.device.type):
        return ops.bias_gelu_(_linear_on(path, x, weight, None), bias)
    return torch.ops.aten.gelu_(_linear_on(path, x, weight, bias))


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
    if _path(x, weight, bias) is GemmPath.ONEDNN_FP32:
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
    a GEMM over its pixels on the policy's path, except where CPU training would take ATen's GEMM (see below).
    Other convolutions run as ``F.conv2d``, emulated on the policy's ``emulated`` path."""
    pointwise = weight.shape[-2:] == (1, 1) and tuple(_pair(stride)) == (1, 1)
    path = _path(x, weight, bias)
    if pointwise and tuple(_pair(padding)) == (0, 0) and _is_channels_last(x):
        pixels = x.permute(0, 2, 3, 1)
        ours = path in (GemmPath.PACKED_BF16, GemmPath.ONEDNN_FP32, GemmPath.TRAINING_KERNELS)
        if x.device.type != "cpu" or not _needs_grad(x, weight, bias) or ours:
            return _linear_on(path, pixels, weight.flatten(1), bias).permute(0, 3, 1, 2)
        # In CPU training on ATen's GEMM (or the emulated one), the GEMM would get an NCHW loss's gradient as
        # non-contiguous rows and copy the whole map first; the convolution reads it as it lies. Forward + backward
        # at the tiny neck's 128x128 level on an AMD EPYC Zen 4: 40.6 against 51.1 ms under bf16 autocast, 95.2
        # against 107.9 ms in fp32 on the BLAS.
    if path is GemmPath.EMULATED:
        return _emulated(F.conv2d, x, weight, bias, stride, padding)
    return F.conv2d(x, weight, bias, stride, padding)
