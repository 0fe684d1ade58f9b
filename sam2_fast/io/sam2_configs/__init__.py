"""sam2 hydra configs with sam2_fast's image encoder, for ``sam2.build_sam.build_sam2`` and
``build_sam2_video_predictor``.

One yaml file per sam2 config (``sam2/sam2_hiera_{t,s,b+,l}.yaml``, ``sam2.1/sam2.1_hiera_{t,s,b+,l}.yaml``): each
takes sam2's own file as its default and points the image encoder's ``_target_``s at sam2_fast, so every other
setting stays sam2's. ``import sam2_fast`` registers them in hydra's config store (where hydra is installed) under
``sam2_fast/<family>/<name>``, the name sam2's config has with ``configs/`` replaced by ``sam2_fast/``:

    import sam2_fast
    from sam2.build_sam import build_sam2
    model = build_sam2("sam2_fast/sam2.1/sam2.1_hiera_b+.yaml", ckpt_path="sam2.1_hiera_base_plus.pt")

sam2 builds models with hydra's ``compose``, which looks configs up by name in hydra's search path (sam2's own
package) and its config store; registering there is what makes these names work from any working directory.
"""

from __future__ import annotations

import glob
import os
from typing import Dict

CONFIG_DIR = os.path.dirname(os.path.abspath(__file__))
# The group of every config in hydra's config store: a config's name is "sam2_fast/<family>/<name>".
GROUP = "sam2_fast"


def config_files() -> Dict[str, str]:
    """The config name for build_sam2 (``sam2_fast/sam2.1/sam2.1_hiera_b+.yaml``) -> the yaml file's path."""
    paths = sorted(glob.glob(os.path.join(CONFIG_DIR, "*", "*.yaml")))
    return {f"{GROUP}/{os.path.relpath(path, CONFIG_DIR)}".replace(os.sep, "/"): path for path in paths}


def register() -> None:
    """Put every config in hydra's config store (``# @package _global_``, as sam2's own files)."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    store = ConfigStore.instance()
    for name, path in config_files().items():
        group, _, file_name = name.rpartition("/")
        store.store(name=file_name[: -len(".yaml")], node=OmegaConf.load(path), group=group, package="_global_")
