"""What gets run: encoders with one set of seeded weights, seeded inputs, per-op workloads, and one callable per
implementation.

Every implementation of a case is called on the same input tensors. The per-op ``reference`` is the `sam2`
package's own sequence for that step (``window_partition``, ``do_pool``, SDPA, ``window_unpartition``, the neck's
``F.interpolate`` + add), started from the same tensors the sam2_fast op takes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import sam2_fast
from sam2_fast.backends import shapes as op_shapes, torch_ops
from sam2_fast import ops
from sam2_fast.testing.reference import build_reference_encoder
from sam2_fast.testing.weights import seeded_state as _seeded_state

from .matrix import Impl

REPO_ROOT = Path(__file__).resolve().parents[1]
INPUT_SEED = 1234
OP_INPUT_SEED = 4321


def seeded_state(config: str) -> Dict[str, torch.Tensor]:
    """The seeded fp32 state_dict the parity tests use (sam2_fast.testing.weights), loaded into every encoder."""
    return _seeded_state(sam2_fast.get_config(config).name)


def short_name(config: str) -> str:
    """``sam2.1_hiera_base_plus`` -> ``base_plus``."""
    return sam2_fast.get_config(config).name.rpartition("_hiera_")[2]


def seeded_image(batch: int, image_size: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(INPUT_SEED)
    return torch.randn(batch, 3, image_size, image_size, generator=generator).to(device)


def build_encoder(config: str, reference: bool, dtype: str, device: torch.device) -> nn.Module:
    """The reference or our encoder with the seeded weights, cast to bf16 for dtype ``bf16``, in eval mode."""
    # Our encoder's constructor initialises from the global RNG: in a fork of it, so that building leaves the
    # caller's draws as they were (the values are replaced by the seeded state anyway).
    with torch.random.fork_rng(devices=[]):
        model = build_reference_encoder(config) if reference else sam2_fast.build_image_encoder(config)
    model.load_state_dict(seeded_state(config))
    return model.to(device=device, dtype=torch.bfloat16 if dtype == "bf16" else None).eval()


COMPILE_MODE_ENV_VAR = "SAM2_FAST_BENCH_COMPILE_MODE"
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_mode(device_type: str) -> str:
    """The ``torch.compile`` mode of the ``+compile`` implementations: ``SAM2_FAST_BENCH_COMPILE_MODE`` if set,
    else ``sam2``'s own fast path on GPU (max-autotune) and inductor's default mode on CPU, where max-autotune only
    adds minutes of tuning. (On a GPU, max-autotune of base_plus took over 5 minutes for the reference alone.)"""
    mode = os.environ.get(COMPILE_MODE_ENV_VAR) or ("max-autotune" if device_type == "cuda" else "default")
    if mode not in COMPILE_MODES:
        raise ValueError(f"{COMPILE_MODE_ENV_VAR}={mode!r}: expected one of {', '.join(COMPILE_MODES)}")
    return mode


def compile_fn(fn: Callable, device: torch.device) -> Callable:
    """``fn`` under ``torch.compile(fullgraph=True, dynamic=False)`` in :func:`compile_mode`'s mode."""
    _raise_recompile_limit()
    mode = compile_mode(device.type)
    return torch.compile(fn, mode=None if mode == "default" else mode, fullgraph=True, dynamic=False)


def _raise_recompile_limit() -> None:
    # Each (size, batch, dtype, backend) is its own static graph; dynamo's default of 8 would silently fall back
    # to eager on a wide matrix.
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), 512))


