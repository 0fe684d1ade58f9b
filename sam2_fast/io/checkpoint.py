"""Loading SAM-2 weights into an encoder: full SAM-2 checkpoints, bare encoder state_dicts, Hugging Face
transformers' and timm's layouts (:mod:`sam2_fast.io.checkpoint_formats`), as ``.pt`` or ``.safetensors`` files.

A file that cannot be loaded gets a :class:`CheckpointError` that names it, says what is wrong and what will
likely fix it: missing (:class:`CheckpointNotFoundError`, also a ``FileNotFoundError``), a folder, unreadable,
empty, cut short or damaged, not a checkpoint at all (a text file, an HTML page a download got instead, a Git LFS
pointer), or weights of another config.
"""

from __future__ import annotations

import os
import pickle
import re
from typing import Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn

from .checkpoint_formats import CheckpointError, CheckpointFormat, to_sam2_state_dict
from .configs import SIZES, get_config
from .images import text_start

TRUNK_PREFIX = "trunk."
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
# How many bytes of a file are looked at to tell what it is.
HEAD_BYTES = 512
# Shape mismatches listed in an error (a checkpoint of another config has one for nearly every tensor).
SHOWN_SHAPE_MISMATCHES = 5


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No checkpoint file at the path given: nothing there, or a folder."""


def _checkpoints_in(folder: str) -> List[str]:
    """The checkpoint files in ``folder`` (none if it cannot be listed), to suggest in an error."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    return sorted(name for name in names if name.lower().endswith(CHECKPOINT_SUFFIXES))


def _listing(names: List[str]) -> str:
    return ", ".join(names[:5]) + (f" ({len(names) - 5} more)" if len(names) > 5 else "")


def _read_head(path: str) -> bytes:
    """The first bytes of the checkpoint file at ``path``; a :class:`CheckpointError` if it cannot be read or is
    empty."""
    try:
        with open(path, "rb") as file:
            head = file.read(HEAD_BYTES)
    except FileNotFoundError as error:
        where = "" if os.path.isabs(path) else f" (relative to {os.getcwd()})"
        nearby = _checkpoints_in(os.path.dirname(os.path.abspath(path)))
        hint = f"; that folder holds {_listing(nearby)}" if nearby else ""
        raise CheckpointNotFoundError(f"checkpoint {path}: no such file{where}{hint}") from error
    except IsADirectoryError as error:
        inside = _checkpoints_in(path)
        holds = f"it holds {_listing(inside)}" if inside else f"it holds no {', '.join(CHECKPOINT_SUFFIXES)} file"
        raise CheckpointNotFoundError(
            f"checkpoint {path} is a folder: pass the checkpoint file, not its folder ({holds})"
        ) from error
    except PermissionError as error:
        raise CheckpointError(
            f"checkpoint {path}: permission denied: this user may not read it; check the file's permissions"
        ) from error
    except OSError as error:
        raise CheckpointError(f"checkpoint {path}: cannot be read ({error.strerror or error})") from error
    if not head:
        raise CheckpointError(
            f"checkpoint {path}: the file is empty (0 bytes), left by a download or copy that did not finish; "
            "re-download it"
        )
    return head


def _content(head: bytes) -> str:
    """What a file's first bytes say it holds: "torch" (torch.save's zip archive, or its older pickle),
    "safetensors" (an 8-byte header length, then the JSON header), "text" or "unknown"."""
    if head.startswith(b"PK\x03\x04") or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
        return "torch"
    # Text before safetensors: a safetensors header length has zero bytes, which no text has.
    if text_start(head) is not None:
        return "text"
    if head[8:9] == b"{":
        return "safetensors"
    return "unknown"


def _text_reason(start: str) -> str:
    if start.lower().startswith(("<!doctype html", "<html")):
        return (f"an HTML page (it starts with {start!r}), not a checkpoint: the download got a web page (a sign-in, "
                "error or redirect page) instead of the file; re-download it from the file's direct link")
    if start.startswith("version https://git-lfs"):
        return (f"a Git LFS pointer (it starts with {start!r}), not the checkpoint it points to: fetch the file "
                "(git lfs pull) or download it directly")
    return (f"this looks like a text file (it starts with {start!r}), not a checkpoint; expected a SAM-2 .pt or "
            ".safetensors checkpoint")


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    text = lines[0][:200] if lines else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _weights_only_refusal(error: BaseException) -> Optional[str]:
    """What torch.load(weights_only=True) refused in the file, if that is why ``error`` was raised."""
    if not isinstance(error, pickle.UnpicklingError) or "Weights only load failed" not in str(error):
        return None
    found = re.search(r"WeightsUnpickler error: ([^\n]*?\.)(\s|$)", str(error))
    return found.group(1) if found else _first_line(error)


