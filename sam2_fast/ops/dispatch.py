"""Which backend runs each op: what each backend can run (probed once at import, from the specs), the setting
(:func:`set_backend`, :func:`use_backend`, ``SAM2_FAST_BACKEND``) and the resolution of an op on a device.

Resolution is plain dict logic over what was probed, so ``torch.compile`` traces it without a graph break.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import warnings
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch

from ..backends import extension as _extension
from .specs import KERNEL_SPECS, OP_SPECS

BACKENDS = ("torch", "triton", "extension")
BACKEND_ENV_VAR = "SAM2_FAST_BACKEND"
OPS = tuple(spec.name for spec in OP_SPECS)

# Preference order of ``auto`` per device type.
_AUTO_ORDER = {"cuda": ("triton", "extension", "torch"), "cpu": ("extension", "torch")}
# Where one op's measured best differs from its device's order (each spec's ``auto_order`` says why).
_AUTO_ORDER_BY_OP = {(device, spec.name): order for spec in OP_SPECS for device, order in spec.auto_order.items()}


class BackendUnavailableError(RuntimeError):
    """A backend was asked for explicitly but cannot run the op on that device."""


def _check_backend_name(name: str) -> str:
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown sam2_fast backend {name!r}: expected one of 'auto', {', '.join(map(repr, BACKENDS))}")
    return name


# The backend set through set_backend / use_backend; None: the environment variable's (read at each use, so that
# setting it after import takes effect).
_requested_backend: Optional[str] = None


def set_backend(name: str) -> None:
    """Choose the backend for every op: ``"auto"``, ``"torch"``, ``"triton"`` or ``"extension"``."""
    global _requested_backend
    _requested_backend = _check_backend_name(name)


# The environment variable's value as last read in eager code; traced code reuses it rather than reading the
# environment (None: not read yet).
_environment_backend: Optional[str] = None


def get_backend() -> str:
    """The backend asked for (set_backend's, else ``SAM2_FAST_BACKEND``'s, else ``"auto"``), not necessarily the one
    an op resolves to."""
    global _environment_backend
    if _requested_backend is not None:
        return _requested_backend
    if _environment_backend is not None and torch.compiler.is_compiling():
        return _environment_backend
    value = os.environ.get(BACKEND_ENV_VAR, "auto").strip().lower() or "auto"
    if value != "auto" and value not in BACKENDS:
        raise ValueError(f"unknown sam2_fast backend {value!r} in the environment variable {BACKEND_ENV_VAR}: "
                         f"expected one of 'auto', {', '.join(map(repr, BACKENDS))}")
    if not torch.compiler.is_compiling():
        _environment_backend = value
    return value


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run a block with another backend, e.g. ``with sam2_fast.use_backend("torch"): encoder(x)``."""
    global _requested_backend
    previous = _requested_backend
    set_backend(name)
    try:
        yield
    finally:
        _requested_backend = previous


# ----------------------------------------------------------------------------------------------------------------
# What each backend can run. Filled once, outside any traced code: resolution below is then plain dict logic that
# torch.compile can trace without a graph break. Tests replace these to play other machines.

