"""The Hiera trunk of SAM-2 (hierarchical ViT with windowed attention), channels-last throughout.

Constructor arguments and state_dict keys are those of `sam2.modeling.backbones.hieradet`, so sam2 configs and
checkpoints load unchanged. The attention, its windowing and the mask-unit pooling go through :mod:`sam2_fast.ops`.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from . import bicubic
from ..gemm import dense
from .. import ops
from .layers import Conv2d, Linear

logger = logging.getLogger(__name__)

LAYER_NORM_EPS = 1e-6


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample while training."""

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True):
        super().__init__()
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
        if keep_prob > 0.0 and self.scale_by_keep:
            mask.div_(keep_prob)
        return x * mask


class MLP(nn.Module):
    """Linear layers with an activation between them (state_dict keys ``layers.{i}``)."""

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int,
        output_dim: int,
        num_layers: int,
        activation: type = nn.ReLU,
        sigmoid_output: bool = False,
    ):
        super().__init__()
        self.num_layers = num_layers
        hidden = [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(Linear(n, k) for n, k in zip([input_dim] + hidden, hidden + [output_dim]))
        self.sigmoid_output = sigmoid_output
        self.act = activation()

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The MLP of ``x``, plus ``residual`` when given (added by the last GEMM where that saves a pass)."""
        exact_gelu = type(self.act) is nn.GELU and self.act.approximate == "none"
        # Unpacked rather than sliced: a slice of a ModuleList builds a new ModuleList on every call.
        *hidden_layers, last = self.layers
        for layer in hidden_layers:
            if exact_gelu:
                x = dense.linear_gelu(x, layer.weight, layer.bias)
            else:
                x = self.act(layer(x))
        if self.sigmoid_output:
            x = torch.sigmoid(last(x))
            return x if residual is None else residual + x
        if residual is None:
            return last(x)
        return dense.linear_add(x, last.weight, last.bias, residual)


class PatchEmbed(nn.Module):
    """Image to patch embedding: a strided convolution, returned channels-last (B, H, W, C)."""

    def __init__(
        self,
        kernel_size: Tuple[int, ...] = (7, 7),
        stride: Tuple[int, ...] = (4, 4),
        padding: Tuple[int, ...] = (3, 3),
        in_chans: int = 3,
        embed_dim: int = 768,
    ):
        super().__init__()
        self.proj = Conv2d(in_chans, embed_dim, kernel_size=kernel_size, stride=stride, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A channels-last image makes the convolution write its output channels-last, so the (B, H, W, C) view
        # below is contiguous (the 3-channel input is cheap to convert).
        return self.proj(x.contiguous(memory_format=torch.channels_last)).permute(0, 2, 3, 1)


class MultiScaleAttention(nn.Module):
    """Multi-head attention on a channels-last map, windowed or global, with optional 2x2 q-pooling.

    ``forward(x, window_size)`` takes the whole (B, H, W, dim) map: the window partition, its zero padding and
    the unpartition happen inside the attention op (``window_size=0`` attends over the whole map, which is also
    what the reference module does with the windows it is given).
    """

    def __init__(self, dim: int, dim_out: int, num_heads: int, q_pool: Optional[nn.Module] = None):
        super().__init__()
        self.dim = dim
        self.dim_out = dim_out
        self.num_heads = num_heads
        self.q_pool = q_pool
        self.qkv = Linear(dim, dim_out * 3)
        self.proj = Linear(dim_out, dim_out)

    def forward(self, x: torch.Tensor, window_size: int = 0, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Attention of ``x``, plus ``residual`` when given (added by the output projection's GEMM)."""
        pool_q = self.q_pool is not None
        if window_size > 0:
            # Where the attention op adds the qkv bias as it reads each token, the GEMM leaves it out and skips a
            # pass over the qkv map (3x the width of x); exact in fp32 only (see dense.adds_in_fp32).
            add_bias = (
                self.qkv.bias is not None
                and dense.adds_in_fp32(x, self.qkv.weight)
                and ops.window_attention_adds_bias(x.device.type)
            )
            qkv = dense.linear(x, self.qkv.weight, None) if add_bias else self.qkv(x)
            out = ops.window_attention(qkv, self.qkv.bias, self.num_heads, window_size, pool_q, add_bias)
        else:
            qkv = self.qkv(x)
            out = ops.global_attention(qkv, self.num_heads, pool_q)
        if residual is None:
            return self.proj(out)
        return dense.linear_add(out, self.proj.weight, self.proj.bias, residual)


def _check_q_stride(q_stride) -> None:
    if q_stride is not None and tuple(q_stride) != (2, 2):
        raise NotImplementedError(f"sam2_fast pools with q_stride (2, 2) only, as every SAM-2 config does; got {q_stride}")


# On CPU a block runs over bands of about this many tokens (whole window rows; token chunks for the MLP of a global
# block), so that a band's qkv, attention output and MLP activations (3-4x the width of the map) stay in cache and
# no full-map buffer of that width is ever allocated, page-faulted in and swept through memory.
CPU_BAND_TOKENS = 4096


class MultiScaleBlock(nn.Module):
    """One Hiera block: norm, (windowed) attention with optional q-pooling, residual, norm, MLP, residual."""

    def __init__(
        self,
        dim: int,
        dim_out: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        norm_layer: Union[nn.Module, str] = "LayerNorm",
        q_stride: Optional[Tuple[int, int]] = None,
        act_layer: type = nn.GELU,
        window_size: int = 0,
        activation_checkpointing: bool = False,
    ):
        super().__init__()
        _check_q_stride(q_stride)
        if isinstance(norm_layer, str):
            norm_layer = partial(getattr(nn, norm_layer), eps=LAYER_NORM_EPS)
        self.dim = dim
        self.dim_out = dim_out
        self.norm1 = norm_layer(dim)
        self.window_size = window_size
        self.pool, self.q_stride = None, q_stride
        if self.q_stride:
            self.pool = nn.MaxPool2d(kernel_size=q_stride, stride=q_stride, ceil_mode=False)
        self.attn = MultiScaleAttention(dim, dim_out, num_heads=num_heads, q_pool=self.pool)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim_out)
        self.mlp = MLP(dim_out, int(dim_out * mlp_ratio), dim_out, num_layers=2, activation=act_layer)
        if dim != dim_out:
            self.proj = Linear(dim, dim_out)
        # Not a module argument of the reference: a training option (see set_activation_checkpointing).
        self.activation_checkpointing = activation_checkpointing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._records_gradients(x):
            # Autograd needs the whole map's activations: the bands would each keep their own graph and the backward
            # would scatter every band's gradient into a full-size zero map.
            if self.activation_checkpointing:
                # Keeps only x; the backward reruns the block, with the same stochastic-depth masks (the RNG state
                # is saved and restored).
                return checkpoint(self._forward_map, x, use_reentrant=False)
            return self._forward_map(x)
        if x.device.type != "cpu" or torch.compiler.is_compiling() or self._stochastic_depth():
            return self._forward_map(x)
        return self._forward_in_bands(x)

    def _records_gradients(self, x: torch.Tensor) -> bool:
        return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))

    def _stochastic_depth(self) -> bool:
        return self.training and not isinstance(self.drop_path, nn.Identity)

    def _attention_half(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.dim != self.dim_out:
            shortcut = self.proj(x)
            if self.pool is not None:
                shortcut = ops.maxpool2x2(shortcut)
        if self._stochastic_depth():
            return shortcut + self.drop_path(self.attn(x, self.window_size))
        # Without stochastic depth each residual add is folded into the GEMM that ends its branch.
        return self.attn(x, self.window_size, residual=shortcut)

    def _mlp_half(self, x: torch.Tensor) -> torch.Tensor:
        if self._stochastic_depth():
            return x + self.drop_path(self.mlp(self.norm2(x)))
        return self.mlp(self.norm2(x), residual=x)

    def _forward_map(self, x: torch.Tensor) -> torch.Tensor:
        return self._mlp_half(self._attention_half(x))

    def _forward_in_bands(self, x: torch.Tensor) -> torch.Tensor:
        """The block over bands of about CPU_BAND_TOKENS tokens, each written into the output as it is done."""
        batch, height, width, _ = x.shape
        if self.window_size == 0:
            # Global attention needs the whole map; its MLP half goes over chunks of tokens.
            x = self._attention_half(x)
            tokens = x.reshape(-1, x.shape[-1])
            if tokens.shape[0] <= CPU_BAND_TOKENS:
                return self._mlp_half(x)
            out = torch.empty_like(tokens)
            for start in range(0, tokens.shape[0], CPU_BAND_TOKENS):
                out[start : start + CPU_BAND_TOKENS].copy_(self._mlp_half(tokens[start : start + CPU_BAND_TOKENS]))
            return out.view(x.shape)
        # Bands of whole window rows of one image: no window straddles two bands, the last band's padding is the
        # map's, and with q-pooling each (even) band pools to exactly its half of the output rows.
        band_rows = self.window_size * max(1, CPU_BAND_TOKENS // (self.window_size * width))
        if batch == 1 and band_rows >= height:
            return self._forward_map(x)
        stride = 2 if self.pool is not None else 1
        out = None
        for image in range(batch):
            for top in range(0, height, band_rows):
                band = self._forward_map(x[image : image + 1, top : top + band_rows])
                if out is None:
                    out = band.new_empty(batch, height // stride, width // stride, band.shape[-1])
                out[image : image + 1, top // stride : top // stride + band.shape[1]].copy_(band)
        return out


class Hiera(nn.Module):
    """SAM-2's Hiera trunk; returns the output of each stage (finest first) as (B, C, h, w) views.

    Takes the reference's arguments, plus ``activation_checkpointing`` (default off): recompute each block in the
    backward instead of keeping its activations (see :func:`set_activation_checkpointing`).
    """

    def __init__(
        self,
        embed_dim: int = 96,
        num_heads: int = 1,
        drop_path_rate: float = 0.0,
        q_pool: int = 3,
        q_stride: Tuple[int, int] = (2, 2),
        stages: Tuple[int, ...] = (2, 3, 16, 3),
        dim_mul: float = 2.0,
        head_mul: float = 2.0,
        window_pos_embed_bkg_spatial_size: Tuple[int, int] = (14, 14),
        window_spec: Tuple[int, ...] = (8, 4, 14, 7),
        global_att_blocks: Tuple[int, ...] = (12, 16, 20),
        weights_path: Optional[str] = None,
        return_interm_layers: bool = True,
        activation_checkpointing: bool = False,
    ):
        super().__init__()
        if len(stages) != len(window_spec):
            raise ValueError(f"stages and window_spec need one entry per stage, got {stages} and {window_spec}")
        self.window_spec = window_spec
        depth = sum(stages)
        self.q_stride = q_stride
        self.stage_ends = [sum(stages[:i]) - 1 for i in range(1, len(stages) + 1)]
        if not 0 <= q_pool <= len(self.stage_ends) - 1:
            raise ValueError(f"q_pool must be between 0 and {len(self.stage_ends) - 1}, got {q_pool}")
        self.q_pool_blocks = [end + 1 for end in self.stage_ends[:-1]][:q_pool]
        self.return_interm_layers = return_interm_layers
        self.patch_embed = PatchEmbed(embed_dim=embed_dim)
        self.global_att_blocks = global_att_blocks
        self.window_pos_embed_bkg_spatial_size = window_pos_embed_bkg_spatial_size
        self.pos_embed = nn.Parameter(torch.zeros(1, embed_dim, *window_pos_embed_bkg_spatial_size))
        self.pos_embed_window = nn.Parameter(torch.zeros(1, embed_dim, window_spec[0], window_spec[0]))

        # On the CPU whatever the default device (a skeleton built on "meta" still reads its rates).
        drop_path_rates = [rate.item() for rate in torch.linspace(0, drop_path_rate, depth, device="cpu")]
        cur_stage = 1
        self.blocks = nn.ModuleList()
        for i in range(depth):
            dim_out = embed_dim
            # The first block of a stage still uses the previous stage's window size (it pools q inside it).
            window_size = self.window_spec[cur_stage - 1]
            if self.global_att_blocks is not None and i in self.global_att_blocks:
                window_size = 0
            if i - 1 in self.stage_ends:
                dim_out = int(embed_dim * dim_mul)
                num_heads = int(num_heads * head_mul)
                cur_stage += 1
            self.blocks.append(
                MultiScaleBlock(
                    dim=embed_dim,
                    dim_out=dim_out,
                    num_heads=num_heads,
                    drop_path=drop_path_rates[i],
                    q_stride=self.q_stride if i in self.q_pool_blocks else None,
                    window_size=window_size,
                    activation_checkpointing=activation_checkpointing,
                )
            )
            embed_dim = dim_out

        self.channel_list = (
            [self.blocks[i].dim_out for i in self.stage_ends[::-1]]
            if return_interm_layers
            else [self.blocks[-1].dim_out]
        )
        self._pos_embed_cache: dict = {}
        if weights_path is not None:
            state = torch.load(weights_path, map_location="cpu", weights_only=True)
            logger.info("loading Hiera weights from %s: %s", weights_path, self.load_state_dict(state, strict=False))

    @property
    def input_multiple(self) -> int:
        """Input H and W must be multiples of this: the patch stride (4) times the pos-embed window tile."""
        return 4 * self.window_spec[0]

    def _pos_embed_takes_gradients(self) -> bool:
        return torch.is_grad_enabled() and self.pos_embed.requires_grad

    def _compute_pos_embed(self, hw: Tuple[int, int]) -> torch.Tensor:
        if self._pos_embed_takes_gradients() and not torch.compiler.is_compiling():
            # Eager training: as two matrix products, whose backward is far quicker than ATen's bicubic backward.
            pos_embed = bicubic.resize(self.pos_embed, hw)
        else:
            pos_embed = F.interpolate(self.pos_embed, size=hw, mode="bicubic")
        window_embed = self.pos_embed_window
        pos_embed = pos_embed + window_embed.tile([x // y for x, y in zip(pos_embed.shape, window_embed.shape)])
        return pos_embed.permute(0, 2, 3, 1)

    def _get_pos_embed(self, hw: Tuple[int, int]) -> torch.Tensor:
        """The (1, h, w, C) positional embedding; cached for inference, recomputed while it can take gradients."""
        if torch.compiler.is_compiling() or self._pos_embed_takes_gradients():
            return self._compute_pos_embed(hw)
        if self.pos_embed.is_inference() or self.pos_embed_window.is_inference():
            # Weights created under torch.inference_mode have no version counter, so a cache could not see them
            # change in place: computed per call, as the reference does.
            return self._compute_pos_embed(hw)
        # The versions change on in-place updates (load_state_dict, optimizer steps), the data pointers on .to().
        key = (
            tuple(hw), self.pos_embed.device, self.pos_embed.data_ptr(), self.pos_embed._version,
            self.pos_embed_window.data_ptr(), self.pos_embed_window._version, self.pos_embed.dtype,
        )
        cached = self._pos_embed_cache.get(key)
        if cached is None:
            with torch.no_grad():
                cached = self._compute_pos_embed(hw).contiguous()
            self._pos_embed_cache.clear()
            self._pos_embed_cache[key] = cached
        return cached

    def cached_tensors(self) -> List[torch.Tensor]:
        """The positional embedding kept from the last call (a captured CUDA graph reads it)."""
        return list(self._pos_embed_cache.values())

    def cache_sources(self) -> List[torch.Tensor]:
        """The parameters the cached positional embedding is computed from."""
        return [self.pos_embed, self.pos_embed_window]

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a clear error for an image batch this trunk cannot encode."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor image batch of shape (B, 3, H, W), got {type(x).__name__}")
        weight = self.patch_embed.proj.weight
        in_chans = weight.shape[1]
        multiple = self.input_multiple
        if x.dim() != 4 or x.shape[1] != in_chans:
            raise ValueError(f"expected input of shape (B, {in_chans}, H, W), got {tuple(x.shape)}")
        height, width = x.shape[2], x.shape[3]
        if x.shape[0] == 0 or height <= 0 or width <= 0 or height % multiple or width % multiple:
            raise ValueError(
                f"expected input of shape (B, {in_chans}, H, W) with B >= 1 and H, W positive multiples of {multiple}, "
                f"got {tuple(x.shape)}: the patch embedding divides H and W by 4 and the windowed positional "
                f"embedding is tiled in whole {self.window_spec[0]}x{self.window_spec[0]} windows over that map "
                f"(resize or pad the image, e.g. to {max(multiple, -(-height // multiple) * multiple)}x"
                f"{max(multiple, -(-width // multiple) * multiple)})"
            )
        if x.device != weight.device:
            raise ValueError(f"expected input on {weight.device} (where the encoder's weights are), got {x.device}")
        if not x.is_floating_point():
            raise TypeError(
                f"expected a floating-point input (normalised image), got {x.dtype}; convert with x.float() "
                "and normalise as SAM-2 does"
            )
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(
                f"expected input of dtype {weight.dtype} (the encoder's weights), got {x.dtype}: cast the input, "
                f"or the encoder with encoder.to({x.dtype}), or run under torch.autocast"
            )

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        self.check_input(x)
        x = self.patch_embed(x)
        pos_embed = self._get_pos_embed(x.shape[1:3])
        # In place on the patch embedding's fresh output (its convolution's backward does not need it), unless the
        # sum promotes (a bf16 embedding under autocast plus the fp32 table is fp32, as in the reference) or autograd
        # records it (an in-place add on that permuted view would cost the backward a copy of the map).
        in_place = x.dtype == pos_embed.dtype and not (torch.is_grad_enabled() and x.requires_grad)
        x = x.add_(pos_embed) if in_place else x + pos_embed
        outputs = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i == self.stage_ends[-1] or (i in self.stage_ends and self.return_interm_layers):
                outputs.append(x.permute(0, 3, 1, 2))
        return outputs

    def get_layer_id(self, layer_name: str) -> int:
        num_layers = self.get_num_layers()
        if "rel_pos" in layer_name:
            return num_layers + 1
        if "pos_embed" in layer_name or "patch_embed" in layer_name:
            return 0
        if "blocks" in layer_name:
            return int(layer_name.split("blocks")[1].split(".")[1]) + 1
        return num_layers + 1

    def get_num_layers(self) -> int:
        return len(self.blocks)


def set_activation_checkpointing(module: nn.Module, enabled: bool = True) -> nn.Module:
    """Switch activation checkpointing on (or off) for every Hiera block in ``module`` (an encoder, a trunk, or a
    model holding one), returning ``module``.

    While gradients are recorded, a checkpointed block keeps only its input and recomputes its activations in the
    backward: fine-tuning at 1024x1024 then holds about one block's activations at a time instead of every block's,
    for one extra forward of the trunk. Outputs, gradients and stochastic-depth masks are unchanged; inference (no
    gradient recorded) is not affected.
    """
    blocks = [block for block in module.modules() if isinstance(block, MultiScaleBlock)]
    if not blocks:
        raise ValueError(f"set_activation_checkpointing: {type(module).__name__} holds no sam2_fast Hiera block")
    for block in blocks:
        block.activation_checkpointing = enabled
    return module
