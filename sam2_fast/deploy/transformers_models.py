"""sam2_fast inside Hugging Face transformers' SAM-2 models (``Sam2Model``, ``Sam2VideoModel``, ``Sam2VisionModel``).

    model = transformers.Sam2Model.from_pretrained(...)
    sam2_fast.optimize(model)                 # model.vision_encoder's forward now runs sam2_fast's encoder
    model.get_image_embeddings(pixel_values)  # transformers' outputs, within float rounding

The vision encoder (a ``Sam2VisionModel``: the Hiera ``backbone`` and the FPN ``neck``) keeps its modules and
Parameters: ``state_dict`` keys and tensors, ``save_pretrained`` and ``from_pretrained`` are untouched. sam2_fast's
encoder is built from the transformers config and pointed at those very Parameters (the key map is the
"transformers" checkpoint format's, :data:`sam2_fast.io.checkpoint_formats.TRANSFORMERS`); it is kept outside the
module tree (not a submodule, so no new keys), and the vision model's ``forward`` becomes
:class:`TransformersVisionForward`, which calls it and returns transformers' ``Sam2VisionEncoderOutput``.

transformers stays optional: nothing here imports it until a model is handed to :func:`vision_model_of`, and only
if the caller has imported it already (a transformers model cannot exist otherwise).
"""

from __future__ import annotations

import sys
from typing import Dict, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from ..io.checkpoint_formats import TRANSFORMERS
from ..model.hiera import LAYER_NORM_EPS, Hiera
from ..model.image_encoder import FpnNeck
from ..model.position_encoding import PositionEmbeddingSine
from .drop_in import OptimizedImageEncoder, configure, module_tensors, share_tensors

MODEL_CLASSES = ("Sam2Model", "Sam2VideoModel", "Sam2VisionModel")
# What sam2_fast's Hiera fixes and a transformers Sam2HieraDetConfig may set: (name, value sam2_fast needs).
FIXED_BACKBONE_SETTINGS = (
    ("num_channels", 3),
    ("patch_kernel_size", [7, 7]),
    ("patch_stride", [4, 4]),
    ("patch_padding", [3, 3]),
    ("mlp_ratio", 4.0),
    ("hidden_act", "gelu"),
    ("layer_norm_eps", LAYER_NORM_EPS),
)


def _transformers_classes() -> Optional[Dict[str, type]]:
    if "transformers" not in sys.modules:
        return None
    try:
        import transformers
        from transformers.models.sam2.modeling_sam2 import Sam2HieraDetModel, Sam2VisionNeck
    except ImportError:
        return None
    classes = {name: getattr(transformers, name) for name in MODEL_CLASSES}
    classes.update(Sam2HieraDetModel=Sam2HieraDetModel, Sam2VisionNeck=Sam2VisionNeck)
    return classes


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _check_type(module: object, cls: type, where: str) -> None:
    if not isinstance(module, cls):
        raise TypeError(f"sam2_fast.optimize: expected {where} to be {_qualified(cls)}, got "
                        f"{_qualified(type(module))}")


def vision_model_of(model: object) -> Optional[nn.Module]:
    """The ``Sam2VisionModel`` of a transformers SAM-2 model (the model itself, or its ``vision_encoder``); None for
    anything that is not a transformers ``Sam2Model``, ``Sam2VideoModel`` or ``Sam2VisionModel``."""
    classes = _transformers_classes()
    if classes is None:
        return None
    if isinstance(model, classes["Sam2VisionModel"]):
        vision_model = model
    elif isinstance(model, (classes["Sam2Model"], classes["Sam2VideoModel"])):
        vision_model = model.vision_encoder
        _check_type(vision_model, classes["Sam2VisionModel"], f"{type(model).__name__}.vision_encoder")
    else:
        return None
    _check_type(vision_model.backbone, classes["Sam2HieraDetModel"], "the vision model's backbone")
    _check_type(vision_model.neck, classes["Sam2VisionNeck"], "the vision model's neck")
    return vision_model