def run_context(impl: Impl, dtype: str, device: torch.device):
    """no_grad, the impl's sam2_fast backend, and bf16 autocast where asked."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.no_grad())
    if impl.backend is not None:
        stack.enter_context(sam2_fast.use_backend(impl.backend))
    if dtype == "bf16-autocast":
        stack.enter_context(torch.autocast(device.type, dtype=torch.bfloat16))
    return stack


class EncoderSet:
    """The encoders of one (config, dtype): one reference, one sam2_fast encoder shared by the eager backends,
    and one module per compiled or captured implementation, all with the same weights."""

    def __init__(self, config: str, dtype: str, device: torch.device):
        self.config, self.dtype, self.device = config, dtype, device
        self._modules: Dict[Tuple, nn.Module] = {}
        self._callables: Dict[Impl, Callable] = {}

    def _module(self, impl: Impl) -> nn.Module:
        key = (impl.is_reference, impl.name if impl.compiled or impl.captured else None)
        if key not in self._modules:
            self._modules[key] = build_encoder(self.config, impl.is_reference, self.dtype, self.device)
        return self._modules[key]

    def callable(self, impl: Impl) -> Callable[[torch.Tensor], dict]:
        """``fn(image) -> output dict``; compiled impls compile, captured ones record, on their first call (per
        input shape)."""
        if impl not in self._callables:
            module = self._module(impl)
            if impl.compiled:
                forward = compile_fn(module, self.device)
            elif impl.captured:
                forward = sam2_fast.capture_cuda_graphs(module)
            else:
                forward = module

            def run(image, forward=forward, impl=impl):
                with run_context(impl, self.dtype, self.device):
                    return forward(image)

            self._callables[impl] = run
        return self._callables[impl]

    def memory_callable(self, impl: Impl) -> Callable[[torch.Tensor], dict]:
        """``fn(image)`` whose peak memory is the impl's: its callable, except for a captured impl, whose graphs
        hold their memory pool between calls: there each call records anew (warm-up calls, capture, replay), so
        the peak covers the pool."""
        if not impl.captured:
            return self.callable(impl)
        module = self._module(impl)

        def run(image):
            with run_context(impl, self.dtype, self.device):
                return sam2_fast.capture_cuda_graphs(module)(image)

        return run

    def input_for(self, image: torch.Tensor) -> torch.Tensor:
        """The shared fp32 image in this set's input dtype (cast once, then shared by every impl)."""
        return image.to(torch.bfloat16) if self.dtype == "bf16" else image


