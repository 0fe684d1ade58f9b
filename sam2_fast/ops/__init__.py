"""The op layer: each hot op of the encoder declared once, and the one place that chooses a backend.

Backends:
- ``torch``: the plain-PyTorch implementations in :mod:`sam2_fast.backends.torch_ops`, always available. The model calls
  them directly (not through a custom op), so ``torch.compile`` sees and fuses them and autograd differentiates them.
- ``triton``: fused Triton kernels from :mod:`sam2_fast.kernels`, on CUDA tensors (and on CPU tensors only under
  ``TRITON_INTERPRET=1``, the Triton interpreter, for testing).
- ``extension``: the compiled C++/CUDA extension ``sam2_fast._C`` (ops in the ``sam2_fast_ext`` namespace).

How the fast backends reach a graph (``torch.compile``, ``torch.export``, AOTInductor) and autograd:

- ``extension``: its ``sam2_fast_ext`` ops themselves, with fake implementations (``_extension``) and autograd
  formulas registered here, so a traced graph calls the compiled ops (an AOTInductor package on CPU runs them with
  no Python in between).
- ``triton`` on CUDA: ``torch.library.triton_op`` ops (``sam2_fast::triton_*``) whose launchers wrap their kernels
  with ``wrap_triton``, so inductor sees the kernels, compiles them into its output (and into AOTInductor packages)
  and can CUDA-graph the whole forward.
- ``triton`` under the Triton interpreter (CPU tensors, for testing): ``torch.library`` custom ops in the
  ``sam2_fast`` namespace, opaque to the compiler (an interpreted kernel cannot run on the compiler's fake tensors).

Gradients flow through every backend. Where a backend has a backward kernel for an op (the extension's CPU attention
and max-pool backward; the FPN fusion's exact formula on every backend), its autograd formula runs it; elsewhere the
formula recomputes the op's torch implementation and differentiates that (correct but slower, with a one-time
warning). :func:`active_backward` says which each op takes. Eager inference with no gradient to record calls the
kernels directly.

Choosing: ``SAM2_FAST_BACKEND=auto|torch|triton|extension`` (read at import), :func:`set_backend` or the
:func:`use_backend` context manager. ``auto`` takes, per op and device, the first available of
triton, extension, torch on CUDA (for global attention: torch, whose flash SDPA measured faster) and extension,
torch on CPU, with one warning when it has to fall back. Asking for a backend that cannot run raises
:class:`BackendUnavailableError` naming what is missing; an op that an asked-for backend has no kernel for on the
device (the sine encoding and the bias + GELU on Triton, attention and the bias + GELU in the extension's CUDA
build) runs on torch.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import warnings
from typing import Callable, Dict, Iterator, NamedTuple, Optional, Tuple

import torch

from ..backends import extension as _extension, shapes as op_shapes, torch_ops
from ..backends.precision import emulated_attention_dtype, rounded_fp32

BACKENDS = ("torch", "triton", "extension")
BACKEND_ENV_VAR = "SAM2_FAST_BACKEND"
OPS = (
    "window_attention", "global_attention", "maxpool2x2", "fpn_upsample_add", "bias_gelu_", "sine_position_encoding",
)

# Preference order of ``auto`` per device type.
_AUTO_ORDER = {"cuda": ("triton", "extension", "torch"), "cpu": ("extension", "torch")}
# Where one op's measured best differs from its device's order. Global attention on CUDA: torch's flash SDPA ran
# 1.5-1.7x faster than the tuned Triton kernel at every config's global blocks at 1024x1024 on an H200 (bf16, batch
# 1 and 8; ``python -m bench.tune_attention``), so ``auto`` takes torch there; the kernel stays selectable.
# bias_gelu_ has CPU kernels only (on CUDA, torch's GELU is already one memory-bound pass), so it skips the fallback
# warning there.
_AUTO_ORDER_BY_OP = {("cuda", "global_attention"): ("torch",), ("cuda", "bias_gelu_"): ("torch",)}


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
# torch.compile can trace without a graph break.

def _probe_triton() -> Tuple[Optional[str], Dict[str, Callable], Dict[str, Callable]]:
    """(reason triton cannot run or None, {op name: launcher}, {op name: launcher of its backward})."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed", {}, {}
    try:
        from ..kernels.attention_backward import attention_backward
        from ..kernels.fpn_upsample_add import fpn_upsample_add
        from ..kernels.fpn_upsample_add_backward import fpn_upsample_add_backward
        from ..kernels.global_attention import global_attention
        from ..kernels.maxpool2x2 import maxpool2x2
        from ..kernels.maxpool2x2_backward import maxpool2x2_backward
        from ..kernels.window_attention import window_attention
    except Exception as error:  # a broken triton install must not break the package
        return f"the Triton kernels failed to import ({type(error).__name__}: {error})", {}, {}
    # Each launcher takes the same arguments as the op's torch implementation; one attention backward serves both
    # attentions (window_size 0: global).
    forward = {"window_attention": window_attention, "global_attention": global_attention,
               "maxpool2x2": maxpool2x2, "fpn_upsample_add": fpn_upsample_add}
    backward = {"window_attention": attention_backward, "global_attention": attention_backward,
                "maxpool2x2": maxpool2x2_backward, "fpn_upsample_add": fpn_upsample_add_backward}
    return None, forward, backward