def _as_list(value) -> object:
    """A config entry as transformers may give it (an int for a square pair, a tuple), in the form compared."""
    if isinstance(value, (list, tuple)):
        return [float(v) if isinstance(v, float) else v for v in value]
    return value


def _geometric(values: Sequence[int], name: str) -> float:
    """The factor by which ``values`` grows per stage, as sam2_fast's Hiera applies it (``int(previous * factor)``);
    raises if no one factor gives them all."""
    if len(values) < 2:
        return 2.0
    factor = values[1] / values[0]
    rebuilt = [values[0]]
    for _ in values[1:]:
        rebuilt.append(int(rebuilt[-1] * factor))
    if rebuilt != list(values):
        raise ValueError(f"sam2_fast.optimize: cannot express the transformers config's {name}={list(values)}: "
                         f"sam2_fast's Hiera grows it by one factor per stage (expected {rebuilt} for factor "
                         f"{factor:g})")
    return factor


def encoder_arguments(vision_model: nn.Module) -> dict:
    """sam2_fast's constructor arguments for a transformers ``Sam2VisionModel``: ``trunk`` (Hiera), ``neck``
    (FpnNeck, position encoding aside), ``position_encoding`` and ``scalp``, read from its configs and modules."""
    backbone, vision = vision_model.backbone.config, vision_model.config
    for name, needed in FIXED_BACKBONE_SETTINGS:
        got = getattr(backbone, name)
        if isinstance(needed, list) and isinstance(got, int):
            got = [got, got]
        if _as_list(got) != needed:
            raise ValueError(f"sam2_fast.optimize: cannot express the transformers config's backbone_config.{name}="
                             f"{got!r}: sam2_fast's Hiera needs {needed!r}")
    stages = list(backbone.blocks_per_stage)
    widths, heads = list(backbone.embed_dim_per_stage), list(backbone.num_attention_heads_per_stage)
    windows = list(backbone.window_size_per_stage)
    for name, values in (("embed_dim_per_stage", widths), ("num_attention_heads_per_stage", heads),
                         ("window_size_per_stage", windows)):
        if len(values) != len(stages):
            raise ValueError(f"sam2_fast.optimize: expected one backbone_config.{name} entry per stage "
                             f"(blocks_per_stage={stages}), got {values}")
    if backbone.hidden_size != widths[0]:
        raise ValueError(f"sam2_fast.optimize: expected backbone_config.hidden_size equal to embed_dim_per_stage[0] "
                         f"({widths[0]}), got {backbone.hidden_size}")
    if list(vision.backbone_channel_list) != widths[::-1]:
        raise ValueError(f"sam2_fast.optimize: expected the vision config's backbone_channel_list to be the "
                         f"backbone's embed_dim_per_stage reversed ({widths[::-1]}), got "
                         f"{list(vision.backbone_channel_list)}")
    if not 1 <= vision.num_feature_levels <= len(stages):
        raise ValueError(f"sam2_fast.optimize: expected num_feature_levels between 1 and the number of stages "
                         f"({len(stages)}), got {vision.num_feature_levels}")
    query_stride = backbone.query_stride
    trunk = dict(
        embed_dim=widths[0],
        num_heads=heads[0],
        # transformers pools q in the first block of stages 1..num_query_pool_stages, as many as there are.
        q_pool=max(0, min(backbone.num_query_pool_stages, len(stages) - 1)),
        q_stride=tuple(query_stride) if isinstance(query_stride, (list, tuple)) else (query_stride, query_stride),
        stages=tuple(stages),
        dim_mul=_geometric(widths, "embed_dim_per_stage"),
        head_mul=_geometric(heads, "num_attention_heads_per_stage"),
        window_pos_embed_bkg_spatial_size=tuple(backbone.window_positional_embedding_background_size),
        window_spec=tuple(windows),
        global_att_blocks=tuple(backbone.global_attention_blocks),
    )
    neck = dict(
        d_model=vision.fpn_hidden_size,
        backbone_channel_list=list(vision.backbone_channel_list),
        kernel_size=vision.fpn_kernel_size,
        stride=vision.fpn_stride,
        padding=vision.fpn_padding,
        # transformers' neck: nearest upsampling, summed, on fpn_top_down_levels.
        fpn_interp_model="nearest",
        fuse_type="sum",
        fpn_top_down_levels=list(vision.fpn_top_down_levels),
    )
    sine = vision_model.neck.position_encoding
    position_encoding = dict(num_pos_feats=2 * sine.num_position_features, temperature=sine.temperature,
                             normalize=sine.normalize, scale=sine.scale if sine.normalize else None)
    # transformers keeps the num_feature_levels finest levels; sam2 drops the `scalp` coarsest.
    scalp = len(vision.backbone_channel_list) - vision.num_feature_levels
    return dict(trunk=trunk, neck=neck, position_encoding=position_encoding, scalp=scalp)


