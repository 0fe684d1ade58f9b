"""Ahead-of-time packages of the encoder: :func:`export_encoder` writes an AOTInductor ``.pt2`` file,
:func:`load_exported` runs it, in any later process, without compiling anything.

``torch.compile`` recompiles the encoder in every new process (tens of seconds on a GPU with max-autotune, minutes
on a small CPU). A package is compiled once: on CPU it calls the C++ extension's ops, on CUDA it carries the Triton
kernels compiled into it.
"""

from __future__ import annotations

import json
import os
from typing import Dict, Optional, Union

import torch
import torch.nn as nn

from ..backends import extension as _extension
from .. import ops

_METADATA_KEY = "sam2_fast"
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class _ForwardInAutocast(nn.Module):
    """``encoder(images)`` under autocast to ``autocast_dtype``, so that the exported graph holds the casts."""

    def __init__(self, encoder: nn.Module, autocast_dtype: torch.dtype):
        super().__init__()
        self.encoder = encoder
        self.autocast_dtype = autocast_dtype

    def forward(self, images: torch.Tensor):
        with torch.autocast(images.device.type, dtype=self.autocast_dtype):
            return self.encoder(images)


def _check_example(encoder: nn.Module, example_images: torch.Tensor) -> None:
    if not isinstance(example_images, torch.Tensor):
        raise TypeError(
            f"expected example_images as a torch.Tensor of shape (B, 3, H, W), got {type(example_images).__name__}"
        )
    check_input = getattr(getattr(encoder, "trunk", None), "check_input", None)
    if check_input is None:
        raise TypeError(
            "export_encoder expects a sam2_fast.ImageEncoder (from sam2_fast.build_image_encoder or the sam2_fast "
            f"classes), got {type(encoder).__module__}.{type(encoder).__qualname__}"
        )
    check_input(example_images)


def export_encoder(
    encoder: nn.Module,
    example_images: torch.Tensor,
    path: Union[str, os.PathLike],
    *,
    autocast_dtype: Optional[torch.dtype] = None,
    dynamic_batch: bool = False,
    max_batch: int = 1024,
) -> str:
    """Compile ``encoder`` ahead of time for inputs like ``example_images`` and write an AOTInductor package.

    The package runs inputs of ``example_images``' shape, dtype and device (any batch from 1 to ``max_batch`` with
    ``dynamic_batch``), under autocast to ``autocast_dtype`` if given (it is part of the package, not of the
    caller's context), with the sam2_fast backend chosen now (``sam2_fast.use_backend``). The encoder runs in eval
    mode with no gradients. Returns the package's path.

        sam2_fast.export_encoder(encoder, torch.randn(1, 3, 1024, 1024, device="cuda"), "encoder.pt2",
                                 autocast_dtype=torch.bfloat16)
        encoder = sam2_fast.load_exported("encoder.pt2")     # in any later process: no compile step
        out = encoder(images)                                # the encoder's output dict
    """
    _check_example(encoder, example_images)
    if autocast_dtype is not None and autocast_dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"autocast_dtype must be torch.bfloat16, torch.float16 or None, got {autocast_dtype}")
    if dynamic_batch and not (isinstance(max_batch, int) and max_batch >= 2):
        raise ValueError(f"max_batch must be an integer >= 2 with dynamic_batch, got {max_batch!r}")
    path = os.fspath(path)
    if not path.endswith(".pt2"):
        raise ValueError(f"AOTInductor packages are .pt2 files, got the path {path!r}")
    device_type = example_images.device.type
    metadata = {
        "input_shape": list(example_images.shape),
        "dtype": _DTYPE_NAMES.get(example_images.dtype, str(example_images.dtype)),
        "device_type": device_type,
        "autocast_dtype": None if autocast_dtype is None else _DTYPE_NAMES[autocast_dtype],
        "dynamic_batch": dynamic_batch,
        "max_batch": max_batch if dynamic_batch else int(example_images.shape[0]),
        "backends": ops.active_backends(device_type),
    }
    dynamic_shapes = None
    if dynamic_batch:
        dynamic_shapes = ({0: torch.export.Dim("batch", min=1, max=max_batch)},)
    was_training = encoder.training
    encoder.eval()
    module = encoder if autocast_dtype is None else _ForwardInAutocast(encoder, autocast_dtype)
    try:
        with torch.no_grad():
            program = torch.export.export(module, (example_images,), dynamic_shapes=dynamic_shapes)
    finally:
        encoder.train(was_training)
    metadata["extension_ops"] = _extension_ops_called(program)
    return torch._inductor.aoti_compile_and_package(
        program, package_path=path,
        inductor_configs={"aot_inductor.metadata": {_METADATA_KEY: json.dumps(metadata)}},
    )