def _probe_extension() -> Tuple[Optional[str], Dict[str, Callable], Tuple[str, ...], Dict[str, Tuple[str, ...]]]:
    """(reason the extension cannot run or None, {op name: op}, device types it was built for,
    {op name: device types it has a kernel for}). Read once here: asking the dispatcher while tracing would break
    the graph."""
    reason = _extension.load_error()
    if reason is not None:
        return reason, {}, (), {}
    namespace = torch.ops.sam2_fast_ext
    ops = {name: getattr(namespace, name) for name in OPS if hasattr(namespace, name)}
    return None, ops, _extension.device_types(), {name: _extension.kernel_device_types(name) for name in ops}


def _triton_runs_on(device_type: str) -> bool:
    if device_type == "cuda":
        return torch.cuda.is_available()
    return device_type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


_TRITON_REASON, _TRITON_LAUNCHERS, _TRITON_BACKWARD_LAUNCHERS = _probe_triton()
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


# ----------------------------------------------------------------------------------------------------------------
# Custom ops of the ops with a Triton kernel, the opaque form a traced or differentiated call takes where no
# triton_op can (the interpreter); ``backend`` is an argument so that the choice is fixed when a graph is traced,
# and any backend can run behind them (the tests check the registrations with the torch one).

def _fast_impl(op: str, backend: str) -> Callable:
    if backend == "triton":
        return _TRITON_LAUNCHERS[op]
    if backend == "extension":
        return _EXTENSION_OPS[op]
    if backend == "torch":
        return getattr(torch_ops, op)
    raise ValueError(f"unknown sam2_fast backend {backend!r}")


@torch.library.custom_op("sam2_fast::window_attention", mutates_args=())
def _window_attention_op(
    qkv: torch.Tensor, qkv_bias: Optional[torch.Tensor], num_heads: int, window_size: int, q_pool: bool,
    add_bias: bool, backend: str,
) -> torch.Tensor:
    return _fast_impl("window_attention", backend)(qkv, qkv_bias, num_heads, window_size, q_pool, add_bias).contiguous()


@_window_attention_op.register_fake
def _(qkv, qkv_bias, num_heads, window_size, q_pool, add_bias, backend):
    return op_shapes.window_attention_output(qkv, num_heads, window_size, q_pool)


@torch.library.custom_op("sam2_fast::global_attention", mutates_args=())
def _global_attention_op(qkv: torch.Tensor, num_heads: int, q_pool: bool, backend: str) -> torch.Tensor:
    return _fast_impl("global_attention", backend)(qkv, num_heads, q_pool).contiguous()


@_global_attention_op.register_fake
def _(qkv, num_heads, q_pool, backend):
    return op_shapes.attention_output(qkv, num_heads, q_pool)


@torch.library.custom_op("sam2_fast::maxpool2x2", mutates_args=())
def _maxpool2x2_op(x: torch.Tensor, backend: str) -> torch.Tensor:
    return _fast_impl("maxpool2x2", backend)(x).contiguous()


