"""Everything the op layer registers with torch, derived from the specs (:mod:`sam2_fast.ops.specs`), and the call
of an op on the backend it resolves to.

- The fakes of the extension's ``sam2_fast_ext`` ops, once it has loaded.
- For each op with a Triton kernel, the custom op ``sam2_fast::<op>``: the spec's arguments plus a trailing
  ``str backend``, with the spec's fake. It is the opaque form a traced or differentiated call takes where no
  ``triton_op`` can (the Triton interpreter, whose kernels cannot run on the compiler's fake tensors); ``backend`` is
  an argument so that the choice is fixed when a graph is traced, and any backend can run behind it (the tests check
  the registrations with the torch one).
- Where Triton compiles (not interpreted), the ``triton_op`` ``sam2_fast::triton_<name>`` of each Triton launcher,
  forward and backward, whose kernels the compiler sees (see kernels.launch).
- The autograd formula of each differentiable op on each of those forms and on the extension's op: a backward
  kernel where the backend has one on the device, else the spec's formula, else the recompute fallback (the op's
  reference rerun from the saved inputs and differentiated: correct, but it pays the forward again and the
  reference's copies). :func:`active_backward` says which each op takes.
"""

from __future__ import annotations

import functools
import inspect
import os
import warnings
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import torch

from ..backends import extension as _extension
from . import dispatch
from .dispatch import OPS, resolve_backend
from .spec import KernelSpec, OpSpec
from .specs import KERNEL_SPECS, OP_SPECS

_SPECS = {spec.name: spec for spec in (*OP_SPECS, *KERNEL_SPECS)}

# ----------------------------------------------------------------------------------------------------------------
# A spec's schema as Python annotations: custom_op and triton_op infer an op's schema from its function's
# annotations (triton_op before torch 2.14 ignores a schema argument), so the function carries them.

_PYTHON_TYPES = {
    "Tensor": torch.Tensor, "Tensor?": Optional[torch.Tensor], "SymInt": int, "bool": bool, "float": float,
    "str": str, "Device": torch.device,
}
_PYTHON_RETURNS = {"Tensor": torch.Tensor, "(Tensor, Tensor)": Tuple[torch.Tensor, torch.Tensor]}


def typed(spec: KernelSpec, impl: Callable, extra: Tuple[Tuple[str, str], ...] = ()) -> Callable:
    """``impl`` (called with positional arguments) under a signature from which ``torch.library.infer_schema``
    infers ``spec.schema`` with the ``(type, name)`` arguments ``extra`` appended; checked, so that a spec whose
    schema the annotations cannot express fails here, on every machine, rather than on the first GPU run."""
    arguments = (*zip(spec.arg_types, spec.arg_names), *extra)
    unknown = [kind for kind, _ in arguments if kind not in _PYTHON_TYPES]
    unknown += [] if spec.returns in _PYTHON_RETURNS else [spec.returns]
    if unknown:
        raise ValueError(
            f"{spec.name}: no Python annotation gives the schema types {unknown}; expected arguments of "
            f"{sorted(_PYTHON_TYPES)} and results of {sorted(_PYTHON_RETURNS)} (torch writes a Python int as SymInt)"
        )

    def op(*args):
        return impl(*args)

    op.__name__ = op.__qualname__ = spec.name
    op.__signature__ = inspect.Signature(
        [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=_PYTHON_TYPES[kind])
         for kind, name in arguments],
        return_annotation=_PYTHON_RETURNS[spec.returns],
    )
    expected = f"({', '.join(f'{kind} {name}' for kind, name in arguments)}) -> {spec.returns}"
    inferred = torch.library.infer_schema(op, mutates_args=())
    if inferred != expected:
        raise RuntimeError(f"{spec.name}: torch infers the schema {inferred} from its annotations, not {expected}")
    return op


def implementation(spec: OpSpec, backend: str) -> Callable:
    """``spec``'s op on ``backend`` as a plain function of its arguments: the Triton launcher, the extension's op,
    or what the torch backend runs."""
    if backend == "triton":
        return dispatch._TRITON_LAUNCHERS[spec.name]
    if backend == "extension":
        return dispatch._EXTENSION_OPS[spec.name]
    if backend == "torch":
        return spec.torch_backend
    raise ValueError(f"unknown sam2_fast backend {backend!r}")


# ----------------------------------------------------------------------------------------------------------------
# Gradients.

class _Backward(NamedTuple):
    """A backward without recompute: ``fn(grad_output, inputs, output)`` -> one gradient (or None) per input of
    the op (without ``backend``); ``kind`` is "kernel" (a fused backward kernel) or "formula" (the exact gradient
    in a few torch ops); ``saves_output``: whether ``fn`` needs the forward's output."""

    fn: Callable
    kind: str
    saves_output: bool


_warned_recomputes: set = set()


def _is_plain(t: torch.Tensor) -> bool:
    """A real tensor or parameter: not a fake, functional or other wrapper that tracing substitutes."""
    return type(t.data if isinstance(t, torch.nn.Parameter) else t) is torch.Tensor


