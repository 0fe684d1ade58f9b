"""What declares an op: :class:`OpSpec` for an op the model calls (dispatched over the backends), :class:`KernelSpec`
for a kernel-level op that the op layer registers but does not dispatch (a backward kernel, the training GEMMs), and
:class:`Backward` for how an op's gradient reaches its backward kernel. The specs themselves are in
:mod:`sam2_fast.ops.specs`; :mod:`sam2_fast.ops.registry` derives every registration from them.

Names are conventions, not fields: a spec named ``<name>`` is the extension's ``sam2_fast_ext::<name>`` (when
``extension``) and the Triton launcher ``<name>`` in ``kernels/<name>.py`` (when ``triton``), whose ``triton_op`` is
``sam2_fast::triton_<name>``; an op with a Triton kernel also gets the custom op ``sam2_fast::<name>``, its
arguments plus a trailing ``str backend``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Dict, Optional, Tuple


def _parse_schema(schema: str) -> Tuple[Tuple[Tuple[str, str], ...], str]:
    """``"(Tensor x, SymInt n) -> Tensor"`` -> ``((("Tensor", "x"), ("SymInt", "n")), "Tensor")``."""
    match = re.fullmatch(r"\((.*)\) -> (.+)", schema)
    if match is None:
        raise ValueError(f"expected a schema like '(Tensor x, SymInt n) -> Tensor', got {schema!r}")
    arguments = match.group(1)
    parsed = tuple(tuple(argument.rsplit(" ", 1)) for argument in arguments.split(", ")) if arguments else ()
    if not all(len(argument) == 2 for argument in parsed):
        raise ValueError(f"expected each argument of {schema!r} as '<type> <name>'")
    return parsed, match.group(2)


@dataclasses.dataclass(frozen=True, kw_only=True)
class KernelSpec:
    """An op with one schema, implemented by the C++ extension and/or a Triton launcher.

    ``schema``: its arguments and results as torch writes them for a Python-defined op (``SymInt`` where the C++
    schema in csrc/ops.cpp says ``int``; the same names in the same order), e.g. ``"(Tensor x) -> Tensor"``.
    ``fake``: the empty outputs (from :mod:`sam2_fast.backends.shapes`) for the op's arguments, with ``torch._check``
    on them: the fake of every form the op takes. ``extension``: the extension implements it. ``triton``: a Triton
    launcher implements it.
    """

    name: str
    schema: str
    fake: Callable
    extension: bool = False
    triton: bool = False
    arg_types: Tuple[str, ...] = dataclasses.field(init=False)
    arg_names: Tuple[str, ...] = dataclasses.field(init=False)
    returns: str = dataclasses.field(init=False)

    def __post_init__(self):
        # Parsed once here: dispatch reads these while torch.compile traces it.
        arguments, returns = _parse_schema(self.schema)
        object.__setattr__(self, "arg_types", tuple(kind for kind, _ in arguments))
        object.__setattr__(self, "arg_names", tuple(name for _, name in arguments))
        object.__setattr__(self, "returns", returns)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Backward:
    """An op's gradient without recompute.

    ``kernel``: the backward kernel's spec; ``gradients(kernel, grad_output, inputs, output)`` calls it (the
    extension's op, the ``triton_op`` or the launcher, all with ``kernel``'s schema) and returns one gradient (or
    None) per input of the op. ``saves_output``: ``gradients`` needs the forward's output (else None is passed).
    ``formula(grad_output, inputs, output)``: the exact gradient in a few torch ops, taken by every fast backend
    and device that has no kernel (without one, those recompute).
    """

    kernel: Optional[KernelSpec] = None
    gradients: Optional[Callable] = None
    saves_output: bool = False
    formula: Optional[Callable] = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class OpSpec(KernelSpec):
    """An op the model calls (``sam2_fast.ops.<name>``), dispatched over the backends.

    ``reference``: the plain-PyTorch implementation in :mod:`sam2_fast.backends.torch_ops`, the semantics every
    backend is tested against and what the recompute fallback differentiates. ``torch_backend``: what the torch
    backend runs when that is not the reference itself. ``differentiable``: the tensor arguments that can need a
    gradient (none: the op takes no autograd formula and no custom op). ``backward``: its backward kernel or formula
    (None: recompute). ``auto_order``: per device type, the backends ``auto`` tries for this op where its measured
    best differs from the device's order.
    """

    reference: Callable
    torch_backend: Optional[Callable] = None
    differentiable: Tuple[str, ...] = ()
    backward: Optional[Backward] = None
    auto_order: Dict[str, Tuple[str, ...]] = dataclasses.field(default_factory=dict)
    # The positions of the ``differentiable`` arguments.
    differentiable_positions: Tuple[int, ...] = dataclasses.field(init=False)

    def __post_init__(self):
        super().__post_init__()
        if self.torch_backend is None:
            object.__setattr__(self, "torch_backend", self.reference)
        unknown = set(self.differentiable) - set(self.arg_names)
        if unknown:
            raise ValueError(f"{self.name}: differentiable names {sorted(unknown)} that are not arguments")
        object.__setattr__(
            self, "differentiable_positions", tuple(self.arg_names.index(name) for name in self.differentiable)
        )
