"""What a benchmark run covers, and the defaults per device. Shared by ``pytest bench/`` and ``bench.report``.

Implementations are named ``<base>``, ``<base>+compile`` or ``<base>+capture``: ``reference`` is the `sam2`
package's encoder; ``torch``, ``extension``, ``triton`` are sam2_fast with that backend for every op; ``auto`` is
sam2_fast with the op layer's per-op choice, listed only where it differs from every single backend (on CUDA: Triton
kernels for the ops it has, the extension or torch for the rest). ``+compile`` runs it under ``torch.compile``,
``+capture`` through ``sam2_fast.capture_cuda_graphs`` (sam2_fast only, CUDA only: elsewhere it runs eagerly).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch

import sam2_fast
from sam2_fast import ops

DTYPES = ("fp32", "bf16-autocast", "bf16")
SIZES = ("tiny", "small", "base_plus", "large")
BACKENDS = ops.BACKENDS
BASES = ("reference",) + BACKENDS + ("auto",)
COMPILE_SUFFIX = "+compile"
CAPTURE_SUFFIX = "+capture"
IMPL_NAMES = tuple(
    f"{base}{suffix}" for base in BASES for suffix in ("", COMPILE_SUFFIX, CAPTURE_SUFFIX)
    if not (base == "reference" and suffix == CAPTURE_SUFFIX)
)
FULL_ENV_VAR = "SAM2_FAST_BENCH_FULL"


@dataclasses.dataclass(frozen=True)
class Impl:
    """One implementation: ``reference`` or a sam2_fast backend, eager, under ``torch.compile`` or graph-captured."""

    name: str

    def __post_init__(self):
        if self.name not in IMPL_NAMES:
            raise ValueError(f"unknown implementation {self.name!r}: expected one of {', '.join(IMPL_NAMES)}")

    @property
    def compiled(self) -> bool:
        return self.name.endswith(COMPILE_SUFFIX)

    @property
    def captured(self) -> bool:
        return self.name.endswith(CAPTURE_SUFFIX)

    @property
    def suffix(self) -> str:
        return COMPILE_SUFFIX if self.compiled else CAPTURE_SUFFIX if self.captured else ""

    @property
    def base(self) -> str:
        return self.name[: len(self.name) - len(self.suffix)]

    @property
    def is_reference(self) -> bool:
        return self.base == "reference"

    @property
    def backend(self) -> Optional[str]:
        """The sam2_fast backend to run under (``"auto"`` included), None for the reference."""
        return None if self.is_reference else self.base

    def with_base(self, base: str) -> "Impl":
        return Impl(base + self.suffix)


def auto_resolution(device_type: str) -> Dict[str, str]:
    """The backend each op resolves to under ``auto`` on ``device_type``."""
    with sam2_fast.use_backend("auto"):
        return ops.active_backends(device_type)


def encoder_bases(device_type: str) -> List[str]:
    """``reference`` plus every sam2_fast backend that can run the whole encoder on ``device_type``."""
    bases = ["reference"] + [backend for backend in BACKENDS if ops.runs_whole_encoder(backend, device_type)]
    resolved = set(auto_resolution(device_type).values())
    if not (len(resolved) == 1 and resolved <= set(bases)):
        bases.append("auto")
    return bases


def op_backends(op: str, device_type: str) -> List[str]:
    """The sam2_fast backends that can run ``op`` on ``device_type``."""
    status = sam2_fast.backend_status(device_type)
    return [backend for backend in BACKENDS if status[backend][op] == "available"]


def encoder_impls(requested: Optional[Sequence[str]], device_type: str) -> List[Impl]:
    """The encoder implementations of a run: ``requested`` names that run the encoder here (all if None)."""
    bases = encoder_bases(device_type)
    if requested is None:
        # CUDA graphs need CUDA: elsewhere a captured encoder is the eager one.
        return [Impl(name) for name in IMPL_NAMES
                if Impl(name).base in bases and (device_type == "cuda" or not Impl(name).captured)]
    # Asked for by name, ``auto`` runs even where it resolves to one backend that is also in the run.
    return [Impl(name) for name in requested if Impl(name).base in bases or Impl(name).base == "auto"]


def op_impls(op: str, requested: Optional[Sequence[str]], device_type: str) -> List[Impl]:
    """The implementations of ``op`` in a run: ``auto`` stands for the backend it resolves to, and backends that
    cannot run the whole encoder still get op rows when they run this op."""
    available = set(op_backends(op, device_type))
    names = requested if requested is not None else IMPL_NAMES
    impls: List[Impl] = []
    for name in names:
        impl = Impl(name)
        if impl.captured:  # graph capture is of the whole encoder
            continue
        if impl.base == "auto":
            impl = impl.with_base(auto_resolution(device_type)[op])
        if (impl.is_reference or impl.base in available) and impl not in impls:
            impls.append(impl)
    return impls


def runnable_bases(device_type: str) -> List[str]:
    """Bases that run the encoder or at least one op on ``device_type``."""
    runnable = set(encoder_bases(device_type)) | {"auto"} | {b for op in ops.OPS for b in op_backends(op, device_type)}
    return [base for base in BASES if base in runnable]


def check_impls(names: Sequence[str], device_type: str) -> None:
    """Raise if a requested implementation runs neither the encoder nor any op on ``device_type``."""
    runnable = runnable_bases(device_type)
    for name in names:
        impl = Impl(name)
        if impl.base not in runnable:
            status = sam2_fast.backend_status(device_type)[impl.base]
            reasons = sorted(set(status.values()) - {"available"})
            raise ValueError(f"implementation {name!r} cannot run on {device_type}: {'; '.join(reasons)}")


@dataclasses.dataclass(frozen=True)
class Matrix:
    """The cases of a run. ``impls`` None means every implementation available on the device."""

    configs: Tuple[str, ...]
    sizes: Tuple[int, ...]
    batches: Tuple[int, ...]
    dtypes: Tuple[str, ...]
    impls: Optional[Tuple[str, ...]]


def default_matrix(device_type: str, full: bool = False) -> Matrix:
    """CPU: tiny 512 batch 1, fp32 and bf16 autocast, eager implementations (inductor compiles the encoder in
    40-140 s on 2 cores, so compiled ones are opt-in). Where the CPU lacks native bf16 the reference's bf16
    run is several times slower than its fp32 one (sam2_fast computes its bf16 GEMMs in fp32 there). CUDA: base_plus 1024,
    batch 1 and 8, bf16 autocast, all. ``full`` widens to every config and more sizes, batches, dtypes and
    implementations."""
    if device_type == "cuda":
        if full:
            return Matrix(SIZES, (512, 1024), (1, 8, 32), ("fp32", "bf16-autocast", "bf16"), None)
        return Matrix(("base_plus",), (1024,), (1, 8), ("bf16-autocast",), None)
    if full:
        return Matrix(SIZES, (256, 512, 1024), (1, 2), DTYPES, None)
    runnable = runnable_bases(device_type)
    eager = tuple(name for name in IMPL_NAMES if not Impl(name).compiled and Impl(name).base in runnable)
    return Matrix(("tiny",), (512,), (1,), ("fp32", "bf16-autocast"), eager)


def parse_list(text: str, kind=str) -> Tuple:
    """``"a,b, c"`` -> ``("a", "b", "c")`` (converted by ``kind``)."""
    return tuple(kind(item.strip()) for item in text.split(",") if item.strip())


def check_matrix(matrix: Matrix) -> Matrix:
    """Validate names and sizes with messages that say what was expected."""
    for config in matrix.configs:
        sam2_fast.get_config(config)
    for size in matrix.sizes:
        if size <= 0 or size % 32:
            raise ValueError(f"image sizes must be positive multiples of 32, got {size}")
    for batch in matrix.batches:
        if batch <= 0:
            raise ValueError(f"batch sizes must be positive, got {batch}")
    for dtype in matrix.dtypes:
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    for name in matrix.impls or ():
        Impl(name)
    return matrix


def matrix_from_env(device_type: str, environ=os.environ) -> Matrix:
    """The pytest suite's matrix: the default, widened by ``SAM2_FAST_BENCH_FULL=1``, with any of
    ``SAM2_FAST_BENCH_{CONFIGS,SIZES,BATCHES,DTYPES,IMPLS}`` (comma lists) overriding one axis."""
    matrix = default_matrix(device_type, full=environ.get(FULL_ENV_VAR) == "1")
    overrides = {}
    for field, kind in (("configs", str), ("sizes", int), ("batches", int), ("dtypes", str), ("impls", str)):
        value = environ.get(f"SAM2_FAST_BENCH_{field.upper()}")
        if value:
            overrides[field] = parse_list(value, kind)
    return check_matrix(dataclasses.replace(matrix, **overrides))


def torch_dtype(dtype: str) -> torch.dtype:
    """The dtype the ops see in a run of ``dtype``: bf16 under autocast and cast, else fp32."""
    return torch.float32 if dtype == "fp32" else torch.bfloat16
