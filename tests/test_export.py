"""sam2_fast.export_encoder / load_exported: an AOTInductor package of the encoder, loaded in a fresh process
without compiling, gives the eager encoder's outputs. On CPU the package calls the C++ extension's ops."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import sam2_fast
from sam2_fast import FpnNeck, Hiera, ImageEncoder, PositionEmbeddingSine
from sam2_fast.backends import extension as _extension

from helpers import FP32_RELATIVE_TOLERANCE, assert_close_verbose, flat_outputs, randomize_

# The whole pipeline (export, AOTInductor's C++ compile, load) on a small encoder with every kind of block of the
# real ones (windowed, q-pooled, global, padded windows, the FPN top-down path): inductor's CPU compile of a real
# config costs minutes on 2 cores and checks nothing more about the packaging.
IMAGE_SHAPE = (2, 3, 96, 128)


def _small_encoder() -> ImageEncoder:
    trunk = Hiera(embed_dim=16, num_heads=1, stages=(1, 1, 2, 1), global_att_blocks=(3,),
                  window_pos_embed_bkg_spatial_size=(4, 4), window_spec=(8, 4, 6, 4))
    neck = FpnNeck(PositionEmbeddingSine(num_pos_feats=32), d_model=32, backbone_channel_list=[128, 64, 32, 16],
                   fpn_top_down_levels=[2, 3], fpn_interp_model="nearest")
    return randomize_(ImageEncoder(trunk, neck, scalp=1), seed=11).eval()


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """(encoder, path) of a package exported with a dynamic batch, on the backend auto picks here."""
    encoder = _small_encoder()
    path = str(tmp_path_factory.mktemp("export") / "encoder.pt2")
    example = torch.randn(IMAGE_SHAPE, generator=torch.Generator().manual_seed(0))
    assert sam2_fast.export_encoder(encoder, example, path, dynamic_batch=True, max_batch=8) == path
    return encoder, path


# Loads the package with inductor's compiler made unusable: nothing may be compiled on load or call.
FRESH_PROCESS = textwrap.dedent("""
    import sys
    import torch
    import torch._inductor.compile_fx as compile_fx

    def refuse(*args, **kwargs):
        raise AssertionError("the package was compiled again")

    compile_fx.compile_fx = compile_fx.compile_fx_inner = refuse
    import sam2_fast

    encoder = sam2_fast.load_exported(sys.argv[1])
    images = torch.load(sys.argv[2])
    torch.save({str(batch): encoder(images[:batch]) for batch in (1, 3)}, sys.argv[3])
    print(encoder.metadata["extension_ops"])
""")


def test_package_in_a_fresh_process_matches_eager(package, tmp_path):
    encoder, path = package
    images = torch.randn(3, *IMAGE_SHAPE[1:], generator=torch.Generator().manual_seed(1))
    torch.save(images, tmp_path / "images.pt")
    result = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, path, str(tmp_path / "images.pt"), str(tmp_path / "out.pt")],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    outputs = torch.load(tmp_path / "out.pt")
    for batch in (1, 3):
        with torch.no_grad():
            expected = encoder(images[:batch])
        for (name, actual), (_, wanted) in zip(flat_outputs(outputs[str(batch)]), flat_outputs(expected)):
            # inductor reorders and fuses float math around the ops: fp32 rounding, as in the parity tests.
            scale = max(1.0, wanted.abs().max().item())
            assert_close_verbose(actual, wanted.expand_as(actual), atol=FP32_RELATIVE_TOLERANCE * scale,
                                 name=f"batch {batch} {name}")
    if _extension.load_error() is None:
        # On CPU the package runs the extension's attention, pooling and FPN ops, not copies of torch's.
        called = set(json.loads(result.stdout.strip().splitlines()[-1].replace("'", '"')))
        assert {"window_attention", "global_attention", "maxpool2x2", "fpn_upsample_add"} <= called, called


def test_loaded_package_checks_its_input(package):
    _, path = package
    encoder = sam2_fast.load_exported(path)
    assert encoder.metadata["input_shape"] == list(IMAGE_SHAPE) and encoder.metadata["dynamic_batch"]
    # Rejected by shape or dtype before any value is read: zeros do.
    with pytest.raises(ValueError, match=r"exported for images of shape \(B in 1\.\.8, 3, 96, 128\), got \(1, 3, 96, 96\)"):
        encoder(torch.zeros(1, 3, 96, 96))
    with pytest.raises(ValueError, match=r"got \(9, 3, 96, 128\)"):
        encoder(torch.zeros(9, 3, 96, 128))
    with pytest.raises(TypeError, match="exported for float32 images, got torch.float64"):
        encoder(torch.zeros(1, 3, 96, 128, dtype=torch.float64))


def test_export_and_load_errors(tmp_path):
    encoder = _small_encoder()
    image = torch.zeros(1, 3, 96, 128)  # every call below fails before it reads a value
    with pytest.raises(ValueError, match=r"with B >= 1 and H, W positive multiples of 32, got \(1, 3, 90, 128\)"):
        sam2_fast.export_encoder(encoder, torch.zeros(1, 3, 90, 128), tmp_path / "e.pt2")
    with pytest.raises(ValueError, match="AOTInductor packages are .pt2 files"):
        sam2_fast.export_encoder(encoder, image, tmp_path / "e.pt")
    with pytest.raises(ValueError, match="autocast_dtype must be torch.bfloat16, torch.float16 or None"):
        sam2_fast.export_encoder(encoder, image, tmp_path / "e.pt2", autocast_dtype=torch.float32)
    with pytest.raises(TypeError, match="expects a sam2_fast.ImageEncoder"):
        sam2_fast.export_encoder(torch.nn.Linear(2, 2), image, tmp_path / "e.pt2")
    with pytest.raises(FileNotFoundError, match="exported encoder package not found"):
        sam2_fast.load_exported(tmp_path / "missing.pt2")
    assert not os.path.exists(tmp_path / "e.pt2")
