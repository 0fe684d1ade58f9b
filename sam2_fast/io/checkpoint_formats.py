"""The checkpoint layouts that hold SAM-2's image encoder, and the key maps that bring each to sam2's own names.

sam2's names (``trunk.blocks.0.attn.qkv.weight``, ``neck.convs.0.conv.weight``) are the ones our encoder uses.
Other libraries store the same tensors, unchanged in shape and value, under other names:

- Hugging Face transformers (``Sam2VisionModel``; ``Sam2Model`` and ``Sam2VideoModel`` hold it as
  ``vision_encoder``): ``backbone.`` for ``trunk.``, ``layer_norm1/2`` for ``norm1/2``, ``mlp.proj_in/proj_out``
  for ``mlp.layers.0/1``, ``patch_embed.projection`` for ``patch_embed.proj``, ``neck.convs.I.`` for
  ``neck.convs.I.conv.``.
- timm (``hieradet_sam2``, the trunk alone): no ``trunk.`` prefix, ``mlp.fc1/fc2`` for ``mlp.layers.0/1``, a
  classifier ``head.*`` that SAM-2 does not have, and a ``model.`` prefix on ``features_only`` models.

A format is recognised from its keys: each has a few prefixes a checkpoint may put before the encoder's keys
(a whole model's) and the names that start the encoder's own keys.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Dict, Mapping, Optional, Tuple


@dataclasses.dataclass(frozen=True)
class CheckpointFormat:
    """One way of naming the image encoder's tensors, and how to rename them to sam2's names."""

    name: str
    description: str
    # Prefixes before the encoder's keys, most specific first; "" is a bare encoder state_dict.
    prefixes: Tuple[str, ...]
    # What the encoder's own keys start with (after the prefix): how the format is recognised.
    key_starts: Tuple[str, ...]
    # (regular expression, replacement) applied in order to each key after its prefix is removed.
    renames: Tuple[Tuple[str, str], ...] = ()
    # Keys (after the prefix) of the format's model that are not part of SAM-2's encoder.
    dropped: Optional[str] = None
    # Whether the format holds the FPN neck too, or the trunk only.
    holds_neck: bool = True

    def example_key(self) -> str:
        return " or ".join(prefix + self.key_starts[0] + "..." for prefix in self.prefixes)

    def encoder_prefix(self, keys) -> Optional[str]:
        """The prefix before this format's encoder keys in ``keys``, or None if they are not of this format."""
        for prefix in self.prefixes:
            if any(key.startswith(prefix + start) for key in keys for start in self.key_starts):
                return prefix
        return None

    def to_sam2(self, state: Mapping[str, object], prefix: str) -> Dict[str, object]:
        """The encoder's entries of ``state`` (keys under ``prefix``) under sam2's names."""
        mapped = {}
        for key, value in state.items():
            if not key.startswith(prefix):
                continue
            key = key[len(prefix):]
            if self.dropped is not None and re.match(self.dropped, key):
                continue
            for pattern, replacement in self.renames:
                key = re.sub(pattern, replacement, key)
            mapped[key] = value
        return mapped


SAM2 = CheckpointFormat(
    name="sam2",
    description="SAM-2 (a full sam2 checkpoint, or an image-encoder state_dict)",
    prefixes=("image_encoder.", ""),
    key_starts=("trunk.",),
)

TRANSFORMERS = CheckpointFormat(
    name="transformers",
    description="Hugging Face transformers Sam2VisionModel (or Sam2Model / Sam2VideoModel's vision_encoder)",
    prefixes=("vision_encoder.", ""),
    key_starts=("backbone.",),
    renames=(
        (r"^backbone\.", "trunk."),
        (r"\.layer_norm([12])\.", r".norm\1."),
        (r"\.mlp\.proj_in\.", ".mlp.layers.0."),
        (r"\.mlp\.proj_out\.", ".mlp.layers.1."),
        (r"\.patch_embed\.projection\.", ".patch_embed.proj."),
        (r"^neck\.convs\.(\d+)\.", r"neck.convs.\1.conv."),
    ),
)

TIMM = CheckpointFormat(
    name="timm",
    description="timm hieradet_sam2 (the trunk only; features_only models under model.)",
    prefixes=("model.", ""),
    key_starts=("patch_embed.", "pos_embed", "blocks."),
    renames=((r"^", "trunk."), (r"\.mlp\.fc1\.", ".mlp.layers.0."), (r"\.mlp\.fc2\.", ".mlp.layers.1.")),
    dropped=r"head\.",
    holds_neck=False,
)

# In the order they are tried: sam2's own names first, so that a bare sam2 state_dict is never taken for another.
FORMATS: Tuple[CheckpointFormat, ...] = (SAM2, TRANSFORMERS, TIMM)


class CheckpointError(RuntimeError):
    """A checkpoint that does not fit the encoder: no known format, missing or unexpected keys, mismatched shapes."""


class UnknownCheckpointFormat(CheckpointError):
    """The keys of a checkpoint match none of :data:`FORMATS`."""


def unwrap(checkpoint: Mapping[str, object]) -> Mapping[str, object]:
    """The state_dict inside a checkpoint: ``{"model": ...}`` (sam2) or ``{"state_dict": ...}`` (training scripts)."""
    for key in ("model", "state_dict"):
        if isinstance(checkpoint.get(key), Mapping):
            return checkpoint[key]
    return checkpoint


def detect_format(state: Mapping[str, object]) -> Tuple[CheckpointFormat, str]:
    """(format, prefix) of the image encoder's keys in ``state``; raises :class:`UnknownCheckpointFormat`."""
    for checkpoint_format in FORMATS:
        prefix = checkpoint_format.encoder_prefix(state.keys())
        if prefix is not None:
            return checkpoint_format, prefix
    shown = ", ".join(sorted(state)[:8]) or "no keys at all"
    tried = "; ".join(f"{f.name}: {f.description}, keys like {f.example_key()}" for f in FORMATS)
    raise UnknownCheckpointFormat(
        f"no SAM-2 image encoder found in the checkpoint: its keys ({shown}{', ...' if len(state) > 8 else ''}) "
        f"match none of the formats tried ({tried})"
    )


def to_sam2_state_dict(checkpoint: Mapping[str, object]) -> Tuple[Dict[str, object], CheckpointFormat]:
    """The image encoder's entries of ``checkpoint`` under sam2's key names, and the format they came in."""
    state = unwrap(checkpoint)
    checkpoint_format, prefix = detect_format(state)
    return checkpoint_format.to_sam2(state, prefix), checkpoint_format
