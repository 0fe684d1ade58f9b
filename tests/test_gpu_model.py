"""The whole encoder on a CUDA device against the reference `sam2` on the same device.

Every config at 1024x1024 (the resolution SAM-2 runs at, where stage 3's 64x64 map pads to windows of 14 or 16)
in fp32 and bf16 autocast with the ``auto`` backend (Triton kernels), every backend that runs on CUDA on a padded
non-square batch of three, the encoder cast to bf16, and ``torch.compile(fullgraph=True)`` with Triton ops.
Each test prints its errors (run with ``-s`` to see them). Skipped without a CUDA device.
"""

from __future__ import annotations

import copy

import pytest
import torch

import sam2_fast
from sam2_fast.backends import extension as _extension
from sam2_fast import ops
from sam2_fast.io.configs import CONFIGS

from helpers import (
    check_fp32_outputs, check_low_precision_outputs, encoder_pair, flat_outputs, max_abs_error, run_encoder,
)

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def exact_fp32_reference():
    """The reference in plain fp32: cuDNN's convolutions default to TF32 (10-bit mantissa), which alone would
    put ~1e-3 of noise between two runs of the patch embedding; torch's matmuls already default to full fp32."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _cuda_pair(name: str):
    reference, ours = encoder_pair(name)
    return copy.deepcopy(reference).cuda(), copy.deepcopy(ours).cuda()


def _image(batch: int, height: int, width: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed)).cuda()


def _check_fp32_and_bf16_autocast(reference, ours, x: torch.Tensor, backend: str, label: str) -> None:
    """Ours under ``backend`` against the reference on ``x``: fp32 to FP32_RELATIVE_TOLERANCE, bf16 autocast within
    twice the reference's own bf16 error; prints both errors."""
    expected = run_encoder(reference, x)
    with sam2_fast.use_backend(backend):
        fp32_error = check_fp32_outputs(expected, run_encoder(ours, x))
        ours_low = run_encoder(ours, x, torch.bfloat16)
    ours_error, reference_error = check_low_precision_outputs(
        expected, run_encoder(reference, x, torch.bfloat16), ours_low
    )
    print(f"\n[cuda parity] {label}: fp32 error {fp32_error:.3g}; bf16 autocast error "
          f"{ours_error:.3g} (reference's own {reference_error:.3g})")


def test_backends_resolve_to_their_cuda_kernels():
    with sam2_fast.use_backend("auto"):
        resolved = ops.active_backends("cuda")
    # Global attention: torch's flash SDPA measured faster than the Triton kernel (see the auto_order of sam2_fast.ops.specs.GLOBAL_ATTENTION).
    assert resolved["window_attention"] == "triton" and resolved["global_attention"] == "torch", resolved
    with sam2_fast.use_backend("triton"):
        assert ops.active_backends("cuda")["global_attention"] == "triton"
    if "cuda" in _extension.device_types():
        with sam2_fast.use_backend("extension"):
            resolved = ops.active_backends("cuda")
        assert resolved["maxpool2x2"] == resolved["fpn_upsample_add"] == "extension", resolved


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_config_1024_fp32_and_bf16_autocast(name):
    reference, ours = _cuda_pair(name)
    _check_fp32_and_bf16_autocast(reference, ours, _image(1, 1024, 1024, seed=11), "auto", f"{name} 1024x1024")


@pytest.mark.parametrize("backend", ["torch", "extension", "triton"])
def test_each_backend_on_padded_batch_of_three(backend):
    # 512x384: stage 3 is 32x24 (windows of 14 overhang both ways), stage 4 16x12 (windows of 7 overhang).
    if not ops.runs_whole_encoder(backend, "cuda"):
        pytest.skip(f"backend {backend!r} cannot run on CUDA: {sam2_fast.backend_status('cuda')[backend]}")
    reference, ours = _cuda_pair("sam2.1_hiera_base_plus")
    _check_fp32_and_bf16_autocast(reference, ours, _image(3, 512, 384, seed=12), backend, f"base_plus 3x512x384 {backend}")