def feature_outputs(output: dict) -> List[Tuple[str, torch.Tensor]]:
    """The image-dependent outputs: ``backbone_fpn`` levels (``vision_features`` is the last one)."""
    return [(f"backbone_fpn[{i}]", t) for i, t in enumerate(output["backbone_fpn"])]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|: the worst error relative to the output's magnitude."""
    expected = expected.detach().double()
    return ((actual.detach().double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def worst_relative_error(actual: List[Tuple[str, torch.Tensor]], expected: List[Tuple[str, torch.Tensor]]):
    """(worst relative error over outputs, its name)."""
    errors = [(relative_error(a, e), name) for (name, a), (_, e) in zip(actual, expected)]
    return max(errors)


# ------------------------------------------------------------------------------------------------------------
# The sam2 package's sequence for each op, from the same inputs as the sam2_fast op.

def _sam2_attention(qkv: torch.Tensor, num_heads: int, q_pool: bool) -> torch.Tensor:
    """``sam2``'s MultiScaleAttention.forward between its two linears, on a (N, h, w, 3 * dim) qkv map."""
    from sam2.modeling.backbones.hieradet import do_pool

    batch, height, width, _ = qkv.shape
    qkv = qkv.reshape(batch, height * width, 3, num_heads, -1)
    q, k, v = torch.unbind(qkv, 2)
    if q_pool:
        q = do_pool(q.reshape(batch, height, width, -1), _sam2_max_pool())
        height, width = q.shape[1:3]
        q = q.reshape(batch, height * width, num_heads, -1)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).reshape(batch, height, width, -1)


@functools.lru_cache(maxsize=1)
def _sam2_max_pool() -> nn.Module:
    return nn.MaxPool2d(kernel_size=(2, 2), stride=(2, 2), ceil_mode=False)


def sam2_window_attention(qkv, qkv_bias, num_heads: int, window_size: int, q_pool: bool) -> torch.Tensor:
    """sam2's windowed block between norm1 and the output projection: pad, partition, attention, unpartition."""
    from sam2.modeling.backbones.utils import window_partition, window_unpartition

    batch, height, width, channels3 = qkv.shape
    pad_h = (window_size - height % window_size) % window_size
    pad_w = (window_size - width % window_size) % window_size
    if pad_h or pad_w:
        # sam2 zero-pads the normed input before the qkv linear, so a padded token's qkv is the bias. Building
        # that map costs what window_partition's F.pad costs.
        padded = qkv_bias.to(qkv.dtype).expand(batch, height + pad_h, width + pad_w, channels3).clone()
        padded[:, :height, :width] = qkv
        qkv = padded
    windows, pad_hw = window_partition(qkv, window_size)
    out = _sam2_attention(windows, num_heads, q_pool)
    if q_pool:
        window_size //= 2
        height, width = height // 2, width // 2
        pad_hw = (
            height + (window_size - height % window_size) % window_size,
            width + (window_size - width % window_size) % window_size,
        )
    return window_unpartition(out, window_size, pad_hw, (height, width))


def sam2_global_attention(qkv, num_heads: int, q_pool: bool) -> torch.Tensor:
    return _sam2_attention(qkv, num_heads, q_pool)


def sam2_maxpool2x2(x: torch.Tensor) -> torch.Tensor:
    from sam2.modeling.backbones.hieradet import do_pool

    return do_pool(x, _sam2_max_pool())


def sam2_fpn_upsample_add(lateral: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """sam2 FpnNeck's top-down step with fpn_interp_model="nearest", fuse_type="sum"."""
    top_down = F.interpolate(prev.to(dtype=torch.float32), scale_factor=2.0, mode="nearest", align_corners=None,
                             antialias=False)
    return lateral + top_down


SAM2_OPS = {
    "window_attention": sam2_window_attention,
    "global_attention": sam2_global_attention,
    "maxpool2x2": sam2_maxpool2x2,
    "fpn_upsample_add": sam2_fpn_upsample_add,
}
BENCH_OPS = tuple(SAM2_OPS)


@dataclasses.dataclass
class OpCase:
    """One op at one site of the encoder: its inputs and its cost.

    ``flops`` counts the attention matmuls (QK^T and PV, 2 per multiply-add, over padded windows, as computed);
    ``bytes_moved`` the compulsory traffic of a memory-bound op (each input read once, the output written once).
    """

    op: str
    site: str
    shape: str
    tensors: Tuple[torch.Tensor, ...]
    params: Tuple
    flops: Optional[float] = None
    bytes_moved: Optional[float] = None

    @property
    def args(self) -> Tuple:
        return self.tensors + self.params

    def fp32_args(self) -> Tuple:
        return tuple(t.float() for t in self.tensors) + self.params


def _window_flops(batch, height, width, window_size, num_heads, head_dim, q_pool) -> float:
    windows = batch * -(-height // window_size) * -(-width // window_size)
    keys = window_size * window_size
    queries = op_shapes.queries_per_window(window_size, q_pool)
    return 4.0 * windows * num_heads * queries * keys * head_dim


def _global_flops(batch, height, width, num_heads, head_dim, q_pool) -> float:
    keys = height * width
    queries = (height // 2) * (width // 2) if q_pool else keys
    return 4.0 * batch * num_heads * queries * keys * head_dim


def op_cases(config: str, image_size: int, batch: int, dtype: torch.dtype, device: torch.device,
             ops_wanted=BENCH_OPS) -> List[OpCase]:
    """Representative sites of each op in config's encoder at ``image_size``, with seeded inputs.

    window_attention: stage 1 (the largest map), the stage-2 q-pool block (previous stage's window, pooled q),
    stage 3 (window 14/16, padded at most sizes); global_attention: a stage-3 global block; maxpool2x2: the
    stage-2 shortcut pooling; fpn_upsample_add: level 1 (bf16/fp32 lateral plus the fp32 level-2 map).
    """
    spec = sam2_fast.get_config(config)
    generator = torch.Generator().manual_seed(OP_INPUT_SEED)

    def randn(*shape, dtype=dtype):
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    stage_hw = [image_size // 4 // 2**stage for stage in range(4)]
    stage_dim = [spec.embed_dim * 2**stage for stage in range(4)]
    stage_heads = [spec.num_heads * 2**stage for stage in range(4)]
    cases: List[OpCase] = []
    window_sites = (
        ("stage1", stage_hw[0], stage_dim[0], stage_heads[0], spec.window_spec[0], False),
        ("stage2 q-pool", stage_hw[0], stage_dim[1], stage_heads[1], spec.window_spec[0], True),
        ("stage3", stage_hw[2], stage_dim[2], stage_heads[2], spec.window_spec[2], False),
    )
    if "window_attention" in ops_wanted:
        for site, hw, dim, heads, window_size, q_pool in window_sites:
            qkv, bias = randn(batch, hw, hw, 3 * dim), randn(3 * dim)
            cases.append(OpCase(
                "window_attention", site, f"qkv {batch}x{hw}x{hw}x{3 * dim}, heads {heads}, window {window_size}",
                (qkv, bias), (heads, window_size, q_pool),
                flops=_window_flops(batch, hw, hw, window_size, heads, dim // heads, q_pool),
            ))
    if "global_attention" in ops_wanted:
        hw, dim, heads = stage_hw[2], stage_dim[2], stage_heads[2]
        cases.append(OpCase(
            "global_attention", "stage3", f"qkv {batch}x{hw}x{hw}x{3 * dim}, heads {heads}",
            (randn(batch, hw, hw, 3 * dim),), (heads, False),
            flops=_global_flops(batch, hw, hw, heads, dim // heads, False),
        ))
    if "maxpool2x2" in ops_wanted:
        hw, dim = stage_hw[0], stage_dim[1]
        x = randn(batch, hw, hw, dim)
        out_bytes = batch * (hw // 2) ** 2 * dim * x.element_size()
        cases.append(OpCase("maxpool2x2", "stage2 shortcut", f"x {batch}x{hw}x{hw}x{dim}", (x,), (),
                            bytes_moved=x.numel() * x.element_size() + out_bytes))
    if "fpn_upsample_add" in ops_wanted:
        hw, d_model = stage_hw[1], spec.d_model
        lateral, prev = randn(batch, d_model, hw, hw), randn(batch, d_model, hw // 2, hw // 2, dtype=torch.float32)
        out_bytes = lateral.numel() * torch.promote_types(lateral.dtype, torch.float32).itemsize
        cases.append(OpCase(
            "fpn_upsample_add", "level1", f"lateral {batch}x{d_model}x{hw}x{hw}, prev {hw // 2}x{hw // 2} fp32",
            (lateral, prev), (),
            bytes_moved=lateral.numel() * lateral.element_size() + prev.numel() * prev.element_size() + out_bytes,
        ))
    return cases


def op_callable(case: OpCase, impl: Impl, device: torch.device) -> Callable[[], torch.Tensor]:
    """``fn() -> output`` running ``case`` with ``impl`` (the sam2 sequence for the reference)."""
    fn = SAM2_OPS[case.op] if impl.is_reference else getattr(ops, case.op)
    if impl.compiled:
        fn = compile_fn(fn, device)
    args = case.args

    def run():
        with torch.no_grad(), (contextlib.nullcontext() if impl.is_reference else sam2_fast.use_backend(impl.backend)):
            return fn(*args)

    return run


def op_expected(case: OpCase) -> torch.Tensor:
    """The op in fp32 by sam2_fast's plain-PyTorch reference implementation, for the error column."""
    with torch.no_grad():
        return getattr(torch_ops, case.op)(*case.fp32_args())
