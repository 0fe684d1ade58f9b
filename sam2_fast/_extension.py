"""Loading the compiled C++/CUDA extension ``sam2_fast._C`` and what it was built for.

The extension registers its ops with ``TORCH_LIBRARY`` in the ``sam2_fast_ext`` namespace. Loading it is optional:
if it is missing or broken, :func:`load_error` says why and sam2_fast runs on its other backends.
"""

from __future__ import annotations

import importlib
import os
from typing import Optional, Tuple

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
    devices = ("cpu", "cuda") if module.built_with_cuda() else ("cpu",)
    return None, devices


_LOAD_ERROR, _DEVICE_TYPES = _load()


def load_error() -> Optional[str]:
    """Why the extension is unavailable, or None when it is loaded."""
    return _LOAD_ERROR


def device_types() -> Tuple[str, ...]:
    """The device types the loaded extension has kernels for."""
    return _DEVICE_TYPES