def _register_backward(register: Callable, spec: OpSpec, backend_of: Callable[[tuple], str]) -> None:
    """``register(backward, setup_context=...)`` for ``spec``'s op: its backward on the backend ``backend_of(inputs)``
    names (a kernel or formula from :data:`_BACKWARDS`, else the recompute fallback). Extra trailing inputs, such as
    ``backend``, get no gradient. Tensors are kept with ``save_for_backward``, so activation checkpointing and
    saved-tensor hooks see them."""
    op, num_args, positions = spec.name, len(spec.arg_names), spec.differentiable_positions

    def setup_context(ctx, inputs, output):
        args = inputs[:num_args]
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
        ctx.num_extra_inputs = len(inputs) - num_args
        saves_output = ctx.backward is not None and ctx.backward.saves_output
        ctx.save_for_backward(*(args[i] for i in positions), *((output,) if saves_output else ()))

    def backward(ctx, grad_output):
        saved = ctx.saved_tensors
        inputs = list(ctx.arguments)
        for position, value in zip(positions, saved):
            inputs[position] = value
        needed = ctx.needs_input_grad[:num_args]
        if ctx.backward is not None:
            output = saved[len(positions)] if ctx.backward.saves_output else None
            grads = list(ctx.backward.fn(grad_output, tuple(inputs), output))
        else:
            grads = _recompute_gradients(spec.reference, inputs, positions, needed, grad_output)
        grads = [grad if need else None for grad, need in zip(grads, needed)]
        return (*grads, *([None] * ctx.num_extra_inputs))

    register(backward, setup_context=setup_context)


def _recompute_gradients(reference: Callable, inputs: list, positions, needed, grad_output) -> list:
    """The recompute fallback: ``reference`` rerun on the saved inputs and differentiated."""
    leaves = []
    for position in positions:
        if needed[position] and inputs[position] is not None:
            inputs[position] = inputs[position].detach().requires_grad_(True)
            leaves.append(position)
    grads = [None] * len(inputs)
    if leaves:
        with torch.enable_grad():
            output = reference(*inputs)
            # A qkv bias enters only through padding tokens (when not added to every token): allow_unused.
            computed = torch.autograd.grad(output, [inputs[p] for p in leaves], grad_output, allow_unused=True)
        for position, grad in zip(leaves, computed):
            grads[position] = grad
    return grads


# ----------------------------------------------------------------------------------------------------------------
# The registrations.

def _register_extension_fakes() -> None:
    """The fake of every ``sam2_fast_ext`` op that has a spec: the spec's, as the custom op's."""
    if dispatch._EXTENSION_REASON is not None:
        return
    for spec in _SPECS.values():
        if spec.extension and hasattr(torch.ops.sam2_fast_ext, spec.name):
            torch.library.register_fake(f"sam2_fast_ext::{spec.name}")(spec.fake)


def _define_custom_ops() -> Dict[str, Callable]:
    """``sam2_fast::<op>`` of each op with a Triton kernel, by op name, with its fake and autograd formula."""
    custom_ops = {}
    for spec in OP_SPECS:
        if spec.triton:
            custom_op = torch.library.custom_op(
                f"sam2_fast::{spec.name}", typed(spec, _runs_on_its_backend(spec), extra=(("str", "backend"),)),
                mutates_args=(),
            )
            custom_op.register_fake(_without_backend(spec.fake))
            if spec.differentiable:
                _register_backward(custom_op.register_autograd, spec, lambda inputs: inputs[-1])
            custom_ops[spec.name] = custom_op
    return custom_ops


def _runs_on_its_backend(spec: OpSpec) -> Callable:
    def run(*args):
        *op_args, backend = args
        return implementation(spec, backend)(*op_args).contiguous()

    return run


def _without_backend(fake: Callable) -> Callable:
    return lambda *args: fake(*args[:-1])


def define_triton_ops(namespace: str, launchers: Dict[str, Callable]) -> Dict[str, Callable]:
    """The ``torch.library.triton_op`` ``<namespace>::triton_<name>`` of every spec with a Triton kernel, forward and
    backward, by spec name, each calling ``launchers[name]`` with the spec's arguments; the forward ones get their
    autograd formula. Tracing them records the kernel launches themselves (see kernels.launch). ``namespace`` and
    ``launchers`` are arguments so that a test can build them on a machine without a GPU."""
    from torch.library import triton_op

    triton_ops = {}
    for spec in _SPECS.values():
        if spec.triton:
            triton_ops[spec.name] = triton_op(
                f"{namespace}::triton_{spec.name}", typed(spec, _launching(launchers, spec.name)), mutates_args=()
            )
            if isinstance(spec, OpSpec) and spec.differentiable:
                _register_backward(triton_ops[spec.name].register_autograd, spec, lambda inputs: "triton")
    return triton_ops


def _launching(launchers: Dict[str, Callable], name: str) -> Callable:
    return lambda *args: launchers[name](*args)


def _triton_ops() -> Dict[str, Callable]:
    """The sam2_fast ``triton_op``s, by spec name (none where triton cannot load or runs interpreted)."""
    if dispatch._TRITON_REASON is not None or os.environ.get("TRITON_INTERPRET") == "1":
        return {}
    return define_triton_ops("sam2_fast", dispatch._TRITON_LAUNCHERS)