class TransformersImageEncoder(OptimizedImageEncoder):
    """The encoder :func:`install` builds: sam2_fast's, returning also the trunk's last stage (``trunk_output``,
    (B, C, h, w)), which transformers returns as ``last_hidden_state``."""

    def _encode(self, sample: torch.Tensor) -> Dict[str, object]:
        stages = self.trunk(sample)
        return {**self.neck_outputs(stages), "trunk_output": stages[-1]}


def fast_vision_encoder(vision_model: nn.Module) -> TransformersImageEncoder:
    """sam2_fast's encoder for a transformers ``Sam2VisionModel``, on its Parameters (none copied)."""
    arguments = encoder_arguments(vision_model)
    with torch.device("meta"):
        fast = TransformersImageEncoder(
            Hiera(**arguments["trunk"]),
            FpnNeck(PositionEmbeddingSine(**arguments["position_encoding"], warmup_cache=False), **arguments["neck"]),
            scalp=arguments["scalp"],
        )
    share_tensors(TRANSFORMERS.to_sam2(module_tensors(vision_model), prefix=""), fast)
    return fast.train(vision_model.training)


def _selected_hidden_states(selection: Union[bool, int, List[int]], count: int) -> Optional[set]:
    """The indices of the hidden states ``output_hidden_states`` asks for (all for True), None for none."""
    if isinstance(selection, bool) or selection is None:
        return set(range(count)) if selection else None
    indices = [selection] if isinstance(selection, int) else list(selection)
    return {index % count for index in indices if -count <= index < count}


