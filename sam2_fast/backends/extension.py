"""Loading the compiled C++/CUDA extension ``sam2_fast._C`` and what it was built for.

The extension registers its ops with ``TORCH_LIBRARY`` in the ``sam2_fast_ext`` namespace (schemas in
csrc/ops.cpp, kernels in csrc/cpu/<family>/<op>.cpp and csrc/cuda/<op>.cu). Loading it is optional: if it is
missing or broken, :func:`load_error` says why and sam2_fast runs on its other backends. The op layer registers each
op's fake (meta) implementation and autograd formula from its spec (:mod:`sam2_fast.ops.specs`), so that
``torch.compile(fullgraph=True)`` and ``torch.export`` can trace through it.
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
    return None, ("cpu", "cuda") if module.built_with_cuda() else ("cpu",)


_LOAD_ERROR, _DEVICE_TYPES = _load()


def load_error() -> Optional[str]:
    """Why the extension is unavailable, or None when it is loaded."""
    return _LOAD_ERROR


def device_types() -> Tuple[str, ...]:
    """The device types the loaded extension was built for."""
    return _DEVICE_TYPES


_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


def kernel_device_types(op: str) -> Tuple[str, ...]:
    """The device types for which the loaded extension registered a kernel of ``op`` (``sam2_fast_ext::<op>``).

    A CUDA build need not have a CUDA kernel for every op (attention on CUDA is the Triton backend's job)."""
    if _LOAD_ERROR is not None:
        return ()
    name = f"sam2_fast_ext::{op}"
    return tuple(
        device for device in _DEVICE_TYPES
        if torch._C._dispatch_has_kernel_for_dispatch_key(name, _DISPATCH_KEYS[device])
    )
