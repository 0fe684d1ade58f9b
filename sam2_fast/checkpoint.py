"""Loading SAM-2 weights into an encoder: full SAM-2 checkpoints, bare encoder state_dicts, Hugging Face
transformers' and timm's layouts (:mod:`sam2_fast.checkpoint_formats`), as ``.pt`` or ``.safetensors`` files."""

from __future__ import annotations

import os
from typing import Dict, Mapping, Tuple, Union

import torch
import torch.nn as nn

from .checkpoint_formats import CheckpointError, CheckpointFormat, UnknownCheckpointFormat, to_sam2_state_dict

TRUNK_PREFIX = "trunk."


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
    """The image-encoder part of a checkpoint's contents, under sam2's key names (``trunk.*``, ``neck.*``).

    Accepts a full SAM-2 checkpoint (``{"model": {...}}`` with keys ``image_encoder.*``; the other keys are
    ignored), a model state_dict with those keys, a bare encoder state_dict, and the other layouts of
    :mod:`sam2_fast.checkpoint_formats` (Hugging Face transformers, timm). Raises :class:`CheckpointError` when
    the keys match no known layout.
    """
    return _encoder_state_and_format(checkpoint)[0]


def _encoder_state_and_format(checkpoint: Mapping[str, object]) -> Tuple[Dict[str, torch.Tensor], CheckpointFormat]:
    state, checkpoint_format = to_sam2_state_dict(checkpoint)
    not_tensors = [key for key, value in state.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f"checkpoint entries that are not tensors: {', '.join(sorted(not_tensors)[:10])}")
    return state, checkpoint_format


def state_dict_for(module: nn.Module, state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``state`` (sam2 names) as ``module`` names it: unchanged for an image encoder, its ``trunk.*`` part without
    the prefix for a trunk (a :class:`~sam2_fast.Hiera`, or an encoder's ``.trunk``)."""
    if any(key.startswith(TRUNK_PREFIX) for key in module.state_dict()):
        return dict(state)
    return {key[len(TRUNK_PREFIX):]: value for key, value in state.items() if key.startswith(TRUNK_PREFIX)}


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
    """Load SAM-2 weights from ``path`` into ``encoder`` (an :class:`~sam2_fast.ImageEncoder`, or a trunk) and
    return it.

    ``path`` may hold a full SAM-2 checkpoint (``sam2.1_hiera_base_plus.pt``), a bare encoder state_dict
    (``torch.save(encoder.state_dict(), path)``), Hugging Face transformers' Sam2 weights (``model.safetensors``
    of ``Sam2Model`` or ``Sam2VisionModel``), or timm's ``hieradet_sam2`` trunk weights; ``.pt``/``.pth`` or
    ``.safetensors``. The format is recognised from the keys. A trunk-only checkpoint (timm) loads into a trunk:
    ``load_checkpoint(encoder.trunk, path)``. Tensors are copied into the existing parameters, so the module's
    device and dtype are kept.
    """
    try:
        state, checkpoint_format = _encoder_state_and_format(_read_file(path))
    except UnknownCheckpointFormat as error:
        raise UnknownCheckpointFormat(f"{os.fspath(path)}: {error}") from None
    if not checkpoint_format.holds_neck and any(key.startswith("neck.") for key in encoder.state_dict()):
        raise CheckpointError(
            f"{os.fspath(path)} is a {checkpoint_format.description} checkpoint: it holds no FPN neck weights, so it "
            "cannot fill a whole image encoder; load it into the trunk instead: load_checkpoint(encoder.trunk, path)"
        )
    load_state_dict_checked(encoder, state_dict_for(encoder, state))
    return encoder
