"""How a launcher starts its kernel: directly on real tensors, through ``torch.library.wrap_triton`` when traced."""

from __future__ import annotations

import torch
from torch.library import wrap_triton


def launchable(kernel, tensor: torch.Tensor):
    """``kernel`` itself when ``tensor`` is a real tensor; when it is a fake or functional tensor (the launcher is
    being traced as the implementation of a ``torch.library.triton_op``), the kernel wrapped so that
    ``torch.compile`` and ``torch.export`` record the launch in their graph and inductor compiles the kernel into its
    output. (``wrap_triton`` on real tensors outside a ``triton_op`` would go through a slow traceable dispatch.)"""
    return kernel if type(tensor) is torch.Tensor else wrap_triton(kernel)
