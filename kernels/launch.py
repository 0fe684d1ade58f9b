"""What every launcher shares: the dtypes the kernels take, the check of each tensor a kernel reads
(``checked_operand``), and how a launcher starts its kernel (directly on real tensors, through
``torch.library.wrap_triton`` when traced)."""

from __future__ import annotations

import os
from typing import Optional, Sequence, Union

import torch
from torch.library import wrap_triton

# The dtypes the kernels take, with their Triton names (for the AOT signatures).
TRITON_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _shape_text(shape: Sequence[Union[int, str]]) -> str:
    return "(" + ", ".join(str(size) for size in shape) + ("," if len(shape) == 1 else "") + ")"


def _dtype_text(dtypes: Sequence[torch.dtype]) -> str:
    names = [str(dtype).removeprefix("torch.") for dtype in dtypes]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def checked_operand(
    op: str, name: str, tensor: torch.Tensor, shape: Sequence[Union[int, str]], dtypes: Sequence[torch.dtype],
    layout: str, device: Optional[torch.device] = None,
) -> torch.Tensor:
    """``tensor``, the operand ``name`` of ``op``'s kernel, checked and in a layout the kernel reads correctly.

    Checks, in this order, raising an error that names ``op``, ``name``, what was expected and what came:
    - a tensor (TypeError otherwise);
    - of ``shape``: an int entry is the size that dim must have, a str entry names a size left free (only the rank
      is checked for it), e.g. ``("B", "H", "W", 3 * dim)`` (ValueError);
    - of a dtype in ``dtypes`` (TypeError);
    - on ``device`` when given (the device of the operands checked before it), else on a device Triton runs on
      here: CUDA, or CPU under ``TRITON_INTERPRET=1`` (ValueError).

    ``layout`` says which strides the kernel reads, and so what comes back:
    - ``"strided"``: the kernel takes every stride of the operand (broadcast, transposed, sliced, channels-last:
      any of them); the tensor itself.
    - ``"rows"``: the kernel takes the strides of all dims but the last, which it reads with unit stride; the
      tensor itself where the last dim has stride 1 (or a single element), else a contiguous copy.
    - ``"contiguous"``: the kernel computes offsets from the sizes; ``tensor.contiguous()`` (the tensor itself when
      contiguous already: its size-1 dims may then have any stride, which a kernel multiplies by index 0 only).
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{op}: expected {name} to be a tensor, got {type(tensor).__name__}")
    if tensor.dim() != len(shape) or any(
        isinstance(size, int) and actual != size for size, actual in zip(shape, tensor.shape)
    ):
        raise ValueError(f"{op}: expected {name} of shape {_shape_text(shape)}, got {tuple(tensor.shape)}")
    if tensor.dtype not in dtypes:
        raise TypeError(f"{op}: expected {name} of dtype {_dtype_text(dtypes)}, got {tensor.dtype}")
    if device is not None:
        if tensor.device != device:
            raise ValueError(f"{op}: expected {name} on {device} (where the other operands are), got {tensor.device}")
    elif tensor.device.type != "cuda" and not (
        tensor.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
    ):
        raise ValueError(
            f"{op}: expected {name} on a CUDA device (or on CPU under TRITON_INTERPRET=1), got a {tensor.device} tensor"
        )
    if layout == "strided":
        return tensor
    if layout == "rows":
        return tensor if tensor.stride(-1) == 1 or tensor.shape[-1] <= 1 else tensor.contiguous()
    if layout == "contiguous":
        return tensor.contiguous()
    raise ValueError(f"{op}: expected layout 'strided', 'rows' or 'contiguous' for {name}, got {layout!r}")


def launchable(kernel, tensor: torch.Tensor):
    """``kernel`` itself when ``tensor`` is a real tensor; when it is a fake or functional tensor (the launcher is
    being traced as the implementation of a ``torch.library.triton_op``), the kernel wrapped so that
    ``torch.compile`` and ``torch.export`` record the launch in their graph and inductor compiles the kernel into its
    output. (``wrap_triton`` on real tensors outside a ``triton_op`` would go through a slow traceable dispatch.)"""
    return kernel if type(tensor) is torch.Tensor else wrap_triton(kernel)
