"""Bad inputs raise errors that say what was expected and what came."""

import pytest
import torch

from sam2_fast import build_image_encoder


@pytest.fixture(scope="module")
def encoder():
    return build_image_encoder("sam2.1_hiera_tiny")


@pytest.mark.parametrize(
    "shape,match",
    [
        ((3, 64, 64), r"expected input of shape \(B, 3, H, W\), got \(3, 64, 64\)"),
        ((1, 4, 64, 64), r"expected input of shape \(B, 3, H, W\), got \(1, 4, 64, 64\)"),
        ((1, 3, 100, 64), r"H, W positive multiples of 32, got \(1, 3, 100, 64\).*windowed positional embedding.*128x64"),
        ((1, 3, 64, 48), r"multiples of 32, got \(1, 3, 64, 48\)"),
        ((0, 3, 64, 64), r"B >= 1"),
    ],
)
def test_bad_shapes(encoder, shape, match):
    with pytest.raises(ValueError, match=match):
        encoder(torch.zeros(shape))


def test_integer_image_is_refused(encoder):
    with pytest.raises(TypeError, match=r"expected a floating-point input .*got torch.uint8"):
        encoder(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))


def test_dtype_must_match_weights_outside_autocast(encoder):
    with pytest.raises(TypeError, match=r"expected input of dtype torch.float32 .*got torch.bfloat16"):
        encoder(torch.zeros(1, 3, 64, 64, dtype=torch.bfloat16))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = encoder(torch.zeros(1, 3, 64, 64, dtype=torch.bfloat16))
    assert out["vision_features"].shape == (1, 256, 4, 4)


def test_device_must_match_weights(encoder):
    with pytest.raises(ValueError, match=r"expected input on cpu .*got meta"):
        encoder(torch.zeros(1, 3, 64, 64, device="meta"))


def test_not_a_tensor(encoder):
    with pytest.raises(TypeError, match="expected a torch.Tensor"):
        encoder([[0.0]])


def test_unknown_config():
    with pytest.raises(KeyError, match="unknown SAM-2 encoder config 'hiera_huge'"):
        build_image_encoder("hiera_huge")