def _extension_ops_called(program: torch.export.ExportedProgram):
    """The names of the sam2_fast_ext ops the program calls, in any of its (sub)graphs."""
    names = set()
    for graph_module in program.graph_module.modules():
        graph = getattr(graph_module, "graph", None)
        for node in graph.nodes if isinstance(graph, torch.fx.Graph) else ():
            target = str(node.target)
            if node.op == "call_function" and target.startswith("sam2_fast_ext."):
                names.add(target.split(".")[1])
            for arg in node.args:  # mutating ops appear wrapped: auto_functionalized(sam2_fast_ext.bias_gelu_...)
                if str(arg).startswith("sam2_fast_ext."):
                    names.add(str(arg).split(".")[1])
    return sorted(names)


class ExportedEncoder:
    """A loaded AOTInductor package of the encoder: ``encoder(images)`` returns the encoder's output dict."""

    def __init__(self, runner, metadata: Dict[str, object], path: str):
        self._runner = runner
        self.metadata = metadata
        self.path = path

    def __repr__(self) -> str:
        return f"ExportedEncoder({self.path!r}, {self.metadata})"

    def _check(self, images: torch.Tensor) -> None:
        meta = self.metadata
        expected_shape = tuple(meta["input_shape"])
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"expected images as a torch.Tensor of shape {expected_shape}, got {type(images).__name__}")
        batch_text = f"B in 1..{meta['max_batch']}" if meta["dynamic_batch"] else str(expected_shape[0])
        shape_ok = images.dim() == 4 and tuple(images.shape[1:]) == expected_shape[1:] and (
            1 <= images.shape[0] <= meta["max_batch"] if meta["dynamic_batch"] else images.shape[0] == expected_shape[0]
        )
        if not shape_ok:
            raise ValueError(
                f"this package ({self.path}) was exported for images of shape ({batch_text}, "
                f"{', '.join(map(str, expected_shape[1:]))}), got {tuple(images.shape)}; export another for this shape"
            )
        if _DTYPE_NAMES.get(images.dtype, str(images.dtype)) != meta["dtype"]:
            raise TypeError(f"this package was exported for {meta['dtype']} images, got {images.dtype}")
        if images.device.type != meta["device_type"]:
            raise ValueError(f"this package was exported for {meta['device_type']} tensors, got {images.device}")

    def __call__(self, images: torch.Tensor) -> Dict[str, object]:
        self._check(images)
        with torch.no_grad():
            return self._runner(images)


def load_exported(path: Union[str, os.PathLike]) -> ExportedEncoder:
    """Load a package written by :func:`export_encoder`; nothing is compiled. Raises a clear error for a file
    that is not such a package, or one that needs sam2_fast's C++ extension where it is not built."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"exported encoder package not found: {path}")
    runner = torch._inductor.aoti_load_package(path)
    raw = runner.get_metadata().get(_METADATA_KEY)
    if raw is None:
        raise ValueError(f"{path} is an AOTInductor package but not one written by sam2_fast.export_encoder")
    metadata = json.loads(raw)
    if metadata["extension_ops"] and _extension.load_error() is not None:
        raise RuntimeError(
            f"{path} calls sam2_fast's C++ extension ({', '.join(metadata['extension_ops'])}), which cannot load "
            f"here: {_extension.load_error()}"
        )
    return ExportedEncoder(runner, metadata, path)
