"""sam2_fast: a fast, drop-in SAM-2 image encoder (Hiera trunk + FPN neck).

    from sam2_fast import ImageEncoder, Hiera, FpnNeck, PositionEmbeddingSine   # same arguments as sam2's
    encoder = sam2_fast.build_image_encoder("sam2.1_hiera_base_plus", checkpoint="sam2.1_hiera_base_plus.pt")
    sam2_fast.optimize(model)   # a model from sam2's build_sam2, or a predictor: its image encoder becomes ours
"""

import importlib.util

from ._version import __version__
from .deploy.capture import CudaGraphImageEncoder, capture_cuda_graphs
from .deploy.drop_in import OptimizedImageEncoder, optimize
from .deploy.export import ExportedEncoder, export_encoder, load_exported
from .gemm.cpu_gemm import fp32_library as cpu_fp32_gemm, set_fp32_library as set_cpu_fp32_gemm
from .io import sam2_configs
from .io.checkpoint import CheckpointError, CheckpointNotFoundError, load_checkpoint
from .io.configs import CONFIGS, DEFAULT_CONFIG, EncoderConfig, get_config
from .io.images import ImageError
from .model.build import build_image_encoder
from .model.hiera import Hiera, MultiScaleAttention, MultiScaleBlock, set_activation_checkpointing
from .model.image_encoder import FpnNeck, ImageEncoder
from .model.position_encoding import PositionEmbeddingSine
from .ops import (
    BackendUnavailableError, active_backends, active_backward, backend_status, get_backend, set_backend, use_backend,
)


# sam2 builds its models through hydra: register our configs wherever hydra is installed, so that
# build_sam2("sam2_fast/sam2.1/sam2.1_hiera_b+.yaml", ...) finds them.
if importlib.util.find_spec("hydra") is not None:
    sam2_configs.register()

__all__ = [
    "ImageEncoder", "Hiera", "MultiScaleBlock", "MultiScaleAttention", "FpnNeck", "PositionEmbeddingSine",
    "build_image_encoder", "load_checkpoint", "CheckpointError", "CheckpointNotFoundError", "ImageError", "CONFIGS", "DEFAULT_CONFIG", "EncoderConfig",
    "get_config", "set_backend", "get_backend", "use_backend", "backend_status", "active_backends",
    "active_backward",
    "BackendUnavailableError", "capture_cuda_graphs", "CudaGraphImageEncoder", "export_encoder", "load_exported",
    "ExportedEncoder", "optimize", "OptimizedImageEncoder", "set_activation_checkpointing", "cpu_fp32_gemm",
    "set_cpu_fp32_gemm",
]
