"""torch.compile(fullgraph=True) and torch.export of the whole encoder, on every backend this machine runs."""

import pytest
import torch

import sam2_fast
from sam2_fast import ops

from helpers import flat_outputs, seeded_state

# Backends that run on CPU here (triton is tested under the interpreter in its own process).
CPU_BACKENDS = [b for b in ("torch", "extension") if ops.backend_status("cpu")[b]["maxpool2x2"] == "available"]


@pytest.fixture(scope="module")
def encoder():
    encoder = sam2_fast.build_image_encoder("sam2.1_hiera_tiny")
    encoder.load_state_dict(seeded_state("sam2.1_hiera_tiny"))
    return encoder


def _assert_outputs_close(actual, expected):
    for (name, a), (_, e) in zip(flat_outputs(actual), flat_outputs(expected)):
        assert a.dtype == e.dtype and a.shape == e.shape, name
        # inductor reorders and fuses float math; fp32 results agree to ~1e-6 relative per layer.
        torch.testing.assert_close(a, e, atol=1e-4 * max(1.0, e.abs().max().item()), rtol=1e-4, msg=name)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compile_fullgraph_matches_eager(encoder, backend):
    x = torch.randn(2, 3, 96, 160, generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    with sam2_fast.use_backend(backend), torch.no_grad():
        expected = encoder(x)
        explanation = torch._dynamo.explain(encoder)(x)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        # inductor's CPU codegen costs minutes on 2 cores; the extension's ops are opaque to it anyway, so their
        # check is that the whole graph traces through their fake implementations (aot_eager).
        compiled = torch.compile(encoder, fullgraph=True, backend="inductor" if backend == "torch" else "aot_eager")
        _assert_outputs_close(compiled(x), expected)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_export_matches_eager(encoder, backend):
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    with sam2_fast.use_backend(backend), torch.no_grad():
        expected = encoder(x)
        exported = torch.export.export(encoder, (x,))
        _assert_outputs_close(exported.module()(x), expected)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_repeated_calls_of_one_shape_compile_once(encoder, backend):
    # A compiled encoder is called in a loop: a guard that fails on each call (a cache, a counter, a fresh module
    # object in forward) would recompile every time. error_on_recompile turns any recompile into an error.
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(encoder, fullgraph=True, backend="aot_eager")
    with sam2_fast.use_backend(backend), torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        for seed in range(3):
            x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(seed))
            _assert_outputs_close(compiled(x), encoder(x))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