def _load_failure(head: bytes, safetensors_file: bool, error: BaseException) -> str:
    """Why a file whose first bytes are ``head`` did not load, and the likely fix."""
    content = _content(head)
    if content == "text":
        return _text_reason(text_start(head))
    if content == "unknown":
        return ("not a checkpoint: its first bytes are neither torch.save's (a zip archive or a pickle) nor a "
                "safetensors header; expected a SAM-2 .pt or .safetensors checkpoint, re-download it")
    if safetensors_file and content == "torch":
        return "a torch.save checkpoint, not a safetensors file: rename it to .pt"
    if not safetensors_file and content == "safetensors":
        return "a safetensors file: rename it to .safetensors"
    refused = _weights_only_refusal(error)
    if refused is not None:
        return (f"torch.load(weights_only=True) refused it: it holds Python objects besides tensors ({refused}); "
                "checkpoints are loaded as data only, so save the weights alone: torch.save(model.state_dict(), path)")
    return f"the file is cut short or damaged ({_first_line(error)}); re-download it"


def read_checkpoint_file(path: Union[str, os.PathLike]) -> Mapping[str, object]:
    """The contents of a ``.pt``/``.pth`` (torch.load with weights_only) or ``.safetensors`` file. Raises
    :class:`CheckpointError`, chained from the reader's error, naming the file, what is wrong and the likely fix."""
    path = os.fspath(path)
    head = _read_head(path)
    safetensors_file = path.endswith(".safetensors")
    if safetensors_file:
        try:
            from safetensors.torch import load_file
        except ImportError as error:
            raise ImportError(f"reading {path} needs the safetensors package: pip install safetensors") from error
    # The readers raise many types for a bad file (EOFError, KeyError, UnpicklingError, OSError, RuntimeError,
    # SafetensorError): whichever it is, the file is what is wrong, and its first bytes say how.
    try:
        # weights_only: a checkpoint is data, never code to run.
        return load_file(path) if safetensors_file else torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError:
        raise
    except Exception as error:
        raise CheckpointError(f"checkpoint {path}: {_load_failure(head, safetensors_file, error)}") from error


def encoder_state_dict(checkpoint: Mapping[str, object]) -> Dict[str, torch.Tensor]:
    """The image-encoder part of a checkpoint's contents, under sam2's key names (``trunk.*``, ``neck.*``).

    Accepts a full SAM-2 checkpoint (``{"model": {...}}`` with keys ``image_encoder.*``; the other keys are
    ignored), a model state_dict with those keys, a bare encoder state_dict, and the other layouts of
    :mod:`sam2_fast.io.checkpoint_formats` (Hugging Face transformers, timm). Raises :class:`CheckpointError` when
    the keys match no known layout.
    """
    return _encoder_state_and_format(checkpoint)[0]


def _encoder_state_and_format(checkpoint: Mapping[str, object]) -> Tuple[Dict[str, torch.Tensor], CheckpointFormat]:
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"holds a {type(checkpoint).__name__}, not a state_dict (a dict of tensors)")
    state, checkpoint_format = to_sam2_state_dict(checkpoint)
    not_tensors = [key for key, value in state.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f"entries that are not tensors: {', '.join(sorted(not_tensors)[:10])}")
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


def _config_size(state: Mapping[str, torch.Tensor], trunk_prefix: str) -> Optional[str]:
    """The config size (tiny, small, base_plus, large) whose trunk has ``state``'s width (the patch embedding's
    channels) and depth (the number of blocks), or None if none has."""
    patch_embed = state.get(trunk_prefix + "patch_embed.proj.weight")
    block_key = re.compile(re.escape(trunk_prefix) + r"blocks\.(\d+)\.")
    blocks = [int(found.group(1)) for found in map(block_key.match, state) if found]
    if patch_embed is None or not blocks:
        return None
    for size in SIZES:
        config = get_config(size)
        if patch_embed.shape[0] == config.embed_dim and max(blocks) + 1 == sum(config.stages):
            return size
    return None