@_maxpool2x2_op.register_fake
def _(x, backend):
    return op_shapes.maxpool2x2_output(x)


@torch.library.custom_op("sam2_fast::fpn_upsample_add", mutates_args=())
def _fpn_upsample_add_op(lateral: torch.Tensor, prev: torch.Tensor, backend: str) -> torch.Tensor:
    return _fast_impl("fpn_upsample_add", backend)(lateral, prev).contiguous()


@_fpn_upsample_add_op.register_fake
def _(lateral, prev, backend):
    return op_shapes.fpn_upsample_add_output(lateral, prev)


# ----------------------------------------------------------------------------------------------------------------
# Gradients. Per op, backend and device: a backward kernel where the backend has one, else the recompute fallback
# (the op's torch implementation rerun from the saved inputs and differentiated: correct, but it pays the forward
# again and the torch implementation's copies). ``active_backward`` shows which one each op takes.

# Per differentiable op: its torch implementation, the names of its arguments (as the fast ops take them, without
# the custom ops' trailing ``backend``) and which of them are tensors that can need a gradient.
_DIFFERENTIABLE = {
    "window_attention": (
        torch_ops.window_attention, ("qkv", "qkv_bias", "num_heads", "window_size", "q_pool", "add_bias"),
        ("qkv", "qkv_bias"),
    ),
    "global_attention": (torch_ops.global_attention, ("qkv", "num_heads", "q_pool"), ("qkv",)),
    "maxpool2x2": (torch_ops.maxpool2x2, ("x",), ("x",)),
    "fpn_upsample_add": (torch_ops.fpn_upsample_add, ("lateral", "prev"), ("lateral", "prev")),
}


class _Backward(NamedTuple):
    """A backward without recompute: ``fn(grad_output, inputs, output)`` -> one gradient (or None) per input of
    the op (without ``backend``); ``kind`` is "kernel" (a fused backward kernel) or "formula" (the exact gradient
    in a few torch ops); ``saves_output``: whether ``fn`` needs the forward's output."""

    fn: Callable
    kind: str
    saves_output: bool


def _backward_kernel(backend: str, op: str, tensor: torch.Tensor) -> Callable:
    """``op``'s backward kernel on ``backend``, with the C++ op's arguments and results: the extension's op; for
    Triton, its ``triton_op`` on CUDA (so that a compiled backward holds the kernels) or the launcher itself."""
    if backend == "extension":
        return getattr(torch.ops.sam2_fast_ext, "attention_backward" if op.endswith("attention") else f"{op}_backward")
    if tensor.device.type == "cuda" and op in _TRITON_OPS:
        return _TRITON_OPS[op + "_backward"]
    return _TRITON_BACKWARD_LAUNCHERS[op]


def _window_attention_backward(backend: str) -> Callable:
    def backward(grad_output, inputs, output):
        qkv, qkv_bias, num_heads, window_size, q_pool, add_bias = inputs
        grad_qkv, grad_bias = _backward_kernel(backend, "window_attention", qkv)(
            grad_output, qkv, qkv_bias, output, num_heads, window_size, q_pool, add_bias
        )
        return grad_qkv, None if qkv_bias is None else grad_bias, None, None, None, None

    return backward


def _global_attention_backward(backend: str) -> Callable:
    def backward(grad_output, inputs, output):
        qkv, num_heads, q_pool = inputs
        grad_qkv, _ = _backward_kernel(backend, "global_attention", qkv)(
            grad_output, qkv, None, output, num_heads, 0, q_pool, False
        )
        return grad_qkv, None, None

    return backward


def _maxpool2x2_backward(backend: str) -> Callable:
    def backward(grad_output, inputs, output):
        return (_backward_kernel(backend, "maxpool2x2", inputs[0])(grad_output, inputs[0]),)

    return backward


def _triton_fpn_upsample_add_backward(grad_output, inputs, output):
    lateral, prev = inputs
    return grad_output.to(lateral.dtype), _backward_kernel("triton", "fpn_upsample_add", prev)(grad_output, prev)


