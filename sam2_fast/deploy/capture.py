"""Graph-captured inference on CUDA: :func:`capture_cuda_graphs`.

At batch 1 the eager encoder spends most of its time launching kernels from Python. A CUDA graph records the
whole forward once per input shape and replays it with one launch, with no compile step.
"""

from __future__ import annotations

import collections
import dataclasses
import warnings
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch.nn.modules import module as module_hooks

from .. import ops
from ..model.image_encoder import ImageEncoder, map_outputs

# Modules that keep tensors between calls (the trunk's resized positional embedding, the neck's position
# encodings) say so with two methods, which a captured encoder asks: ``cached_tensors()``, the tensors a recorded
# graph may read from them, and ``cache_sources()``, the parameters those caches are computed from.

# How many parameters, buffers and submodules have been registered in this process since the first captured encoder
# was made (the process-wide hooks that count them are installed then, not at import). A captured encoder checks it
# on every call: a change (a checkpoint loaded with assign=True, a replaced layer) may mean other tensors hold its
# weights now, so it looks again. Walking the module tree on every call instead costs milliseconds.
_registrations = [0]
_counting = [False]


def _count_registration(*args) -> None:
    _registrations[0] += 1


def _count_registrations() -> None:
    if not _counting[0]:
        module_hooks.register_module_parameter_registration_hook(_count_registration)
        module_hooks.register_module_buffer_registration_hook(_count_registration)
        module_hooks.register_module_module_registration_hook(_count_registration)
        _counting[0] = True


@dataclasses.dataclass
class _CapturedForward:
    """One recorded forward: the graph, the buffers it reads and writes, and what it reads from the encoder's
    caches (kept here so that a cache evicting them cannot free memory the graph still reads)."""

    graph: "torch.cuda.CUDAGraph"
    static_input: torch.Tensor
    static_output: Dict[str, object]
    cached_tensors: List[torch.Tensor]
    cached_storages: frozenset


