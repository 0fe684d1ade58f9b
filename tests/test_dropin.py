"""Drop-in use: sam2's own hydra configs, pointed at sam2_fast's classes, build an encoder with the same keys and
outputs."""

import os

import pytest
import torch

import sam2
from helpers import flat_outputs, global_rng_seeded, randomize_

hydra_utils = pytest.importorskip("hydra.utils")
omegaconf = pytest.importorskip("omegaconf")

TARGETS = {
    "sam2.modeling.backbones.image_encoder.ImageEncoder": "sam2_fast.ImageEncoder",
    "sam2.modeling.backbones.image_encoder.FpnNeck": "sam2_fast.FpnNeck",
    "sam2.modeling.backbones.hieradet.Hiera": "sam2_fast.Hiera",
    "sam2.modeling.position_encoding.PositionEmbeddingSine": "sam2_fast.PositionEmbeddingSine",
}


def _retarget(node):
    if isinstance(node, dict):
        return {k: (TARGETS.get(v, v) if k == "_target_" else _retarget(v)) for k, v in node.items()}
    return node


@pytest.mark.parametrize("yaml_name", ["sam2.1/sam2.1_hiera_b+.yaml", "sam2/sam2_hiera_s.yaml"])
def test_sam2_yaml_builds_sam2_fast_encoder(yaml_name):
    path = os.path.join(os.path.dirname(sam2.__file__), "configs", yaml_name)
    config = omegaconf.OmegaConf.to_container(omegaconf.OmegaConf.load(path).model.image_encoder)
    reference = randomize_(hydra_utils.instantiate(config), seed=3).eval()
    with global_rng_seeded(3):  # its own initialisation, overwritten by the reference's weights below
        ours = hydra_utils.instantiate(_retarget(config)).eval()
    assert type(ours).__module__.startswith("sam2_fast")
    assert list(ours.state_dict()) == list(reference.state_dict())
    ours.load_state_dict(reference.state_dict())
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(4))
    # Forward only, fp32, same weights: the two differ by float rounding (see helpers.FP32_RELATIVE_TOLERANCE), and a
    # max-pool near-tie moves an output by no more than the rounding that swapped the values.
    with torch.no_grad():
        for (name, e), (_, a) in zip(flat_outputs(reference(x)), flat_outputs(ours(x))):
            torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4, msg=name)