@pytest.mark.parametrize("name", ["sam2.1_hiera_tiny", "sam2.1_hiera_large"])
def test_encoder_cast_to_bf16(name):
    reference, ours = _cuda_pair(name)
    x = _image(2, 1024, 1024, seed=13)
    expected = run_encoder(reference, x)
    reference_low, ours_low = copy.deepcopy(reference).bfloat16(), ours.bfloat16()
    with sam2_fast.use_backend("auto"):
        ours_out = run_encoder(ours_low, x.bfloat16())
    ours_error, reference_error = check_low_precision_outputs(
        expected, run_encoder(reference_low, x.bfloat16()), ours_out
    )
    print(f"\n[cuda parity] {name} cast to bf16: error {ours_error:.3g} (reference's own {reference_error:.3g})")


@pytest.mark.parametrize("autocast_dtype", [None, torch.bfloat16], ids=["fp32", "bf16-autocast"])
def test_compiled_encoder_fullgraph_matches_eager(autocast_dtype):
    _, ours = _cuda_pair("sam2.1_hiera_tiny")
    x = _image(1, 512, 512, seed=14)
    torch._dynamo.reset()
    with sam2_fast.use_backend("triton"):
        eager = run_encoder(ours, x, autocast_dtype)
        compiled = run_encoder(torch.compile(ours, fullgraph=True, dynamic=False), x, autocast_dtype)
    for (name, expected), (_, actual) in zip(flat_outputs(eager), flat_outputs(compiled)):
        assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != eager {expected.dtype}"
        # inductor fuses the elementwise work around the ops (LayerNorm, GELU, residual adds) and rounds
        # differently: fp32 to a few ulps per layer, bf16 to its own rounding of those intermediates.
        tolerance = 1e-4 if autocast_dtype is None else 5e-2
        scale = max(expected.float().abs().max().item(), 1.0)
        error = max_abs_error(actual, expected) / scale
        assert error <= tolerance, f"{name}: compiled vs eager error {error:.3g} > {tolerance:g}"


@pytest.mark.parametrize("mode", [None, "reduce-overhead"], ids=["default", "reduce-overhead"])
def test_compiled_encoder_keeps_our_kernels_and_compiles_once(mode):
    # The Triton ops are triton_ops: inductor compiles our kernels into its output code (no opaque sam2_fast op
    # calls) and, under reduce-overhead, CUDA-graphs the whole forward. Repeated calls of one shape never recompile.
    from torch._inductor.utils import run_and_get_code

    _, ours = _cuda_pair("sam2.1_hiera_tiny")
    x = _image(1, 512, 512, seed=15)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with sam2_fast.use_backend("auto"), torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        eager = ours(x)
        compiled = torch.compile(ours, mode=mode, fullgraph=True, dynamic=False)
        _, code = run_and_get_code(compiled, x)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for seed in range(3):
                out = compiled(_image(1, 512, 512, seed=seed))
            out = compiled(x)
    source = "\n".join(code)
    assert "_window_attention_kernel" in source, "inductor's code does not launch the window-attention kernel"
    assert "torch.ops.sam2_fast." not in source, "inductor's code calls an opaque sam2_fast custom op"
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    for (name, expected), (_, actual) in zip(flat_outputs(eager), flat_outputs(out)):
        scale = max(expected.float().abs().max().item(), 1.0)
        assert max_abs_error(actual, expected) / scale <= 5e-2, name


def test_exported_package_on_cuda_matches_eager(tmp_path):
    # An AOTInductor package on CUDA carries the Triton kernels; loaded again, it gives the eager outputs.
    _, ours = _cuda_pair("sam2.1_hiera_base_plus")
    x = _image(2, 1024, 1024, seed=16)
    path = sam2_fast.export_encoder(ours, x, tmp_path / "encoder.pt2", autocast_dtype=torch.bfloat16)
    loaded = sam2_fast.load_exported(path)
    assert loaded.metadata["backends"]["window_attention"] == "triton"
    actual = loaded(x)
    eager = run_encoder(ours, x, torch.bfloat16)
    for (name, expected), (_, got) in zip(flat_outputs(eager), flat_outputs(actual)):
        scale = max(expected.float().abs().max().item(), 1.0)
        error = max_abs_error(got, expected) / scale
        print(f"\n[cuda parity] exported base_plus {name}: vs eager {error:.3g}")
        assert error <= 5e-2, f"{name}: exported vs eager error {error:.3g}"
