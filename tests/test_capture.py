"""sam2_fast.capture_cuda_graphs: graph-captured inference.

On CPU: the API's errors, its eager fallback, and its bookkeeping (one graph per shape, dtype and mode, eviction,
outputs that stay valid, weights that move or reload) with a stand-in recorder whose "graph" replays the recorded
forward eagerly into the same static buffers. On a GPU (marked): real CUDA graphs against the eager encoder and
the reference.
"""

import copy
import warnings

import pytest
import torch

import sam2_fast
from sam2_fast.deploy.capture import CudaGraphImageEncoder
from sam2_fast.testing.reference import build_reference_encoder

from helpers import FP32_RELATIVE_TOLERANCE, assert_close_verbose, flat_outputs, seeded_state

NAME = "sam2.1_hiera_tiny"


@pytest.fixture(scope="module")
def encoder():
    encoder = sam2_fast.build_image_encoder(NAME)
    encoder.load_state_dict(seeded_state(NAME))
    return encoder


def _image(batch=1, height=64, width=96, seed=0, device="cpu", dtype=torch.float32):
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed)).to(device, dtype)


def _eager(captured, x):
    """What the encoder a captured one was made from computes, eagerly."""
    return sam2_fast.ImageEncoder.forward(captured, x)


def _assert_same_outputs(actual, expected, atol=0.0):
    for (name, a), (_, e) in zip(flat_outputs(actual), flat_outputs(expected)):
        assert_close_verbose(a, e, atol=atol * max(1.0, e.abs().max().item()), name=name)


# ---------------------------------------------------------------------------------------------------------------
# The API on any machine

def test_refuses_what_it_cannot_capture(encoder):
    with pytest.raises(TypeError, match="expects a sam2_fast.ImageEncoder .* got sam2.modeling"):
        sam2_fast.capture_cuda_graphs(build_reference_encoder(NAME))
    with pytest.raises(ValueError, match="max_graphs must be a positive integer, got 0"):
        sam2_fast.capture_cuda_graphs(encoder, max_graphs=0)
    with pytest.raises(TypeError, match="already replays CUDA graphs"):
        sam2_fast.capture_cuda_graphs(sam2_fast.capture_cuda_graphs(encoder))


def test_shares_the_encoder_and_its_keys(encoder):
    captured = sam2_fast.capture_cuda_graphs(encoder)
    assert isinstance(captured, sam2_fast.ImageEncoder) and not captured.training
    assert captured.trunk is encoder.trunk and captured.neck is encoder.neck
    assert list(captured.state_dict()) == list(encoder.state_dict())
    assert all(a is b for a, b in zip(captured.parameters(), encoder.parameters()))


def test_cpu_runs_eagerly_with_one_warning(encoder):
    captured = sam2_fast.capture_cuda_graphs(encoder)
    x = _image()
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        expected = encoder(x)
        actual = captured(x)
        captured(x)
    _assert_same_outputs(actual, expected)
    messages = [str(w.message) for w in caught if "CUDA graphs" in str(w.message)]
    assert messages == ["capture_cuda_graphs: CUDA graphs need CUDA tensors, got a cpu tensor; running the encoder "
                        "eagerly"], messages
    assert captured.num_graphs == 0


def test_refuses_gradients_and_bad_input(encoder):
    captured = sam2_fast.capture_cuda_graphs(encoder)
    with pytest.raises(RuntimeError, match="runs inference only.*torch.inference_mode"):
        captured(_image())  # grad mode on, parameters require grad
    with torch.no_grad(), pytest.raises(ValueError, match=r"expected input of shape \(B, 3, H, W\) .* got \(1, 3, 60, 96\)"):
        captured(_image(height=60))
    with torch.no_grad(), pytest.raises(ValueError, match=r"expected input of shape \(B, 3, H, W\), got \(3, 64, 96\)"):
        captured(_image()[0])


# ---------------------------------------------------------------------------------------------------------------
# The bookkeeping, with a stand-in recorder on CPU

class _EagerReplay:
    """Stands in for a CUDA graph: replay() reruns the recorded forward and writes its results into the static
    output buffers, as a graph replay rewrites them in place."""

    def __init__(self, run, static_output):
        self.run, self.static_output, self.replays = run, static_output, 0

    def replay(self):
        self.replays += 1
        fresh = self.run()
        for (_, static), (_, new) in zip(flat_outputs(self.static_output), flat_outputs(fresh)):
            if static.data_ptr() != new.data_ptr():
                static.copy_(new)


@pytest.fixture
def recorded(monkeypatch, encoder):
    """A captured encoder that 'records' CPU inputs with the stand-in, and the list of its recordings."""
    recordings = []

    def record(self, run, device):
        for _ in range(self.warmup_calls):
            run()
        static_output = run()
        graph = _EagerReplay(run, static_output)
        recordings.append(graph)
        return graph, static_output

    monkeypatch.setattr(CudaGraphImageEncoder, "capture_device_type", "cpu")
    monkeypatch.setattr(CudaGraphImageEncoder, "_record", record)
    return sam2_fast.capture_cuda_graphs(copy.deepcopy(encoder), max_graphs=2), recordings


