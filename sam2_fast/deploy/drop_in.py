"""sam2_fast inside a whole SAM-2 model: :func:`optimize` swaps a built model's image encoder for ours, in place,
sharing its weights.

    model = build_sam2("configs/sam2.1/sam2.1_hiera_b+.yaml", "sam2.1_hiera_base_plus.pt")
    sam2_fast.optimize(model)                 # or a SAM2ImagePredictor / SAM2VideoPredictor
    model.forward_image(images)               # the reference's outputs, from sam2_fast's encoder

Hugging Face transformers' ``Sam2Model``, ``Sam2VideoModel`` and ``Sam2VisionModel`` are handled in
:mod:`sam2_fast.deploy.transformers_models` (imported only when such a model is passed).

Our encoder is built from the reference encoder's own hyperparameters (read off the built modules, so any
config works, not only the named ones), and its parameters are then pointed at the reference's Parameter
objects: nothing is copied, and the model's state_dict, checkpoints and optimizers see the same tensors.
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Union

import torch
import torch.nn as nn

from .. import ops
from .capture import capture_cuda_graphs
from ..model.hiera import Hiera
from ..model.image_encoder import FpnNeck, ImageEncoder, map_outputs
from ..model.position_encoding import PositionEmbeddingSine

EXPECTED_MODEL = (
    "a SAM-2 model (sam2.modeling.sam2_base.SAM2Base, as built by sam2.build_sam.build_sam2 or "
    "build_sam2_video_predictor, or a SAM2VideoPredictor) or a predictor holding one in .model "
    "(sam2.sam2_image_predictor.SAM2ImagePredictor), or a Hugging Face transformers SAM-2 model "
    "(transformers.Sam2Model, Sam2VideoModel or Sam2VisionModel)"
)
# torch.compile arguments for ``compile=True``: one graph per input shape, no graph breaks (none are needed).
DEFAULT_COMPILE_OPTIONS = {"fullgraph": True, "dynamic": False}


class OptimizedImageEncoder(ImageEncoder):
    """sam2_fast's :class:`ImageEncoder` as :func:`optimize` installs it: it may run on a fixed backend, and in
    another dtype than the rest of the model.

    ``backend``: the op backend its forward runs on (None: the process-wide one, see :func:`sam2_fast.set_backend`).
    ``compute_dtype``: the dtype of its weights and computation (None: whatever its weights are); images come in
    and outputs go out in the caller's dtype, so the rest of the model is unaffected.
    """

    backend: Optional[str] = None
    compute_dtype: Optional[torch.dtype] = None

    def forward(self, sample: torch.Tensor) -> Dict[str, object]:
        if self.backend is None:
            return self._forward_in_compute_dtype(sample)
        with ops.use_backend(self.backend):
            return self._forward_in_compute_dtype(sample)

    def _forward_in_compute_dtype(self, sample: torch.Tensor) -> Dict[str, object]:
        if self.compute_dtype is None or sample.dtype == self.compute_dtype:
            return self._encode(sample)
        return map_outputs(self._encode(sample.to(self.compute_dtype)), lambda tensor: tensor.to(sample.dtype))

    def _encode(self, sample: torch.Tensor) -> Dict[str, object]:
        """The output dict, in the dtype of ``sample``; a subclass may add entries (tensors or lists of them)."""
        return super().forward(sample)


def _reference_classes() -> Mapping[str, type]:
    """sam2's encoder classes by role, and ours (a model built from sam2_fast's yaml configs has ours)."""
    classes = {"encoder": (ImageEncoder,), "trunk": (Hiera,), "neck": (FpnNeck,),
               "position_encoding": (PositionEmbeddingSine,)}
    try:
        from sam2.modeling.backbones.hieradet import Hiera as ReferenceHiera
        from sam2.modeling.backbones.image_encoder import FpnNeck as ReferenceFpnNeck
        from sam2.modeling.backbones.image_encoder import ImageEncoder as ReferenceImageEncoder
        from sam2.modeling.position_encoding import PositionEmbeddingSine as ReferencePositionEmbeddingSine
    except ImportError:
        return classes
    return {"encoder": (ReferenceImageEncoder, ImageEncoder), "trunk": (ReferenceHiera, Hiera),
            "neck": (ReferenceFpnNeck, FpnNeck), "position_encoding": (ReferencePositionEmbeddingSine, PositionEmbeddingSine)}


def _check_type(module: object, role: str, where: str, classes: Mapping[str, type]) -> None:
    if not isinstance(module, classes[role]):
        expected = " or ".join(f"{c.__module__}.{c.__qualname__}" for c in classes[role])
        raise TypeError(f"sam2_fast.optimize: expected {where} to be {expected}, got {type(module).__module__}."
                        f"{type(module).__qualname__}")


def _trunk_arguments(trunk: nn.Module) -> dict:
    """The constructor arguments of a built Hiera trunk (sam2's or ours), read off its modules."""
    stage_ends = list(trunk.stage_ends)
    stages = tuple(end - start for start, end in zip([-1] + stage_ends[:-1], stage_ends))
    blocks = trunk.blocks
    first_of_stage_2 = blocks[stage_ends[0] + 1] if len(stages) > 1 else None
    last_drop_path = getattr(blocks[-1].drop_path, "drop_prob", 0.0)
    return dict(
        embed_dim=trunk.pos_embed.shape[1],
        num_heads=blocks[0].attn.num_heads,
        drop_path_rate=last_drop_path,
        q_pool=len(trunk.q_pool_blocks),
        q_stride=tuple(trunk.q_stride),
        stages=stages,
        dim_mul=first_of_stage_2.dim_out / first_of_stage_2.dim if first_of_stage_2 is not None else 2.0,
        head_mul=(first_of_stage_2.attn.num_heads / blocks[stage_ends[0]].attn.num_heads
                  if first_of_stage_2 is not None else 2.0),
        window_pos_embed_bkg_spatial_size=tuple(trunk.window_pos_embed_bkg_spatial_size),
        window_spec=tuple(trunk.window_spec),
        global_att_blocks=tuple(trunk.global_att_blocks),
        return_interm_layers=trunk.return_interm_layers,
    )


def _neck_arguments(neck: nn.Module) -> dict:
    """The constructor arguments of a built FpnNeck (sam2's or ours), position encoding aside."""
    conv = neck.convs[0].conv
    return dict(
        d_model=neck.d_model,
        backbone_channel_list=list(neck.backbone_channel_list),
        kernel_size=conv.kernel_size[0],
        stride=conv.stride[0],
        padding=conv.padding[0],
        fpn_interp_model=neck.fpn_interp_model,
        fuse_type=neck.fuse_type,
        fpn_top_down_levels=list(neck.fpn_top_down_levels),
    )


def _position_encoding_arguments(position_encoding: nn.Module) -> dict:
    return dict(
        num_pos_feats=2 * position_encoding.num_pos_feats,
        temperature=position_encoding.temperature,
        normalize=position_encoding.normalize,
        scale=position_encoding.scale if position_encoding.normalize else None,
    )


def module_tensors(module: nn.Module) -> Dict[str, torch.Tensor]:
    """Every parameter and buffer of ``module`` by name."""
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def share_tensors(source_tensors: Mapping[str, torch.Tensor], target: nn.Module) -> None:
    """Point every parameter and buffer of ``target`` at the tensor of the same name in ``source_tensors`` (the
    model's own Parameter objects: nothing is copied)."""
    target_shapes = {name: tuple(t.shape) for name, t in (*target.named_parameters(), *target.named_buffers())}
    source_shapes = {name: tuple(t.shape) for name, t in source_tensors.items()}
    if target_shapes != source_shapes:
        differences = sorted(set(target_shapes.items()) ^ set(source_shapes.items()))[:10]
        raise ValueError(f"sam2_fast.optimize: the rebuilt encoder's tensors differ from the model's (name, shape): "
                         f"{differences}")
    for module_name, module in target.named_modules():
        for registry in (module._parameters, module._buffers):
            for name, tensor in registry.items():
                if tensor is not None:
                    registry[name] = source_tensors[f"{module_name}.{name}" if module_name else name]


def fast_image_encoder(encoder: nn.Module) -> OptimizedImageEncoder:
    """sam2_fast's encoder for a built image encoder (sam2's or ours), sharing its parameters and buffers."""
    classes = _reference_classes()
    _check_type(encoder, "encoder", "the model's image_encoder", classes)
    _check_type(encoder.trunk, "trunk", "image_encoder.trunk", classes)
    _check_type(encoder.neck, "neck", "image_encoder.neck", classes)
    _check_type(encoder.neck.position_encoding, "position_encoding", "image_encoder.neck.position_encoding", classes)
    # The skeleton is built on the meta device (no memory, no initialisation): the model's tensors replace all of
    # its parameters and buffers right after.
    with torch.device("meta"):
        position_encoding = PositionEmbeddingSine(**_position_encoding_arguments(encoder.neck.position_encoding),
                                                  warmup_cache=False)
        fast = OptimizedImageEncoder(
            Hiera(**_trunk_arguments(encoder.trunk)),
            FpnNeck(position_encoding, **_neck_arguments(encoder.neck)),
            scalp=encoder.scalp,
        )
    share_tensors(module_tensors(encoder), fast)
    return fast.train(encoder.training)


def _sam2_model(model: object) -> nn.Module:
    try:
        from sam2.modeling.sam2_base import SAM2Base
    except ImportError as error:
        raise TypeError(f"sam2_fast.optimize: expected {EXPECTED_MODEL}, got {type(model).__qualname__}; "
                        f"the sam2 package does not import here ({error})") from error
    if isinstance(model, SAM2Base):
        return model
    if isinstance(getattr(model, "model", None), SAM2Base):
        return model.model
    raise TypeError(f"sam2_fast.optimize: expected {EXPECTED_MODEL}, got {type(model).__module__}."
                    f"{type(model).__qualname__}")


def optimize(
    model,
    *,
    backend: Optional[str] = None,
    dtype: Optional[torch.dtype] = None,
    compile: Union[bool, Mapping[str, object]] = False,
    capture: Union[bool, Mapping[str, object]] = False,
):
    """Replace the image encoder of a built SAM-2 model with sam2_fast's, in place, and return ``model``.

    ``model``: a ``SAM2Base`` (``build_sam2``, ``build_sam2_video_predictor``) or a predictor whose ``.model``
    is one (``SAM2ImagePredictor``). The new encoder shares the old one's parameter tensors (no copy), so
    ``model.forward_image`` returns the reference's outputs and ``model.state_dict()`` is unchanged. Or a Hugging
    Face transformers ``Sam2Model``, ``Sam2VideoModel`` or ``Sam2VisionModel``: its vision encoder's forward is then
    computed by sam2_fast's encoder, on the same tensors, with transformers' outputs (see
    :mod:`sam2_fast.deploy.transformers_models`).

    ``backend``: ``"auto"``, ``"torch"``, ``"triton"`` or ``"extension"`` for this encoder's ops (None: the
    process-wide setting); raises :class:`~sam2_fast.BackendUnavailableError` if it cannot run on the model's
    device. ``dtype``: run the encoder with its weights cast to this dtype (e.g. ``torch.bfloat16``), taking and
    returning the model's dtype; the weights are shared, so the model's own encoder parameters (and its
    ``state_dict()``) hold that dtype afterwards. ``compile``: ``torch.compile`` the encoder (``True``: fullgraph,
    one graph per input shape; a dict: those torch.compile arguments). The model's own ``compile_image_encoder``
    applied to the replaced encoder only: pass ``compile`` here instead. ``capture``: replay CUDA graphs of the encoder
    (:func:`sam2_fast.capture_cuda_graphs`; ``True`` or a dict of its arguments), for inference on CUDA without a
    compile step; not together with ``compile``.
    """
    if compile and capture:
        raise ValueError("sam2_fast.optimize: compile and capture are two ways to the same end; pick one (compile "
                         "mode='reduce-overhead' also CUDA-graphs the encoder)")
    from . import transformers_models  # imports transformers only if the caller already has

    vision_model = transformers_models.vision_model_of(model)
    if vision_model is not None:
        transformers_models.install(vision_model, backend=backend, dtype=dtype, compile=compile, capture=capture)
        return model
    sam2_model = _sam2_model(model)
    sam2_model.image_encoder = configure(fast_image_encoder(sam2_model.image_encoder), backend=backend, dtype=dtype,
                                         compile=compile, capture=capture)
    return model


def configure(encoder: OptimizedImageEncoder, *, backend: Optional[str], dtype: Optional[torch.dtype],
              compile: Union[bool, Mapping[str, object]], capture: Union[bool, Mapping[str, object]]) -> nn.Module:
    """``encoder`` set up with :func:`optimize`'s options: the module to call (the encoder itself, compiled in place,
    or its CUDA-graph wrapper)."""
    if backend is not None:
        device_type = next(encoder.parameters()).device.type
        if not ops.runs_whole_encoder(backend, device_type):
            problems = {op: status for op, status in ops.backend_status(device_type)[backend].items()
                        if status != "available"}
            raise ops.BackendUnavailableError(
                f"sam2_fast.optimize: backend {backend!r} cannot run the encoder on {device_type}: {problems}")
        encoder.backend = backend
    if dtype is not None:
        encoder.to(dtype)
        encoder.compute_dtype = dtype
    if compile:
        encoder.compile(**(DEFAULT_COMPILE_OPTIONS if compile is True else dict(compile)))
    if capture:
        return capture_cuda_graphs(encoder, **({} if capture is True else dict(capture)))
    return encoder