def _fpn_upsample_add_backward(grad_output, inputs, output):
    """lateral's gradient is grad_output; prev's, the 2x2 sums of it (each prev pixel fed four output pixels)."""
    lateral, prev = inputs
    batch, channels, height, width = prev.shape
    grad_prev = grad_output.reshape(batch, channels, height, 2, width, 2).sum(dim=(3, 5))
    return grad_output.to(lateral.dtype), grad_prev.to(prev.dtype)


def _backward_table() -> Dict[Tuple[str, str, str], _Backward]:
    """{(op, backend, device type): its backward without recompute}, from what loaded."""
    table = {}
    kernel_devices = {"extension": {}, "triton": {}}
    if _EXTENSION_REASON is None:
        kernel_devices["extension"] = {
            op: _extension.kernel_device_types(kernel)
            for op, kernel in (("window_attention", "attention_backward"), ("global_attention", "attention_backward"),
                               ("maxpool2x2", "maxpool2x2_backward"))
        }
    if _TRITON_REASON is None:
        triton_devices = tuple(device for device in ("cuda", "cpu") if _triton_runs_on(device))
        kernel_devices["triton"] = {op: triton_devices for op in _TRITON_BACKWARD_LAUNCHERS}
    makers = {"window_attention": _window_attention_backward, "global_attention": _global_attention_backward,
              "maxpool2x2": _maxpool2x2_backward}
    for backend, devices_by_op in kernel_devices.items():
        for op, device_types in devices_by_op.items():
            for device_type in device_types:
                if op == "fpn_upsample_add":
                    table[(op, backend, device_type)] = _Backward(_triton_fpn_upsample_add_backward, "kernel", False)
                else:
                    table[(op, backend, device_type)] = _Backward(makers[op](backend), "kernel", op != "maxpool2x2")
    for backend in ("extension", "triton"):
        for device_type in ("cpu", "cuda"):
            table.setdefault(("fpn_upsample_add", backend, device_type),
                             _Backward(_fpn_upsample_add_backward, "formula", False))
    return table


_BACKWARDS = _backward_table()
_warned_recomputes: set = set()


def active_backward(device_type: Optional[str] = None) -> Dict[str, str]:
    """How each op's gradient is computed on ``device_type`` with the current setting: ``"<backend> kernel"`` (a
    fused backward kernel), ``"formula"`` (the exact gradient in a few torch ops), ``"recompute"`` (the fallback:
    the op's torch implementation rerun in the backward and differentiated), ``"torch autograd"`` (the torch backend:
    autograd of the plain ops) or ``"none"`` (ops that take no gradient: the position encoding, a constant, and the
    in-place bias + GELU, used only where no gradient is recorded)."""
    device_type = device_type or _default_device_type()
    status = {}
    for op in OPS:
        backend = resolve_backend(op, device_type)
        if op not in _DIFFERENTIABLE:
            status[op] = "none"
        elif backend == "torch":
            status[op] = "torch autograd"
        else:
            found = _BACKWARDS.get((op, backend, device_type))
            status[op] = "recompute" if found is None else (f"{backend} kernel" if found.kind == "kernel" else "formula")
    return status


