"""Hugging Face transformers SAM-2 models with a named sam2_fast config's encoder and seeded weights, for the tests
and the benchmarks (no download: the configs are written from :mod:`sam2_fast.io.configs`).

transformers is imported when a function is called, never at import, by :func:`import_transformers`.
"""

from __future__ import annotations

from ..io.configs import get_config
from .weights import global_rng_seeded, randomize_

MODEL_KINDS = ("Sam2Model", "Sam2VideoModel", "Sam2VisionModel")


def import_transformers():
    """The transformers package with its SAM-2 models imported (its top-level names are lazy)."""
    import transformers
    from transformers.models.sam2 import modeling_sam2  # noqa: F401
    from transformers.models.sam2_video import modeling_sam2_video  # noqa: F401
    return transformers


def transformers_vision_config(name: str, image_size: int = 1024):
    """A ``transformers.Sam2VisionConfig`` holding config ``name``'s encoder, for ``image_size`` square images."""
    transformers = import_transformers()

    config = get_config(name)
    stages = len(config.stages)
    widths = list(reversed(config.backbone_channel_list))  # finest first
    backbone = transformers.Sam2HieraDetConfig(
        hidden_size=config.embed_dim,
        num_attention_heads=config.num_heads,
        image_size=[image_size, image_size],
        blocks_per_stage=list(config.stages),
        embed_dim_per_stage=widths,
        num_attention_heads_per_stage=[config.num_heads * 2**stage for stage in range(stages)],
        window_size_per_stage=list(config.window_spec),
        global_attention_blocks=list(config.global_att_blocks),
        window_positional_embedding_background_size=list(config.window_pos_embed_bkg_spatial_size),
    )
    levels = stages - config.scalp
    return transformers.Sam2VisionConfig(
        backbone_config=backbone,
        backbone_channel_list=list(config.backbone_channel_list),
        # The levels the mask decoder reads, finest first: strides 4, 8, 16.
        backbone_feature_sizes=[[image_size // 2**(2 + level)] * 2 for level in range(levels)],
        fpn_hidden_size=config.d_model,
        fpn_top_down_levels=list(config.fpn_top_down_levels),
        num_feature_levels=levels,
    )


def build_transformers_model(kind: str, name: str, image_size: int = 1024, seed: int = 0):
    """A transformers ``kind`` (one of :data:`MODEL_KINDS`) in eval mode with config ``name``'s encoder for
    ``image_size`` images: the vision encoder's weights from :func:`randomize_` (non-zero positional embeddings,
    norms and biases), the heads' from transformers' initialisation on the global RNG seeded with ``seed``."""
    transformers = import_transformers()

    if kind not in MODEL_KINDS:
        raise ValueError(f"expected a model kind among {', '.join(MODEL_KINDS)}, got {kind!r}")
    vision_config = transformers_vision_config(name, image_size)
    prompt_encoder_config = transformers.Sam2PromptEncoderConfig(image_size=image_size)
    with global_rng_seeded(seed):
        if kind == "Sam2VisionModel":
            model = transformers.Sam2VisionModel(vision_config)
        elif kind == "Sam2Model":
            model = transformers.Sam2Model(transformers.Sam2Config(
                vision_config=vision_config, prompt_encoder_config=prompt_encoder_config))
        else:
            model = transformers.Sam2VideoModel(transformers.Sam2VideoConfig(
                vision_config=vision_config, prompt_encoder_config=prompt_encoder_config, image_size=image_size,
                memory_attention_rope_feat_sizes=[image_size // 16] * 2))
    randomize_(model if kind == "Sam2VisionModel" else model.vision_encoder, seed)
    return model.eval()