def _backward_table() -> Dict[Tuple[str, str, str], _Backward]:
    """{(op, backend, device type): its backward without recompute}, from what loaded: the backward kernel where the
    backend has it on the device (for Triton on CUDA its ``triton_op``, so that a compiled backward holds the
    kernels), else the spec's formula on every fast backend and device."""
    table = {}
    triton_devices = () if dispatch._TRITON_REASON is not None else tuple(
        device_type for device_type in ("cuda", "cpu") if dispatch._triton_runs_on(device_type)
    )
    for spec in OP_SPECS:
        backward = spec.backward
        if backward is None:
            continue
        kernel = backward.kernel
        if kernel is not None and kernel.extension and dispatch._EXTENSION_REASON is None:
            extension_op = getattr(torch.ops.sam2_fast_ext, kernel.name)
            for device_type in _extension.kernel_device_types(kernel.name):
                table[(spec.name, "extension", device_type)] = _Backward(
                    functools.partial(backward.gradients, extension_op), "kernel", backward.saves_output
                )
        if kernel is not None and kernel.name in dispatch._TRITON_LAUNCHERS:
            for device_type in triton_devices:
                run = (_TRITON_OPS if device_type == "cuda" else {}).get(kernel.name)
                table[(spec.name, "triton", device_type)] = _Backward(
                    functools.partial(backward.gradients, run or dispatch._TRITON_LAUNCHERS[kernel.name]), "kernel",
                    backward.saves_output,
                )
        if backward.formula is not None:
            for backend in ("extension", "triton"):
                for device_type in ("cpu", "cuda"):
                    table.setdefault((spec.name, backend, device_type), _Backward(backward.formula, "formula", False))
    return table


_register_extension_fakes()
_CUSTOM_OPS = _define_custom_ops()
_TRITON_OPS = _triton_ops()
_BACKWARDS = _backward_table()
for _spec in OP_SPECS:
    if _spec.differentiable and _spec.name in dispatch._EXTENSION_OPS:
        _register_backward(
            functools.partial(torch.library.register_autograd, f"sam2_fast_ext::{_spec.name}"), _spec,
            lambda inputs: "extension",
        )


def active_backward(device_type: Optional[str] = None) -> Dict[str, str]:
    """How each op's gradient is computed on ``device_type`` with the current setting: ``"<backend> kernel"`` (a
    fused backward kernel), ``"formula"`` (the exact gradient in a few torch ops), ``"recompute"`` (the fallback:
    the op's torch implementation rerun in the backward and differentiated), ``"torch autograd"`` (the torch backend:
    autograd of the plain ops) or ``"none"`` (ops that take no gradient: the position encoding, a constant, and the
    in-place bias + GELU, used only where no gradient is recorded)."""
    device_type = device_type or dispatch._default_device_type()
    status = {}
    for op in OPS:
        backend = resolve_backend(op, device_type)
        if not _SPECS[op].differentiable:
            status[op] = "none"
        elif backend == "torch":
            status[op] = "torch autograd"
        else:
            found = _BACKWARDS.get((op, backend, device_type))
            status[op] = "recompute" if found is None else (f"{backend} kernel" if found.kind == "kernel" else "formula")
    return status


# ----------------------------------------------------------------------------------------------------------------
# The call of an op from its entry point.

def call(spec: OpSpec, device_type: str, *args):
    """``spec``'s op on the backend it resolves to on ``device_type``, in the form the call needs.

    The torch backend runs its function as it is (the compiler sees and fuses the plain ops, autograd differentiates
    them). The extension's ops are dispatcher ops with fakes and autograd formulas: called as they are in every case,
    so traced graphs hold them. For Triton, a traced or differentiated call goes through the ``triton_op`` on CUDA
    (the compiler sees the kernels) or the opaque custom op under the interpreter; eager inference with neither (no
    input that needs a gradient, no fake or functional tensors) calls the launcher directly, skipping the op
    wrappers' Python overhead (about 0.1 ms a call).
    """
    backend = resolve_backend(spec.name, device_type)
    if backend == "torch":
        return spec.torch_backend(*args)
    if backend == "extension":
        output = dispatch._EXTENSION_OPS[spec.name](*args)
        return output if output is None else output.contiguous()
    tensors = tuple(args[position] for position in spec.differentiable_positions)
    if not _needs_custom_op(tensors):
        return dispatch._TRITON_LAUNCHERS[spec.name](*args).contiguous()
    if spec.name in _TRITON_OPS and tensors[0].device.type == "cuda":
        return _TRITON_OPS[spec.name](*args)
    return _CUSTOM_OPS[spec.name](*args, backend)


def _needs_custom_op(tensors: Tuple[Optional[torch.Tensor], ...]) -> bool:
    """Whether a call with these tensors is traced or recorded by autograd, and so must go through the custom op."""
    present = [t for t in tensors if t is not None]
    return (
        torch.compiler.is_compiling()
        or not all(_is_plain(t) for t in present)
        or (torch.is_grad_enabled() and any(t.requires_grad for t in present))
    )
