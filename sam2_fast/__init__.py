"""sam2_fast: a fast, drop-in SAM-2 image encoder (Hiera trunk + FPN neck).

    from sam2_fast import ImageEncoder, Hiera, FpnNeck, PositionEmbeddingSine   # same arguments as sam2's
    encoder = sam2_fast.build_image_encoder("sam2.1_hiera_base_plus", checkpoint="sam2.1_hiera_base_plus.pt")
"""

from .build import build_image_encoder
from .capture import CudaGraphImageEncoder, capture_cuda_graphs
from .checkpoint import CheckpointError, load_checkpoint
from .configs import CONFIGS, DEFAULT_CONFIG, EncoderConfig, get_config
from .export import ExportedEncoder, export_encoder, load_exported
from .hiera import Hiera, MultiScaleAttention, MultiScaleBlock, set_activation_checkpointing
from .image_encoder import FpnNeck, ImageEncoder
from .ops import (
    BackendUnavailableError, active_backends, active_backward, backend_status, get_backend, set_backend, use_backend,
)
from .position_encoding import PositionEmbeddingSine

__version__ = "0.1.0"

__all__ = [
    "ImageEncoder", "Hiera", "MultiScaleBlock", "MultiScaleAttention", "FpnNeck", "PositionEmbeddingSine",
    "build_image_encoder", "load_checkpoint", "CheckpointError", "CONFIGS", "DEFAULT_CONFIG", "EncoderConfig",
    "get_config", "set_backend", "get_backend", "use_backend", "backend_status", "active_backends",
    "active_backward",
    "BackendUnavailableError", "capture_cuda_graphs", "CudaGraphImageEncoder", "export_encoder", "load_exported",
    "ExportedEncoder", "set_activation_checkpointing",
]