def _probe_triton() -> Tuple[Optional[str], Dict[str, Callable]]:
    """(reason triton cannot run or None, {spec name: its launcher, ``<name>`` in ``kernels/<name>.py``}) for every
    spec with a Triton kernel, forward ops and backward kernels alike. Each launcher takes its spec's arguments."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed", {}
    launchers = {}
    try:
        for spec in (*OP_SPECS, *KERNEL_SPECS):
            if spec.triton:
                module = importlib.import_module(f"..kernels.{spec.name}", __package__)
                launchers[spec.name] = getattr(module, spec.name)
    except Exception as error:  # a broken triton install must not break the package
        return f"the Triton kernels failed to import ({type(error).__name__}: {error})", {}
    return None, launchers


def _probe_extension() -> Tuple[Optional[str], Dict[str, Callable], Tuple[str, ...], Dict[str, Tuple[str, ...]]]:
    """(reason the extension cannot run or None, {op name: op}, device types it was built for,
    {op name: device types it has a kernel for}). Read once here: asking the dispatcher while tracing would break
    the graph."""
    reason = _extension.load_error()
    if reason is not None:
        return reason, {}, (), {}
    namespace = torch.ops.sam2_fast_ext
    ops = {
        spec.name: getattr(namespace, spec.name)
        for spec in OP_SPECS if spec.extension and hasattr(namespace, spec.name)
    }
    return None, ops, _extension.device_types(), {name: _extension.kernel_device_types(name) for name in ops}


def _triton_runs_on(device_type: str) -> bool:
    if device_type == "cuda":
        return torch.cuda.is_available()
    return device_type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


_TRITON_REASON, _TRITON_LAUNCHERS = _probe_triton()
_EXTENSION_REASON, _EXTENSION_OPS, _EXTENSION_DEVICES, _EXTENSION_KERNEL_DEVICES = _probe_extension()


def _implements(backend: str, op: str, device_type: str) -> bool:
    """False only where a backend that loaded (for ``device_type``) has no kernel for ``op`` on ``device_type``:
    the op then runs on torch under that backend."""
    if backend == "triton" and _TRITON_REASON is None:
        return op in _TRITON_LAUNCHERS
    if backend == "extension" and _EXTENSION_REASON is None and device_type in _EXTENSION_DEVICES:
        return device_type in _EXTENSION_KERNEL_DEVICES.get(op, ())
    return True


def _unavailable_reason(op: str, backend: str, device_type: str) -> Optional[str]:
    """Why ``backend`` cannot run ``op`` on ``device_type``, or None if it can."""
    if backend == "torch":
        return None
    if backend == "triton":
        if _TRITON_REASON is not None:
            return _TRITON_REASON
        if not _triton_runs_on(device_type):
            return (
                f"Triton kernels run on CUDA tensors (on CPU only under TRITON_INTERPRET=1), got a {device_type} tensor"
            )
        if op not in _TRITON_LAUNCHERS:
            return f"there is no Triton kernel for {op}"
        return None
    if _EXTENSION_REASON is not None:
        return _EXTENSION_REASON
    if device_type not in _EXTENSION_DEVICES:
        return f"the C++ extension was built for {', '.join(_EXTENSION_DEVICES) or 'no device'}, not {device_type}"
    if not _implements(backend, op, device_type):
        return f"the C++ extension has no {device_type} kernel for {op}"
    return None


def runs_whole_encoder(backend: str, device_type: str) -> bool:
    """Whether ``use_backend(backend)`` runs the whole encoder on ``device_type``: every op either runs on that
    backend or, where the backend has no kernel for it, on torch."""
    _check_backend_name(backend)
    if backend == "auto":
        return True
    return all(
        not _implements(backend, op, device_type) or _unavailable_reason(op, backend, device_type) is None
        for op in OPS
    )


def _default_device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def backend_status(device_type: Optional[str] = None) -> Dict[str, Dict[str, str]]:
    """Per backend, per op: ``"available"`` or the reason it is not, on ``device_type`` (default: CUDA where
    torch sees a GPU, else the CPU)."""
    device_type = device_type or _default_device_type()
    return {
        backend: {op: _unavailable_reason(op, backend, device_type) or "available" for op in OPS}
        for backend in BACKENDS
    }


def active_backends(device_type: Optional[str] = None) -> Dict[str, str]:
    """The backend each op resolves to on ``device_type`` (default as in :func:`backend_status`) with the current
    setting."""
    device_type = device_type or _default_device_type()
    return {op: resolve_backend(op, device_type) for op in OPS}


_warned_fallbacks: set = set()


def resolve_backend(op: str, device_type: str) -> str:
    """The backend that runs ``op`` on ``device_type`` under the current setting."""
    requested = get_backend()
    if requested != "auto":
        if not _implements(requested, op, device_type):
            # An op this backend has no kernel for on this device (e.g. the sine encoding, computed once per size
            # and cached) runs on torch, so that one backend can still run the whole encoder.
            return "torch"
        reason = _unavailable_reason(op, requested, device_type)
        if reason is not None:
            raise BackendUnavailableError(f"sam2_fast backend {requested!r} cannot run {op}: {reason}")
        return requested
    preferred = _AUTO_ORDER_BY_OP.get((device_type, op)) or _AUTO_ORDER.get(device_type, ("torch",))
    for backend in preferred:
        reason = _unavailable_reason(op, backend, device_type)
        if reason is None:
            return backend
        if backend == preferred[0] and not torch.compiler.is_compiling() and (backend, reason) not in _warned_fallbacks:
            _warned_fallbacks.add((backend, reason))
            warnings.warn(f"sam2_fast: {backend} backend unavailable ({reason}); falling back", stacklevel=3)
    return "torch"
