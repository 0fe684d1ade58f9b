"""Low precision on CPUs without bf16/fp16 matrix units: when to compute a bf16/fp16 GEMM in fp32 instead.

On such CPUs (AVX2, AVX-512 without BF16) ATen's bf16/fp16 GEMMs, convolutions and SDPA run several times slower
than fp32 ones. Those GEMMs accumulate in fp32 and round the result once, so computing them in fp32 on the
low-precision-rounded operands and rounding the result gives the same numbers up to summation order, much sooner.
CPUs with AMX or AVX512-BF16 (and every GPU) keep the native path.
"""

from __future__ import annotations

from typing import Optional

import torch


def _cpu_has_native(dtype: torch.dtype) -> bool:
    probes = {
        torch.bfloat16: ("_is_avx512_bf16_supported", "_is_amx_tile_supported"),
        torch.float16: ("_is_amx_fp16_supported",),
    }[dtype]
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


CPU_NATIVE_LOW_PRECISION = {dtype: _cpu_has_native(dtype) for dtype in (torch.bfloat16, torch.float16)}


def emulated_compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> Optional[torch.dtype]:
    """The low-precision dtype of a GEMM/convolution to emulate in fp32 here, or None for the native path."""
    if x.device.type != "cpu":
        return None
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else weight.dtype
    if CPU_NATIVE_LOW_PRECISION.get(dtype, True):
        return None
    return dtype


def emulated_attention_dtype(qkv: torch.Tensor) -> Optional[torch.dtype]:
    """For the torch backend's attention: the low-precision dtype to run in fp32 (SDPA's GEMMs), or None."""
    if qkv.device.type != "cpu" or CPU_NATIVE_LOW_PRECISION.get(qkv.dtype, True):
        return None
    return qkv.dtype


def rounded_fp32(tensor: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """``tensor`` rounded to ``dtype`` and held in fp32 (None stays None)."""
    return None if tensor is None else tensor.to(dtype).float()
