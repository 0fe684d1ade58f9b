"""sam2_fast's hydra configs: sam2's own configs with our image encoder, found by name by sam2's build_sam2."""

import pytest
import torch

import sam2_fast
from sam2_fast.io.sam2_configs import config_files

from helpers import assert_fp32_close, flat_outputs, global_rng_seeded, randomize_

build_sam = pytest.importorskip("sam2.build_sam")
hydra = pytest.importorskip("hydra")
omegaconf = pytest.importorskip("omegaconf")

SAM2_CONFIGS = [f"configs/{family}/{family}_hiera_{size}.yaml" for family in ("sam2", "sam2.1")
                for size in ("t", "s", "b+", "l")]
OUR_TARGETS = {
    ("image_encoder", "_target_"): "sam2_fast.ImageEncoder",
    ("image_encoder", "trunk", "_target_"): "sam2_fast.Hiera",
    ("image_encoder", "neck", "_target_"): "sam2_fast.FpnNeck",
    ("image_encoder", "neck", "position_encoding", "_target_"): "sam2_fast.PositionEmbeddingSine",
}


def _ours(sam2_config: str) -> str:
    return sam2_config.replace("configs/", "sam2_fast/", 1)


def test_one_config_per_sam2_config():
    assert sorted(config_files()) == sorted(_ours(name) for name in SAM2_CONFIGS)


def _composed_model(config_name: str) -> dict:
    config = hydra.compose(config_name=config_name)
    omegaconf.OmegaConf.resolve(config)
    return omegaconf.OmegaConf.to_container(config.model)


@pytest.mark.parametrize("sam2_config", SAM2_CONFIGS)
def test_config_is_sam2s_with_our_encoder_targets(sam2_config):
    ours, theirs = _composed_model(_ours(sam2_config)), _composed_model(sam2_config)
    for path, target in OUR_TARGETS.items():
        node = ours
        for key in path[:-1]:
            node = node[key]
        assert node[path[-1]] == target, path
        reference_node = theirs
        for key in path[:-1]:
            reference_node = reference_node[key]
        node[path[-1]] = reference_node[path[-1]]
    assert ours == theirs


@pytest.mark.parametrize("builder, sam2_config", [
    ("build_sam2", "configs/sam2.1/sam2.1_hiera_t.yaml"),
    ("build_sam2_video_predictor", "configs/sam2/sam2_hiera_t.yaml"),
])
def test_build_sam2_with_our_config_loads_a_sam2_checkpoint(tmp_path, builder, sam2_config):
    build = getattr(build_sam, builder)
    with global_rng_seeded(31):  # sam2's initialisation of the heads, saved in the checkpoint below
        reference = build(sam2_config, device="cpu")
    randomize_(reference.image_encoder, seed=31)
    checkpoint = tmp_path / "model.pt"
    torch.save({"model": reference.state_dict()}, checkpoint)

    # build_sam2's own strict load of a sam2 checkpoint: our encoder has the same keys.
    ours = build(_ours(sam2_config), ckpt_path=str(checkpoint), device="cpu")
    assert type(ours) is type(reference)
    assert isinstance(ours.image_encoder, sam2_fast.ImageEncoder)
    assert isinstance(ours.image_encoder.trunk, sam2_fast.Hiera)
    image = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(32))
    with torch.no_grad():
        expected, actual = reference.forward_image(image), ours.forward_image(image)
    for (name, e), (_, a) in zip(flat_outputs(expected), flat_outputs(actual)):
        assert_fp32_close(a, e, name)
