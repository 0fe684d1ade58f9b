"""Seeded weights for an encoder, the same whatever ran before: what the tests and the benchmarks load into both
the reference and sam2_fast."""

from __future__ import annotations

import contextlib
import functools
import math

import torch

from .reference import build_reference_encoder


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Seeded weights that exercise everything: non-zero positional embeddings, norms and (qkv) biases.

    Default inits leave the positional embeddings at zero and the norms at identity, which would hide bugs in
    the positional-embedding path and in how padded tokens (whose q, k, v equal the qkv bias) are treated.
    The weights are a function of the parameters' names and shapes and of ``seed`` alone: the module's own values
    (drawn from the global RNG when it was built) are not read. A weight gets the spread of PyTorch's default
    Linear/Conv initialisation, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), computed instead of measured.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "pos_embed" in name:
                param.copy_(0.5 * noise)
            elif "norm" in name and name.endswith("weight"):
                param.copy_(1 + 0.1 * noise)
            elif name.endswith("bias"):
                param.copy_(0.1 * noise)
            else:
                fan_in = param[0].numel()
                param.copy_(noise / math.sqrt(3 * fan_in))
    return module


@contextlib.contextmanager
def global_rng_seeded(seed: int):
    """The global CPU RNG seeded with ``seed`` inside the block and restored after it, for what can only draw from
    it (module initialisation, stochastic depth's masks): those draws are then a function of ``seed`` alone."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


@functools.lru_cache(maxsize=4)
def seeded_state(name: str, seed: int = 0):
    """A seeded fp32 state_dict for config ``name``, made by the reference encoder itself: a function of
    (name, seed) whatever ran before, so a cache miss rebuilds the same weights."""
    return randomize_(build_reference_encoder(name), seed).state_dict()
