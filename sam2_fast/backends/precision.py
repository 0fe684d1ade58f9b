"""Low precision on CPUs: which bf16/fp16 units this CPU has (the GEMM policy, :mod:`sam2_fast.gemm.policy`, emulates
bf16/fp16 GEMMs in fp32 where it has none; the torch backend's attention, in :mod:`.torch_ops`, does the same).

On CPUs without bf16/fp16 matrix units (AVX2, AVX-512 without BF16) ATen's bf16/fp16 GEMMs, convolutions and SDPA
run several times slower than fp32 ones. Those GEMMs accumulate in fp32 and round the result once, so computing them
in fp32 on the low-precision-rounded operands and rounding the result gives the same numbers up to summation order,
much sooner. CPUs with AMX or AVX512-BF16 (and every GPU) keep the native path, and there the C++ extension runs bf16
attention on the matrix units too (see :func:`extension_bf16_attention`).
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

# The units that decide the CPU's low-precision paths, as torch's cpuinfo names them, best first.
CPU_UNITS = {"amx_bf16": "AMX", "avx512_bf16": "AVX512-BF16", "avx512_f": "AVX512", "avx2": "AVX2"}


def cpu_units() -> Dict[str, bool]:
    """Which of :data:`CPU_UNITS` this CPU has (detected at run time by torch's cpuinfo)."""
    capabilities = torch._C._cpu._get_cpu_capability()
    return {name: bool(capabilities.get(name, False)) for name in CPU_UNITS}


def cpu_units_label() -> str:
    """The best of :data:`CPU_UNITS` this CPU has, e.g. ``"AVX512-BF16"``; ``"no AVX2"`` without any."""
    units = cpu_units()
    return next((label for name, label in CPU_UNITS.items() if units[name]), "no AVX2")


def extension_flag(name: str) -> Optional[bool]:
    """``sam2_fast._C.<name>()``, one of the extension's yes/no queries; None when the extension is not loaded."""
    from . import extension as _extension

    if _extension.load_error() is not None:
        return None
    from .. import _C

    return bool(getattr(_C, name)())


def extension_bf16_attention() -> Optional[bool]:
    """Whether the C++ extension's CPU attention runs bf16 on the matrix units (AMX or AVX512-BF16, through ATen's
    brgemm) here, rather than on its fp32 core; None when the extension is not loaded."""
    return extension_flag("bf16_matrix_attention")


def brgemm_attention_backward() -> Optional[bool]:
    """Whether the C++ extension's CPU attention backward (fp32, bf16, fp16) runs its products on ATen's brgemm
    (oneDNN's micro-kernels) rather than on the BLAS; None when the extension is not loaded."""
    return extension_flag("brgemm_attention_backward")


def _cpu_has_native(dtype: torch.dtype) -> bool:
    """Whether this CPU has ``dtype``'s matrix units and ATen runs its AVX-512 kernels: capping ATen at AVX2
    (``ATEN_CPU_CAPABILITY=avx2``, with ``ONEDNN_MAX_CPU_ISA=AVX2`` for oneDNN, as CI's AVX2 step does) makes an
    AVX-512 CPU take the paths of an AVX2 one, as the extension's bf16 attention does; oneDNN's bf16 weight packing
    raises under that cap."""
    probes = {
        torch.bfloat16: ("_is_avx512_bf16_supported", "_is_amx_tile_supported"),
        torch.float16: ("_is_amx_fp16_supported",),
    }[dtype]
    has_units = any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)
    return has_units and torch.backends.cpu.get_cpu_capability() == "AVX512"


CPU_NATIVE_LOW_PRECISION = {dtype: _cpu_has_native(dtype) for dtype in (torch.bfloat16, torch.float16)}


def rounded_fp32(tensor: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """``tensor`` rounded to ``dtype`` and held in fp32 (None stays None)."""
    return None if tensor is None else tensor.to(dtype).float()