def _config_hint(encoder: nn.Module, state: Mapping[str, torch.Tensor]) -> Optional[str]:
    """Which config the weights in ``state`` are for, when the encoder is of another one."""
    expected = encoder.state_dict()
    trunk_prefix = TRUNK_PREFIX if any(key.startswith(TRUNK_PREFIX) for key in expected) else ""
    theirs, ours = _config_size(state, trunk_prefix), _config_size(expected, trunk_prefix)
    if theirs is None or theirs == ours:
        return None
    name = get_config(theirs).name
    this = f", not for {get_config(ours).name}, this encoder's config" if ours else ""
    return (f"it is for {name} (or sam2_hiera_{theirs}, the same encoder){this}; build the encoder with config "
            f"{name} (build_image_encoder({name!r}, ...), sam2-fast --config {name})")


def load_state_dict_checked(encoder: nn.Module, state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load ``state`` into ``encoder``, raising :class:`CheckpointError` when it does not fit: which config the
    weights are for when another than the encoder's (with the count of problems), else every key problem and the
    first shape mismatches. ``source`` names the state in the message."""
    expected = encoder.state_dict()
    missing = set(expected) - set(state)
    unexpected = set(state) - set(expected)
    mismatches = [
        f"shape mismatch for {key}: checkpoint has {tuple(state[key].shape)}, the encoder expects {tuple(value.shape)}"
        for key, value in expected.items()
        if key in state and tuple(state[key].shape) != tuple(value.shape)
    ]
    if not (missing or unexpected or mismatches):
        encoder.load_state_dict(state, strict=True)
        return
    hint = _config_hint(encoder, state)
    if hint is not None:
        counted = ((len(missing), "missing keys"), (len(unexpected), "unexpected keys"),
                   (len(mismatches), "shape mismatches"))
        summary = "; ".join([", ".join(f"{count} {what}" for count, what in counted if count)] + mismatches[:1])
        raise CheckpointError(f"{source} does not fit this encoder ({summary}): {hint}")
    problems = []
    if missing:
        problems.append(f"missing keys: {_format_keys(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_format_keys(unexpected)}")
    problems += mismatches[:SHOWN_SHAPE_MISMATCHES]
    if len(mismatches) > SHOWN_SHAPE_MISMATCHES:
        problems.append(f"and {len(mismatches) - SHOWN_SHAPE_MISMATCHES} more shape mismatches")
    raise CheckpointError(f"{source} does not fit this encoder (is it the right config?): " + "; ".join(problems))


def load_checkpoint(encoder: nn.Module, path: Union[str, os.PathLike]) -> nn.Module:
    """Load SAM-2 weights from ``path`` into ``encoder`` (an :class:`~sam2_fast.ImageEncoder`, or a trunk) and
    return it.

    ``path`` may hold a full SAM-2 checkpoint (``sam2.1_hiera_base_plus.pt``), a bare encoder state_dict
    (``torch.save(encoder.state_dict(), path)``), Hugging Face transformers' Sam2 weights (``model.safetensors``
    of ``Sam2Model`` or ``Sam2VisionModel``), or timm's ``hieradet_sam2`` trunk weights; ``.pt``/``.pth`` or
    ``.safetensors``. The format is recognised from the keys. A trunk-only checkpoint (timm) loads into a trunk:
    ``load_checkpoint(encoder.trunk, path)``. Tensors are copied into the existing parameters, so the module's
    device and dtype are kept. A file that cannot be loaded, or holds weights that do not fit ``encoder``, gets a
    :class:`CheckpointError` naming it, saying what is wrong and the likely fix.
    """
    path = os.fspath(path)
    contents = read_checkpoint_file(path)
    try:
        state, checkpoint_format = _encoder_state_and_format(contents)
    except CheckpointError as error:
        raise type(error)(f"checkpoint {path}: {error}") from None
    if not checkpoint_format.holds_neck and any(key.startswith("neck.") for key in encoder.state_dict()):
        raise CheckpointError(
            f"checkpoint {path} is a {checkpoint_format.description} checkpoint: it holds no FPN neck weights, so it "
            "cannot fill a whole image encoder; load it into the trunk instead: load_checkpoint(encoder.trunk, path)"
        )
    load_state_dict_checked(encoder, state_dict_for(encoder, state), source=f"checkpoint {path}")
    return encoder
