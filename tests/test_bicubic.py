"""The positional embedding's bicubic resize as matrix products (sam2_fast.model.bicubic) against ATen's
``F.interpolate(..., mode="bicubic")``, and where the trunk uses it."""

import pytest
import torch
import torch.nn.functional as F

from sam2_fast.model import bicubic

from helpers import assert_close_verbose, encoder_pair

# The trunk's tables (7x7 and 14x14 to the stage-1 map) plus down-scaling, odd ratios, a 1x1 map and an equal size.
SIZES = [((7, 7), (128, 128)), ((14, 14), (64, 96)), ((16, 12), (5, 7)), ((3, 5), (37, 41)), ((1, 1), (4, 4)),
         ((8, 8), (8, 8))]


@pytest.mark.parametrize("in_size,out_size", SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_resize_matches_aten(in_size, out_size, dtype):
    x = torch.randn(2, 5, *in_size, generator=torch.Generator().manual_seed(0), dtype=dtype)
    out, expected = bicubic.resize(x, out_size), F.interpolate(x, size=out_size, mode="bicubic")
    # The same weights (computed in x's dtype as ATen computes them) and the same order, columns then rows; only the
    # order within each four-tap sum differs: a few ulps of the largest input (about 16 roundings of weights <= 1.3).
    eps = torch.finfo(dtype).eps
    assert out.dtype == dtype and out.shape == expected.shape
    assert_close_verbose(out, expected, atol=32 * eps * x.abs().max().item(), name="resize")


@pytest.mark.parametrize("in_size,out_size", SIZES)
def test_resize_gradient_matches_aten_in_float64(in_size, out_size):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, *in_size, generator=generator, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(1, 3, *out_size, generator=generator, dtype=torch.float64)
    (actual,) = torch.autograd.grad(bicubic.resize(x, out_size), x, grad)
    (expected,) = torch.autograd.grad(F.interpolate(x, size=out_size, mode="bicubic"), x, grad)
    # Each input cell sums up to 16 * (out / in)^2 weighted gradients: fp64 rounding of sums of O(100) terms.
    assert_close_verbose(actual, expected, atol=1e-12 * grad.abs().sum().item(), name="gradient")


def test_resize_keeps_low_precision_and_ignores_autocast():
    x = torch.randn(1, 4, 7, 7, generator=torch.Generator().manual_seed(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = bicubic.resize(x, (16, 16))
    assert out.dtype == torch.float32
    assert_close_verbose(out, F.interpolate(x, size=(16, 16), mode="bicubic"), atol=1e-5, name="under autocast")
    low = bicubic.resize(x.bfloat16(), (16, 16))
    assert low.dtype == torch.bfloat16
    # computed in fp32 and rounded once, as ATen's bf16 resize: at most one bf16 rounding apart
    assert_close_verbose(low.float(), F.interpolate(x.bfloat16(), size=(16, 16), mode="bicubic").float(),
                         atol=2 ** -7 * x.abs().max().item(), name="bf16")


def test_resize_names_the_expected_shape():
    with pytest.raises(ValueError, match=r"expected a \(B, C, H, W\) map, got shape \(4, 7, 7\)"):
        bicubic.resize(torch.zeros(4, 7, 7), (8, 8))


def test_trunk_resizes_with_matrices_only_where_it_takes_gradients(monkeypatch):
    calls = []
    resize = bicubic.resize
    monkeypatch.setattr(bicubic, "resize", lambda x, size: calls.append(tuple(size)) or resize(x, size))
    _, encoder = encoder_pair("sam2.1_hiera_tiny")
    image = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        encoder(image)
    assert calls == []  # inference: ATen's resize, cached
    encoder.train()
    try:
        out = encoder(image)
        sum(level.sum() for level in out["backbone_fpn"]).backward()
        assert calls == [(16, 24)]
        assert encoder.trunk.pos_embed.grad is not None and encoder.trunk.pos_embed.grad.abs().sum() > 0
    finally:
        # The encoder is encoder_pair's, shared with later tests: leave it as found.
        encoder.eval().zero_grad(set_to_none=True)