def _storage_of(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


class CudaGraphImageEncoder(ImageEncoder):
    """An :class:`~sam2_fast.ImageEncoder` that replays CUDA graphs; made by :func:`capture_cuda_graphs`.

    It holds the same ``trunk`` and ``neck`` modules as the encoder it was made from (parameters shared, not
    copied; the same ``state_dict`` keys), and records and runs that encoder's own ``forward`` (so an encoder from
    :func:`sam2_fast.optimize` keeps its backend and compute dtype), giving the same output dict.
    """

    def __init__(self, encoder: ImageEncoder, max_graphs: int = 8, copy_outputs: bool = True, warmup_calls: int = 2):
        _count_registrations()
        nn.Module.__init__(self)
        self.trunk = encoder.trunk
        self.neck = encoder.neck
        self.scalp = encoder.scalp
        self._encoder_forward = encoder.forward
        self.max_graphs = max_graphs
        self.copy_outputs = copy_outputs
        self.warmup_calls = warmup_calls
        self._graphs: "collections.OrderedDict[Tuple, _CapturedForward]" = collections.OrderedDict()
        self._pool = None
        self._weights_key: Optional[Tuple] = None
        self._registrations_seen = -1
        self._tensors: List[torch.Tensor] = []
        self._cache_sources: List[torch.Tensor] = []
        self._warned_not_captured = False

    @property
    def num_graphs(self) -> int:
        """How many graphs are kept now (at most ``max_graphs``)."""
        return len(self._graphs)

    def reset(self) -> None:
        """Drop every recorded graph and its memory pool; the next call of each shape records again."""
        self._graphs.clear()
        self._pool = None

    # The device type whose inputs are recorded and replayed (the tests swap in a stand-in recorder on CPU).
    capture_device_type = "cuda"

    def forward(self, sample: torch.Tensor) -> Dict[str, object]:
        if not isinstance(sample, torch.Tensor):
            return self._encoder_forward(sample)  # raises the encoder's own error for what it was given
        weights_key, needs_grad = self._weights_state()
        if needs_grad or (torch.is_grad_enabled() and sample.requires_grad):
            raise RuntimeError(
                "capture_cuda_graphs runs inference only: a CUDA graph records no autograd history, but gradients "
                "are enabled and the input or the encoder's parameters require them; call it under "
                "torch.inference_mode() or torch.no_grad() (or freeze the parameters with requires_grad_(False)), "
                "and train with the encoder itself"
            )
        if sample.device.type != self.capture_device_type:
            self._warn_not_captured(sample)
            return self._encoder_forward(sample)
        if weights_key != self._weights_key:
            # Moved or reloaded weights: graphs read parameters by address, and the positional-embedding cache they
            # captured was computed from the old values.
            self.reset()
            self._weights_key = weights_key
        key = self._graph_key(sample)
        captured = self._graphs.get(key)
        if captured is None:
            captured = self._capture(sample)
            self._graphs[key] = captured
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        else:
            self._graphs.move_to_end(key)
        captured.static_input.copy_(sample)
        captured.graph.replay()
        return self._outputs(captured)

    def _warn_not_captured(self, sample: torch.Tensor) -> None:
        if not self._warned_not_captured:
            self._warned_not_captured = True
            warnings.warn(
                f"capture_cuda_graphs: CUDA graphs need CUDA tensors, got a {sample.device} tensor; running the "
                "encoder eagerly",
                stacklevel=3,
            )

    def _weights_state(self) -> Tuple[Tuple, bool]:
        """(what a recorded graph depends on among the weights, whether any parameter needs a gradient now).

        Graphs read the weights by address, so new values written in place (``load_state_dict``, an optimizer step)
        reach them on the next replay. What they cannot follow: weights that live elsewhere (``.to()``, other
        tensors registered as parameters) and caches computed from weights that changed. Hence the key: the
        registration count, where the first and last weights live, and the version of each cache source. (Setting
        one parameter's ``.data`` by hand is not seen: call :meth:`reset` after it.)
        """
        if self._registrations_seen != _registrations[0]:
            self._registrations_seen = _registrations[0]
            self._tensors = list(self.parameters()) + list(self.buffers())
            self._cache_sources = [
                tensor for module in self.modules() if hasattr(module, "cache_sources")
                for tensor in module.cache_sources()
            ]
        key = (
            self._registrations_seen,
            tuple((t.data_ptr(), t.dtype) for t in (self._tensors[:1] + self._tensors[-1:])),
            # An inference tensor has no version counter; the modules do not cache what they compute from one.
            tuple((t.data_ptr(), None if t.is_inference() else t._version) for t in self._cache_sources),
        )
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in self._tensors)
        return key, needs_grad

    def _graph_key(self, sample: torch.Tensor) -> Tuple:
        return (
            tuple(sample.shape), sample.dtype, sample.device,
            torch.is_autocast_enabled(sample.device.type), torch.get_autocast_dtype(sample.device.type),
            torch.is_inference_mode_enabled(), self.training, ops.get_backend(),
        )

    def _capture(self, sample: torch.Tensor) -> _CapturedForward:
        static_input = sample.clone(memory_format=torch.contiguous_format)
        device_type = sample.device.type
        autocast = dict(
            device_type=device_type, dtype=torch.get_autocast_dtype(device_type),
            enabled=torch.is_autocast_enabled(device_type),
            # Autocast's weight-cast cache would hand the graph casts that are freed when the caller's autocast
            # block ends: the graph must cast the weights itself, on every replay.
            cache_enabled=False,
        )

        def run() -> Dict[str, object]:
            with torch.autocast(**autocast):
                return self._encoder_forward(static_input)

        graph, static_output = self._record(run, sample.device)
        cached = [
            tensor for module in self.modules() if hasattr(module, "cached_tensors") for tensor in module.cached_tensors()
        ]
        return _CapturedForward(graph, static_input, static_output, cached, frozenset(_storage_of(t) for t in cached))

    def _record(self, run, device: torch.device):
        """(a CUDA graph of ``run()``, the outputs it writes), after ``warmup_calls`` calls of ``run`` on a side stream
        (Triton kernels compile and the encoder's caches fill before recording; an input the encoder refuses
        raises its error there, before anything is recorded)."""
        side_stream = torch.cuda.Stream(device=device)
        side_stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side_stream):
            for _ in range(self.warmup_calls):
                run()
        torch.cuda.current_stream(device).wait_stream(side_stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            static_output = run()
        return graph, static_output

    def _outputs(self, captured: _CapturedForward) -> Dict[str, object]:
        """The output dict: with ``copy_outputs``, the graph's outputs copied (one copy per distinct tensor, so
        ``vision_features`` stays ``backbone_fpn[-1]``), except the cached position encodings, which no replay
        writes."""
        copies: Dict[int, torch.Tensor] = {}

        def output(tensor: torch.Tensor) -> torch.Tensor:
            if not self.copy_outputs or _storage_of(tensor) in captured.cached_storages:
                return tensor
            if id(tensor) not in copies:
                copies[id(tensor)] = tensor.clone()
            return copies[id(tensor)]

        # Every entry the encoder returns (an optimized transformers encoder adds the trunk's last stage).
        return map_outputs(captured.static_output, output)


def capture_cuda_graphs(
    encoder: nn.Module, max_graphs: int = 8, copy_outputs: bool = True, warmup_calls: int = 2
) -> CudaGraphImageEncoder:
    """Graph-captured inference for a sam2_fast :class:`~sam2_fast.ImageEncoder`, with no compile step.

    On CUDA inputs the returned module records one CUDA graph per (batch, height, width, dtype, autocast state,
    inference mode, train/eval mode, sam2_fast backend) on first use (after ``warmup_calls`` eager calls on a side
    stream, which compile the Triton kernels and fill the encoder's caches) and replays it afterwards. All graphs
    share one memory pool; at most ``max_graphs`` are kept, the least recently used dropped first. Moving or
    reloading the weights drops them all (they are recorded again on the next calls); new values copied into the
    weights in place reach the graphs as they are.

    Outputs: by default each call returns its own copies, valid after later calls. ``copy_outputs=False`` returns
    the graph's static buffers instead (no copy, less memory), which the next call of the same shape overwrites:
    clone what you keep. ``vision_pos_enc`` entries are always the encoder's cached, read-only encodings.

    Inference only: with gradients enabled and the input or a parameter requiring them, a call raises (on every
    device). Replays run on the current stream; do not call one captured encoder from several streams at once. On
    CPU (any non-CUDA input) the module runs the encoder eagerly, with one warning. Every backend works (``sam2_fast.use_backend``);
    the backend is part of the graph key.

        encoder = sam2_fast.build_image_encoder("sam2.1_hiera_base_plus", checkpoint=..., device="cuda")
        fast = sam2_fast.capture_cuda_graphs(encoder)
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            out = fast(images)   # first call of a shape records, later ones replay
    """
    if not isinstance(encoder, ImageEncoder):
        raise TypeError(
            "capture_cuda_graphs expects a sam2_fast.ImageEncoder (from sam2_fast.build_image_encoder, the sam2_fast "
            f"classes or sam2_fast.optimize), got {type(encoder).__module__}.{type(encoder).__qualname__}"
        )
    if isinstance(encoder, CudaGraphImageEncoder):
        raise TypeError("capture_cuda_graphs got an encoder that already replays CUDA graphs")
    if not isinstance(max_graphs, int) or max_graphs < 1:
        raise ValueError(f"max_graphs must be a positive integer, got {max_graphs!r}")
    if not isinstance(warmup_calls, int) or warmup_calls < 1:
        raise ValueError(f"warmup_calls must be a positive integer, got {warmup_calls!r}")
    captured = CudaGraphImageEncoder(encoder, max_graphs=max_graphs, copy_outputs=copy_outputs, warmup_calls=warmup_calls)
    return captured.train(encoder.training)