def test_one_graph_per_shape_dtype_and_mode_replayed_after(recorded):
    captured, recordings = recorded
    with torch.no_grad():
        for seed in range(3):
            x = _image(seed=seed)
            _assert_same_outputs(captured(x), _eager(captured, x))
    assert len(recordings) == 1 and recordings[0].replays == 3
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        captured(_image())
    assert len(recordings) == 2  # the autocast state is part of the key
    with torch.inference_mode():
        captured(_image())
    assert len(recordings) == 3 and captured.num_graphs == 2  # max_graphs=2: the least recently used went


def test_outputs_stay_valid_after_later_calls_unless_asked_not_to(recorded):
    captured, _ = recorded
    with torch.no_grad():
        first, second = captured(_image(seed=1)), captured(_image(seed=2))
        expected_first = _eager(captured, _image(seed=1))
        _assert_same_outputs(first, expected_first)
        assert first["vision_features"] is first["backbone_fpn"][-1]
        assert not torch.equal(first["vision_features"], second["vision_features"])
        # The position encodings are the encoder's cached ones, shared and never rewritten.
        assert first["vision_pos_enc"][0].data_ptr() == second["vision_pos_enc"][0].data_ptr()
        captured.copy_outputs = False
        static_first = captured(_image(seed=1))
        captured(_image(seed=2))
    assert torch.equal(static_first["vision_features"], second["vision_features"])  # overwritten, as documented


def test_moved_or_reloaded_weights_are_recorded_again(recorded, encoder):
    captured, recordings = recorded
    with torch.no_grad():
        captured(_image())
        # In place (load_state_dict copies): the pos-embed cache derives from the weights, so graphs go.
        state = {k: v + 0.01 for k, v in encoder.state_dict().items()}
        captured.load_state_dict(state)
        reloaded = captured(_image())
        assert len(recordings) == 2
        expected = _eager(captured, _image())
        _assert_same_outputs(reloaded, expected)
        # assign=True puts other tensors in the modules.
        captured.load_state_dict(state, assign=True)
        captured(_image())
        assert len(recordings) == 3
        captured(_image())
        assert len(recordings) == 3


def test_backend_is_part_of_the_key(recorded):
    captured, recordings = recorded
    with torch.no_grad():
        captured(_image())
        with sam2_fast.use_backend("torch"):
            torch_out = captured(_image())
        assert len(recordings) == 2
        _assert_same_outputs(torch_out, captured(_image()), atol=FP32_RELATIVE_TOLERANCE)


# ---------------------------------------------------------------------------------------------------------------
# Real CUDA graphs

GPU_CASES = [  # (batch, height, width, mode)
    (1, 1024, 1024, "bf16-autocast"), (2, 512, 512, "bf16-autocast"), (1, 512, 768, "bf16"), (3, 256, 256, "fp32"),
]


def _run_mode(mode):
    if mode == "bf16-autocast":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cuda", enabled=False)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
def test_gpu_capture_matches_eager_at_several_shapes(encoder, backend):
    cuda_encoder = copy.deepcopy(encoder).cuda()
    captured = sam2_fast.capture_cuda_graphs(cuda_encoder, max_graphs=3)
    results = []
    with sam2_fast.use_backend(backend), torch.inference_mode():
        for batch, height, width, mode in GPU_CASES:
            model = captured.to(torch.bfloat16) if mode == "bf16" else captured.float()
            x = _image(batch, height, width, seed=height, device="cuda",
                       dtype=torch.bfloat16 if mode == "bf16" else torch.float32)
            with _run_mode(mode):
                expected = _eager(model, x)
                first, second = model(x), model(x)
            results.append((first, expected))
            # Same kernels, same inputs: a replay computes what eager does, up to kernel selection.
            _assert_same_outputs(first, expected, atol=1e-3 if mode != "fp32" else 1e-5)
            _assert_same_outputs(second, first)
        # Outputs of earlier calls are copies: later replays did not touch them.
        for first, expected in results[-2:]:
            _assert_same_outputs(first, expected, atol=1e-3)
    assert captured.num_graphs <= 3


@pytest.mark.gpu
def test_gpu_captured_encoder_matches_the_reference():
    from helpers import check_low_precision_outputs, encoder_pair, run_encoder

    reference, ours = encoder_pair("sam2.1_hiera_base_plus")
    reference, ours = reference.cuda(), copy.deepcopy(ours).cuda()
    x = _image(2, 1024, 1024, device="cuda")
    captured = sam2_fast.capture_cuda_graphs(ours)
    exact = run_encoder(reference, x)
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        captured(x)
        ours_low = captured(x)
    ours_error, reference_error = check_low_precision_outputs(exact, run_encoder(reference, x, torch.bfloat16), ours_low)
    print(f"\n[cuda parity] captured base_plus 1024 bf16 autocast: error {ours_error:.3g} "
          f"(reference's own {reference_error:.3g})")


@pytest.mark.gpu
def test_gpu_replay_follows_in_place_weight_updates(encoder):
    captured = sam2_fast.capture_cuda_graphs(copy.deepcopy(encoder).cuda())
    x = _image(1, 256, 256, device="cuda")
    with torch.inference_mode():
        captured(x)
    with torch.no_grad():
        for parameter in captured.neck.parameters():
            parameter.mul_(1.5)
    with torch.inference_mode():
        after = captured(x)
        expected = _eager(captured, x)
    _assert_same_outputs(after, expected, atol=1e-5)
