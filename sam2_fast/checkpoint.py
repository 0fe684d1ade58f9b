"""Loading SAM-2 weights into an encoder: full SAM-2 checkpoints, bare encoder state_dicts, safetensors files."""

from __future__ import annotations

import os
from typing import Dict, Mapping, Union

import torch
import torch.nn as nn

ENCODER_PREFIX = "image_encoder."


class CheckpointError(RuntimeError):
    """A checkpoint that does not fit the encoder: missing or unexpected keys, or mismatched shapes."""


def _read_file(path: Union[str, os.PathLike]) -> Mapping[str, object]:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError as error:
            raise ImportError(f"reading {path} needs the safetensors package: pip install safetensors") from error
        return load_file(path)
    # weights_only: a checkpoint is data, never code to run.
    return torch.load(path, map_location="cpu", weights_only=True)


def encoder_state_dict(checkpoint: Mapping[str, object]) -> Dict[str, torch.Tensor]:
    """The image-encoder part of a checkpoint's contents.

    Accepts a full SAM-2 checkpoint (``{"model": {...}}`` with keys ``image_encoder.*``; the other keys are
    ignored), a model state_dict with those keys, or a bare encoder state_dict (``trunk.*``, ``neck.*``).
    """
    state = checkpoint
    if isinstance(state.get("model"), Mapping):
        state = state["model"]
    if any(key.startswith(ENCODER_PREFIX) for key in state):
        state = {key[len(ENCODER_PREFIX):]: value for key, value in state.items() if key.startswith(ENCODER_PREFIX)}
    not_tensors = [key for key, value in state.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f"checkpoint entries that are not tensors: {', '.join(sorted(not_tensors)[:10])}")
    return dict(state)


def _format_keys(keys) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:20])
    return shown + (f", ... ({len(keys) - 20} more)" if len(keys) > 20 else "")


def load_state_dict_checked(encoder: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load ``state`` into ``encoder``, raising :class:`CheckpointError` that lists every key or shape problem."""
    expected = encoder.state_dict()
    missing = set(expected) - set(state)
    unexpected = set(state) - set(expected)
    problems = []
    if missing:
        problems.append(f"missing keys: {_format_keys(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_format_keys(unexpected)}")
    for key in sorted(set(expected) & set(state)):
        if tuple(state[key].shape) != tuple(expected[key].shape):
            problems.append(
                f"shape mismatch for {key}: checkpoint has {tuple(state[key].shape)}, "
                f"the encoder expects {tuple(expected[key].shape)}"
            )
    if problems:
        raise CheckpointError(
            "checkpoint does not match the encoder (is it the right config?): " + "; ".join(problems)
        )
    encoder.load_state_dict(state, strict=True)


def load_checkpoint(encoder: nn.Module, path: Union[str, os.PathLike]) -> nn.Module:
    """Load SAM-2 weights from ``path`` into ``encoder`` (an :class:`~sam2_fast.ImageEncoder`) and return it.

    ``path`` may hold a full SAM-2 checkpoint (``sam2.1_hiera_base_plus.pt``), a bare encoder state_dict
    (``torch.save(encoder.state_dict(), path)``), or a ``.safetensors`` file of either. Tensors are copied into
    the encoder's existing parameters, so its device and dtype are kept.
    """
    load_state_dict_checked(encoder, encoder_state_dict(_read_file(path)))
    return encoder