def _register_backward(register: Callable, op: str, backend_of: Callable[[tuple], str]) -> None:
    """``register(backward, setup_context=...)`` for ``op``: its backward on the backend ``backend_of(inputs)`` names
    (a kernel or formula, else the recompute fallback). Extra trailing inputs, such as ``backend``, get no
    gradient. Tensors are kept with ``save_for_backward``, so activation checkpointing and saved-tensor hooks see
    them."""
    torch_fn, arg_names, tensor_args = _DIFFERENTIABLE[op]
    positions = tuple(arg_names.index(name) for name in tensor_args)

    def setup_context(ctx, inputs, output):
        args = inputs[: len(arg_names)]
        device_type = args[0].device.type
        backend = backend_of(inputs)
        ctx.backward = _BACKWARDS.get((op, backend, device_type))
        if ctx.backward is None and backend != "torch" and (backend, op) not in _warned_recomputes:
            _warned_recomputes.add((backend, op))
            warnings.warn(
                f"sam2_fast: the {backend} backend has no backward for {op} on {device_type}; its gradient recomputes "
                "the torch implementation (correct, slower; see sam2_fast.active_backward())", stacklevel=2,
            )
        if backend == "triton" and device_type == "cpu" and not all(
            _is_plain(t) for t in args if isinstance(t, torch.Tensor)
        ):
            ctx.backward = None  # interpreted Triton kernels cannot run on a traced graph's fake tensors: recompute
        ctx.arguments = tuple(None if i in positions else value for i, value in enumerate(args))
        ctx.num_extra_inputs = len(inputs) - len(arg_names)
        saves_output = ctx.backward is not None and ctx.backward.saves_output
        ctx.save_for_backward(*(args[i] for i in positions), *((output,) if saves_output else ()))

    def backward(ctx, grad_output):
        saved = ctx.saved_tensors
        inputs = list(ctx.arguments)
        for position, value in zip(positions, saved):
            inputs[position] = value
        needed = ctx.needs_input_grad[: len(arg_names)]
        if ctx.backward is not None:
            output = saved[len(positions)] if ctx.backward.saves_output else None
            grads = list(ctx.backward.fn(grad_output, tuple(inputs), output))
        else:
            grads = _recompute_gradients(torch_fn, inputs, positions, needed, grad_output)
        grads = [grad if need else None for grad, need in zip(grads, needed)]
        return (*grads, *([None] * ctx.num_extra_inputs))

    register(backward, setup_context=setup_context)


def _recompute_gradients(torch_fn: Callable, inputs: list, positions, needed, grad_output) -> list:
    """The recompute fallback: ``torch_fn`` rerun on the saved inputs and differentiated."""
    leaves = []
    for position in positions:
        if needed[position] and inputs[position] is not None:
            inputs[position] = inputs[position].detach().requires_grad_(True)
            leaves.append(position)
    grads = [None] * len(inputs)
    if leaves:
        with torch.enable_grad():
            output = torch_fn(*inputs)
            # A qkv bias enters only through padding tokens (when not added to every token): allow_unused.
            computed = torch.autograd.grad(output, [inputs[p] for p in leaves], grad_output, allow_unused=True)
        for position, grad in zip(leaves, computed):
            grads[position] = grad
    return grads


for _op, _custom_op in (
    ("window_attention", _window_attention_op), ("global_attention", _global_attention_op),
    ("maxpool2x2", _maxpool2x2_op), ("fpn_upsample_add", _fpn_upsample_add_op),
):
    _register_backward(_custom_op.register_autograd, _op, lambda inputs: inputs[-1])
    if _op in _EXTENSION_OPS:
        _register_backward(
            functools.partial(torch.library.register_autograd, f"sam2_fast_ext::{_op}"), _op,
            lambda inputs: "extension",
        )


