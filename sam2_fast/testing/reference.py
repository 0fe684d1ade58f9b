"""Build the reference `sam2` package's image encoder from one of our configs (tests and benchmarks only).

`sam2` is not a runtime dependency of sam2_fast: it is imported here, lazily, when a reference is asked for.
"""

from __future__ import annotations

import torch

from ..io.configs import get_config


def build_reference_encoder(name: str, *, seed: int = 0, **trunk_overrides) -> torch.nn.Module:
    """The `sam2` package's ImageEncoder for config ``name``, with its own random initialisation, in eval mode;
    ``trunk_overrides`` replace Hiera arguments of the config (e.g. ``drop_path_rate=0.1``).

    The initialisation draws from the global RNG (sam2's modules take no generator), seeded with ``seed`` in a fork
    of it: the weights are a function of (config, seed), and the caller's global RNG is left as it was."""
    try:
        from sam2.modeling.backbones.hieradet import Hiera
        from sam2.modeling.backbones.image_encoder import FpnNeck, ImageEncoder
        from sam2.modeling.position_encoding import PositionEmbeddingSine
    except ImportError as error:
        raise ImportError(
            "the reference `sam2` package is needed to compare against it: "
            "SAM2_BUILD_CUDA=0 pip install --no-deps --no-build-isolation sam2==1.1.0 hydra-core iopath"
        ) from error
    config = get_config(name)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        trunk = Hiera(**{**config.trunk_kwargs(), **trunk_overrides})
        neck = FpnNeck(PositionEmbeddingSine(**config.position_encoding_kwargs()), **config.neck_kwargs())
    return ImageEncoder(trunk, neck, scalp=config.scalp).eval()