class TransformersVisionForward:
    """What :func:`install` puts in place of a transformers ``Sam2VisionModel``'s ``forward``.

    It takes what that forward takes (``pixel_values``, ``output_hidden_states``, ``return_dict``) and returns its
    ``Sam2VisionEncoderOutput``: ``last_hidden_state`` (B, h, w, C), ``fpn_hidden_states`` and
    ``fpn_position_encoding`` (finest first, (B, C, h, w); the encodings are read-only broadcast views), and with
    ``output_hidden_states`` the input of the first block and every block's output (recorded from an eager run of
    the encoder, even when it was compiled or captured). ``output_attentions`` raises: the fused attention never
    forms the weights. Images are cast as transformers casts them (to the weights' dtype, or with ``optimize``'s
    ``dtype`` to the model's dtype), and outputs come back in that dtype.
    """

    def __init__(self, vision_model: nn.Module, encoder: TransformersImageEncoder, runner: nn.Module,
                 model_dtype: Optional[torch.dtype]):
        self.vision_model = vision_model
        self.encoder = encoder
        self.runner = runner
        self.model_dtype = model_dtype

    def __call__(self, pixel_values: Optional[torch.Tensor] = None, **kwargs):
        from transformers.models.sam2.modeling_sam2 import Sam2VisionEncoderOutput

        config, backbone_config = self.vision_model.config, self.vision_model.backbone.config
        return_dict = kwargs.pop("return_dict", None)
        return_dict = config.return_dict if return_dict is None else return_dict
        output_attentions = kwargs.pop("output_attentions", None)
        if output_attentions or (output_attentions is None and backbone_config.output_attentions):
            raise ValueError(
                "sam2_fast.optimize: output_attentions=True cannot be honoured by a vision encoder optimized by "
                "sam2_fast: its fused attention never forms the attention weights; call without output_attentions "
                "(or with output_attentions=False), or use a model that was not optimized")
        output_hidden_states = kwargs.pop("output_hidden_states", None)
        if output_hidden_states is None:
            output_hidden_states = backbone_config.output_hidden_states
        if kwargs:
            raise TypeError(f"sam2_fast.optimize: the optimized {type(self.vision_model).__name__}.forward takes "
                            f"pixel_values, output_hidden_states, output_attentions=False and return_dict, got also "
                            f"{sorted(kwargs)}")
        if pixel_values is None:
            raise ValueError("You have to specify pixel_values")
        if self.encoder.training != self.vision_model.training:
            self.encoder.train(self.vision_model.training)
        dtype = self.model_dtype or self.encoder.trunk.patch_embed.proj.weight.dtype
        pixel_values = pixel_values.to(dtype)
        count = len(self.encoder.trunk.blocks) + 1
        selected = _selected_hidden_states(output_hidden_states, count)
        if selected is None:
            out, hidden_states = self.runner(pixel_values), None
        else:
            out, recorded = self._recorded(pixel_values)
            hidden_states = [state.to(dtype) if index in selected else None for index, state in enumerate(recorded)]
        last_hidden_state = out["trunk_output"].permute(0, 2, 3, 1)
        if hidden_states is not None and hidden_states[-1] is not None:
            hidden_states[-1] = last_hidden_state  # transformers ties the last one to last_hidden_state
        output = Sam2VisionEncoderOutput(
            last_hidden_state=last_hidden_state,
            fpn_hidden_states=tuple(out["backbone_fpn"]),
            fpn_position_encoding=tuple(out["vision_pos_enc"]),
            hidden_states=None if hidden_states is None else tuple(hidden_states),
        )
        return output if return_dict else output.to_tuple()

    def _recorded(self, pixel_values: torch.Tensor):
        """(the encoder's outputs, [the first block's input, each block's output]) from an eager run (hooks do not
        run in a replayed CUDA graph; ``forward`` rather than ``__call__`` skips an in-place ``compile``)."""
        recorded: List[torch.Tensor] = []
        blocks = self.encoder.trunk.blocks
        # Cloned: the blocks may reuse their input's memory.
        hooks = [blocks[0].register_forward_pre_hook(lambda _, args: recorded.append(args[0].clone()))]
        hooks += [block.register_forward_hook(lambda _, args, output: recorded.append(output.clone()))
                  for block in blocks]
        try:
            out = self.encoder.forward(pixel_values)
        finally:
            for hook in hooks:
                hook.remove()
        return out, recorded


def install(vision_model: nn.Module, *, backend: Optional[str], dtype: Optional[torch.dtype],
            compile: Union[bool, Mapping[str, object]], capture: Union[bool, Mapping[str, object]]) -> None:
    """Make ``vision_model`` (a transformers ``Sam2VisionModel``) compute its forward with sam2_fast's encoder, in
    place, with :func:`sam2_fast.optimize`'s options."""
    encoder = fast_vision_encoder(vision_model)
    model_dtype = encoder.trunk.pos_embed.dtype if dtype is not None else None
    runner = configure(encoder, backend=backend, dtype=dtype, compile=compile, capture=capture)
    # A plain attribute, not a submodule: the model's keys stay transformers' own.
    vision_model.forward = TransformersVisionForward(vision_model, encoder, runner, model_dtype)