def _define_triton_ops() -> Dict[str, Callable]:
    """The ``torch.library.triton_op`` form of each Triton launcher, by op name, and of each backward launcher, by
    ``<op>_backward`` (empty where triton cannot load or runs interpreted). Their arguments are the launchers'; they
    compute what the launchers do, and tracing them records the kernel launches themselves (see kernels.launch)."""
    if _TRITON_REASON is not None or os.environ.get("TRITON_INTERPRET") == "1":
        return {}
    from torch.library import triton_op

    launchers = _TRITON_LAUNCHERS

    @triton_op("sam2_fast::triton_window_attention", mutates_args=())
    def window_attention(
        qkv: torch.Tensor, qkv_bias: Optional[torch.Tensor], num_heads: int, window_size: int, q_pool: bool,
        add_bias: bool,
    ) -> torch.Tensor:
        return launchers["window_attention"](qkv, qkv_bias, num_heads, window_size, q_pool, add_bias)

    @triton_op("sam2_fast::triton_global_attention", mutates_args=())
    def global_attention(qkv: torch.Tensor, num_heads: int, q_pool: bool) -> torch.Tensor:
        return launchers["global_attention"](qkv, num_heads, q_pool)

    @triton_op("sam2_fast::triton_maxpool2x2", mutates_args=())
    def maxpool2x2(x: torch.Tensor) -> torch.Tensor:
        return launchers["maxpool2x2"](x)

    @triton_op("sam2_fast::triton_fpn_upsample_add", mutates_args=())
    def fpn_upsample_add(lateral: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        return launchers["fpn_upsample_add"](lateral, prev)

    backward_launchers = _TRITON_BACKWARD_LAUNCHERS

    @triton_op("sam2_fast::triton_attention_backward", mutates_args=())
    def attention_backward(
        grad_out: torch.Tensor, qkv: torch.Tensor, qkv_bias: Optional[torch.Tensor], out: torch.Tensor,
        num_heads: int, window_size: int, q_pool: bool, add_bias: bool,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        return backward_launchers["window_attention"](
            grad_out, qkv, qkv_bias, out, num_heads, window_size, q_pool, add_bias
        )

    @triton_op("sam2_fast::triton_maxpool2x2_backward", mutates_args=())
    def maxpool2x2_backward(grad_out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return backward_launchers["maxpool2x2"](grad_out, x)

    @triton_op("sam2_fast::triton_fpn_upsample_add_backward", mutates_args=())
    def fpn_upsample_add_backward(grad: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        return backward_launchers["fpn_upsample_add"](grad, prev)

    forward_ops = {
        "window_attention": window_attention, "global_attention": global_attention, "maxpool2x2": maxpool2x2,
        "fpn_upsample_add": fpn_upsample_add,
    }
    for name, op in forward_ops.items():
        _register_backward(op.register_autograd, name, lambda inputs: "triton")
    return {
        **forward_ops, "window_attention_backward": attention_backward, "global_attention_backward": attention_backward,
        "maxpool2x2_backward": maxpool2x2_backward, "fpn_upsample_add_backward": fpn_upsample_add_backward,
    }


_TRITON_OPS = _define_triton_ops()


# ----------------------------------------------------------------------------------------------------------------
# What the model calls.

def _is_plain(t: torch.Tensor) -> bool:
    """A real tensor or parameter: not a fake, functional or other wrapper that tracing substitutes."""
    return type(t.data if isinstance(t, torch.nn.Parameter) else t) is torch.Tensor


def _run(op: str, custom_op, backend: str, tensors: Tuple[Optional[torch.Tensor], ...], *args):
    """``op`` on ``backend`` in the form the call needs.

    The extension's ops are dispatcher ops with fakes and autograd formulas: called as they are in every case, so
    traced graphs hold them. For Triton, a traced or differentiated call goes through the ``triton_op`` on CUDA (the
    compiler sees the kernels) or the opaque custom op under the interpreter; eager inference with neither (no input
    that needs a gradient, no fake or functional tensors) calls the launcher directly, skipping the op wrappers'
    Python overhead (about 0.1 ms a call).
    """
    if backend == "extension":
        return _EXTENSION_OPS[op](*args).contiguous()
    if not _needs_custom_op(tensors):
        return _fast_impl(op, backend)(*args).contiguous()
    if backend == "triton" and op in _TRITON_OPS and tensors[0].device.type == "cuda":
        return _TRITON_OPS[op](*args)
    return custom_op(*args, backend)


def _needs_custom_op(tensors: Tuple[Optional[torch.Tensor], ...]) -> bool:
    """Whether a call with these tensors is traced or recorded by autograd, and so must go through the custom op."""
    present = [t for t in tensors if t is not None]
    return (
        torch.compiler.is_compiling()
        or not all(_is_plain(t) for t in present)
        or (torch.is_grad_enabled() and any(t.requires_grad for t in present))
    )


def window_attention(
    qkv: torch.Tensor, qkv_bias: Optional[torch.Tensor], num_heads: int, window_size: int, q_pool: bool,
    add_bias: bool = False,
) -> torch.Tensor:
    """Windowed attention of a (B, H, W, 3 * dim) qkv map -> (B, H', W', dim); see torch_ops.window_attention.

    ``add_bias``: ``qkv`` lacks its bias and the op adds ``qkv_bias`` (fused into the token reads where
    :func:`window_attention_adds_bias` says so, else as a separate add).
    """
    backend = resolve_backend("window_attention", qkv.device.type)
    if backend == "torch":
        if add_bias:
            qkv = torch_ops.add_qkv_bias(qkv, qkv_bias)
        dtype = emulated_attention_dtype(qkv)
        if dtype is not None:
            with torch.autocast("cpu", enabled=False):
                out = torch_ops.window_attention(
                    qkv.float(), rounded_fp32(qkv_bias, dtype), num_heads, window_size, q_pool
                )
            return out.to(dtype)
        return torch_ops.window_attention(qkv, qkv_bias, num_heads, window_size, q_pool)
    return _run("window_attention", _window_attention_op, backend, (qkv, qkv_bias),
                qkv, qkv_bias, num_heads, window_size, q_pool, add_bias)


def window_attention_adds_bias(device_type: str) -> bool:
    """Whether window_attention on ``device_type`` adds the qkv bias while reading the tokens, so that a caller
    gains by handing it the projection without its bias (``add_bias=True``): the CPU extension does."""
    return device_type == "cpu" and resolve_backend("window_attention", device_type) == "extension"


def global_attention(qkv: torch.Tensor, num_heads: int, q_pool: bool) -> torch.Tensor:
    """Attention over all tokens of each image of a (B, H, W, 3 * dim) qkv map -> (B, H', W', dim)."""
    backend = resolve_backend("global_attention", qkv.device.type)
    if backend == "torch":
        dtype = emulated_attention_dtype(qkv)
        if dtype is not None:
            with torch.autocast("cpu", enabled=False):
                out = torch_ops.global_attention(qkv.float(), num_heads, q_pool)
            return out.to(dtype)
        return torch_ops.global_attention(qkv, num_heads, q_pool)
    return _run("global_attention", _global_attention_op, backend, (qkv,), qkv, num_heads, q_pool)


def maxpool2x2(x: torch.Tensor) -> torch.Tensor:
    """2x2 max-pool (stride 2, floor) of a channels-last (B, H, W, C) map."""
    backend = resolve_backend("maxpool2x2", x.device.type)
    if backend == "torch":
        return torch_ops.maxpool2x2(x)
    return _run("maxpool2x2", _maxpool2x2_op, backend, (x,), x)


def fpn_upsample_add(lateral: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """``lateral + nearest_upsample_2x(prev.float())`` of (B, C, 2h, 2w) and (B, C, h, w) maps."""
    backend = resolve_backend("fpn_upsample_add", lateral.device.type)
    if backend == "torch":
        return torch_ops.fpn_upsample_add(lateral, prev)
    return _run("fpn_upsample_add", _fpn_upsample_add_op, backend, (lateral, prev), lateral, prev)


def bias_gelu_(x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``x = gelu(x + bias)`` in place (exact, erf GELU), returning ``x``: for a GEMM's fresh output that no
    gradient needs (the op has no autograd formula); see torch_ops.bias_gelu_."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, bias)):
        raise ValueError(
            "bias_gelu_ works in place and has no backward: it is for activations no gradient needs, got a tensor "
            "that requires grad (use torch.nn.functional.gelu(x + bias) where gradients are needed)"
        )
    backend = resolve_backend("bias_gelu_", x.device.type)
    if backend == "torch":
        return torch_ops.bias_gelu_(x, bias)
    _fast_impl("bias_gelu_", backend)(x, bias)
    return x


def bias_gelu_is_fused(device_type: str) -> bool:
    """Whether bias_gelu_ on ``device_type`` runs a fused kernel (the CPU extension's), so that a caller gains by
    running its GEMM without the bias and handing both to it, instead of a GEMM with bias and torch's GELU."""
    return resolve_backend("bias_gelu_", device_type) != "torch"


def sine_position_encoding(
    height: int, width: int, num_pos_feats: int, temperature: float, normalize: bool, scale: float,
    device: torch.device,
) -> torch.Tensor:
    """(1, 2 * num_pos_feats, height, width) fp32 sine position encoding; see torch_ops.sine_position_encoding."""
    device = torch.device(device)
    backend = resolve_backend("sine_position_encoding", device.type)
    args = (height, width, num_pos_feats, temperature, normalize, scale, device)
    return _fast_impl("sine_position_encoding", backend)(*args)
