"""sam2_fast.optimize on Hugging Face transformers' SAM-2 models (Sam2Model, Sam2VideoModel, Sam2VisionModel): the
vision encoder's forward runs sam2_fast's encoder on the model's own Parameters, the state_dict and checkpoints are
untouched, and what the model's methods return is what they returned before.

Models: the tiny config's encoder at 128x128 (transformers lets the image size be set), seeded weights
(sam2_fast.testing.transformers_models)."""

import copy
import functools
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sam2_fast
from sam2_fast import ops
from sam2_fast.io.configs import get_config
from sam2_fast.testing.transformers_models import build_transformers_model, import_transformers

import needs_torchvision
from helpers import assert_fp32_close

try:
    transformers = import_transformers()
except ImportError as error:
    pytest.skip(f"transformers does not import here ({error})", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ is a package at the repo root

from bench import transformers_embeddings  # noqa: E402

IMAGE_SIZE = 128
CONFIG = "sam2.1_hiera_tiny"
PIXELS = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(31))
POINTS = torch.tensor([[[[35.0, 45.0], [100.0, 20.0]]], [[[10.0, 115.0], [64.0, 64.0]]]])  # (B, 1, 2, 2)
LABELS = torch.tensor([[[1, 0]], [[1, 1]]])
BOXES = torch.tensor([[[15.0, 20.0, 100.0, 90.0]], [[0.0, 5.0, 60.0, 125.0]]])  # (B, 1, 4)


@functools.lru_cache(maxsize=3)
def _built(kind: str):
    return build_transformers_model(kind, CONFIG, IMAGE_SIZE, seed=32)


def _model(kind: str):
    """A fresh copy of a seeded model (building one runs transformers' initialisation, seconds on 2 cores)."""
    return copy.deepcopy(_built(kind))


def _vision_model(model):
    return model if isinstance(model, transformers.Sam2VisionModel) else model.vision_encoder


def _assert_all_close(actual, expected, name: str):
    """Tensors, or (nested) tuples and lists of them, ``None`` where ``expected`` has ``None``."""
    if isinstance(expected, (tuple, list)):
        assert isinstance(actual, (tuple, list)) and len(actual) == len(expected), f"{name}: {actual!r}"
        for index, (a, e) in enumerate(zip(actual, expected)):
            _assert_all_close(a, e, f"{name}[{index}]")
    elif expected is None:
        assert actual is None, name
    else:
        assert_fp32_close(actual, expected, name)


def _vision_outputs(vision_model, **kwargs):
    with torch.no_grad():
        out = vision_model(PIXELS, **kwargs)
    return {key: out[key] for key in out.keys()}


@pytest.mark.parametrize("kind", ["Sam2Model", "Sam2VideoModel", "Sam2VisionModel"])
def test_optimize_shares_the_parameters_and_keeps_the_state_dict(kind):
    model = _model(kind)
    parameters_before = dict(model.named_parameters())
    pointers_before = {name: p.data_ptr() for name, p in parameters_before.items()}
    state_before = model.state_dict()

    assert sam2_fast.optimize(model) is model
    encoder = _vision_model(model).forward.encoder
    assert isinstance(encoder, sam2_fast.OptimizedImageEncoder)
    # Shared, not copied: the encoder's parameters are the model's Parameter objects, at the same addresses.
    model_parameters = {id(p) for p in model.parameters()}
    assert all(id(p) in model_parameters for p in encoder.parameters())
    assert sum(1 for _ in encoder.parameters()) == sum(1 for _ in _vision_model(model).parameters())
    assert {name: p.data_ptr() for name, p in model.named_parameters()} == pointers_before
    assert all(p is parameters_before[name] for name, p in model.named_parameters())
    state_after = model.state_dict()
    assert list(state_after) == list(state_before)
    assert all(torch.equal(state_after[key], value) for key, value in state_before.items())
    # Loading weights into the model reaches our encoder.
    state_after["vision_encoder.backbone.pos_embed" if kind != "Sam2VisionModel" else "backbone.pos_embed"].zero_()
    model.load_state_dict(state_after)
    assert encoder.trunk.pos_embed.abs().max() == 0


def test_save_pretrained_round_trip(tmp_path):
    model = _model("Sam2Model")
    plain = copy.deepcopy(model)
    sam2_fast.optimize(model)
    model.save_pretrained(tmp_path)
    loaded = transformers.Sam2Model.from_pretrained(tmp_path).eval()
    assert type(loaded.vision_encoder.forward).__name__ == "method"  # a plain transformers model
    state, expected = loaded.state_dict(), plain.state_dict()
    assert list(state) == list(expected)
    for key, value in expected.items():
        assert torch.equal(state[key], value), key
    with torch.no_grad():
        _assert_all_close(model.get_image_embeddings(PIXELS), loaded.get_image_embeddings(PIXELS), "embeddings")


@pytest.mark.parametrize("backend", [None, "torch"], ids=["default-backend", "torch-backend"])
def test_image_embeddings_and_prompted_masks_match(backend):
    model = _model("Sam2Model")
    with torch.no_grad():
        expected = [model.get_image_embeddings(PIXELS),
                    model(pixel_values=PIXELS, input_points=POINTS, input_labels=LABELS),
                    model(pixel_values=PIXELS, input_boxes=BOXES)]
    sam2_fast.optimize(model, backend=backend)
    with torch.no_grad():
        actual = [model.get_image_embeddings(PIXELS),
                  model(pixel_values=PIXELS, input_points=POINTS, input_labels=LABELS),
                  model(pixel_values=PIXELS, input_boxes=BOXES)]
    _assert_all_close(actual[0], expected[0], "get_image_embeddings")
    for prompt, got, want in (("points", actual[1], expected[1]), ("boxes", actual[2], expected[2])):
        for key in ("pred_masks", "iou_scores", "object_score_logits", "image_embeddings"):
            _assert_all_close(got[key], want[key], f"forward with {prompt}: {key}")


def test_pinned_backend_is_used_whatever_the_process_wide_one():
    model = _model("Sam2VisionModel")
    expected = _vision_outputs(model)
    sam2_fast.optimize(model, backend="torch")
    with ops.use_backend("triton"):
        if ops.runs_whole_encoder("triton", "cpu"):
            pytest.skip("the Triton backend runs on CPU here (TRITON_INTERPRET=1): no unavailable backend to pin past")
        actual = _vision_outputs(model)
    _assert_all_close(actual["fpn_hidden_states"], expected["fpn_hidden_states"], "fpn_hidden_states")


def test_vision_model_outputs_match_with_and_without_hidden_states():
    model = _model("Sam2VisionModel")
    expected = {flag: _vision_outputs(model, output_hidden_states=flag) for flag in (False, True, (0, 5))}
    with torch.no_grad():
        expected_tuple = model(PIXELS, return_dict=False)
    sam2_fast.optimize(model)
    for flag, want in expected.items():
        got = _vision_outputs(model, output_hidden_states=flag)
        assert list(got) == list(want), flag
        for key in want:
            _assert_all_close(got[key], want[key], f"output_hidden_states={flag}: {key}")
    # 1 + one per block: the first block's input, then each block's output (the last one is last_hidden_state).
    assert len(expected[True]["hidden_states"]) == 1 + sum(get_config(CONFIG).stages)
    with torch.no_grad():
        _assert_all_close(model(PIXELS, return_dict=False), expected_tuple, "return_dict=False")


def test_output_attentions_is_refused():
    model = _model("Sam2Model")
    sam2_fast.optimize(model)
    with pytest.raises(ValueError, match="output_attentions=True cannot be honoured"):
        model.vision_encoder(PIXELS, output_attentions=True)
    with pytest.raises(ValueError, match="output_attentions=True cannot be honoured"), torch.no_grad():
        model(pixel_values=PIXELS, input_points=POINTS, output_attentions=True)


def _session(video: torch.Tensor):
    return transformers.Sam2VideoInferenceSession(video=video, video_height=IMAGE_SIZE, video_width=IMAGE_SIZE,
                                                  dtype=torch.float32)


def test_video_model_frame_features_match():
    model = _model("Sam2VideoModel")
    video = PIXELS  # two frames
    with torch.no_grad():
        expected = model.get_image_features(video[:1])
        expected_frame = model._prepare_vision_features(
            _session(video),
            frame_idx=1, batch_size=1)
    sam2_fast.optimize(model)
    with torch.no_grad():
        actual = model.get_image_features(video[:1])
        # What propagation calls per frame (features of a session's frame, cached in the session).
        actual_frame = model._prepare_vision_features(
            _session(video),
            frame_idx=1, batch_size=1)
    for key in ("fpn_hidden_states", "fpn_position_encoding", "last_hidden_state"):
        _assert_all_close(actual[key], expected[key], f"get_image_features {key}")
    _assert_all_close(actual_frame, expected_frame, "_prepare_vision_features")


def _flat_levels(*outputs):
    """(name, each output's tensor) for last_hidden_state and every fpn_hidden_states level."""
    names = ["last_hidden_state"] + [f"fpn_hidden_states[{i}]" for i in range(len(outputs[0]["fpn_hidden_states"]))]
    tensors = [[out["last_hidden_state"], *out["fpn_hidden_states"]] for out in outputs]
    return [(name, *level) for name, *level in zip(names, *tensors)]


def test_bf16_computes_in_bf16_and_returns_the_models_dtype():
    model = _model("Sam2Model")
    reference_bf16 = copy.deepcopy(model.vision_encoder).to(torch.bfloat16)
    exact = _vision_outputs(model.vision_encoder)
    reference_low = _vision_outputs(reference_bf16)  # transformers casts the image to its weights' dtype
    sam2_fast.optimize(model, dtype=torch.bfloat16)
    assert model.vision_encoder.backbone.pos_embed.dtype == torch.bfloat16  # the shared weights, cast
    ours = _vision_outputs(model.vision_encoder)
    for name, e, r, o in _flat_levels(exact, reference_low, ours):
        assert o.dtype == torch.float32, name
        # As for sam2 models: no further from fp32 than twice the reference's own bf16 error, plus 1% of the
        # output's magnitude for outputs both compute exactly.
        reference_error = (r.double() - e.double()).abs().max().item()
        our_error = (o.double() - e.double()).abs().max().item()
        assert our_error <= 2 * reference_error + 1e-2 * e.abs().max().item(), (name, our_error, reference_error)
    with torch.no_grad():
        masks = model(pixel_values=PIXELS, input_boxes=BOXES).pred_masks  # the fp32 heads take our outputs
    assert masks.dtype == torch.float32


@pytest.mark.parametrize("setting, value, message", [
    ("patch_stride", [2, 2], r"backbone_config.patch_stride=\[2, 2\]: sam2_fast's Hiera needs \[4, 4\]"),
    ("mlp_ratio", 3.0, r"backbone_config.mlp_ratio=3.0: sam2_fast's Hiera needs 4.0"),
    ("hidden_act", "relu", r"backbone_config.hidden_act='relu': sam2_fast's Hiera needs 'gelu'"),
    ("num_attention_heads_per_stage", [1, 2, 3, 8],
     r"num_attention_heads_per_stage=\[1, 2, 3, 8\]: sam2_fast's Hiera grows it by one factor per stage"),
])
def test_config_that_sam2_fast_cannot_express_is_refused(setting, value, message):
    model = _model("Sam2VisionModel")
    setattr(model.backbone.config, setting, value)  # what a checkpoint's config.json could say
    with pytest.raises(ValueError, match=message):
        sam2_fast.optimize(model)


class _LookalikeSam2(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.vision_encoder = torch.nn.Identity()


@pytest.mark.parametrize("model", [_LookalikeSam2(), torch.nn.Linear(2, 2)], ids=["lookalike", "linear"])
def test_unrecognised_model_names_what_was_expected(model):
    with pytest.raises(TypeError, match=r"expected a SAM-2 model .*transformers.Sam2Model, Sam2VideoModel or "
                                        r"Sam2VisionModel"):
        sam2_fast.optimize(model)


def test_transformers_model_with_a_foreign_vision_encoder_is_refused():
    model = _model("Sam2Model")
    model.vision_encoder.neck = torch.nn.Identity()
    with pytest.raises(TypeError, match=r"expected the vision model's neck to be "
                                        r"transformers.models.sam2.modeling_sam2.Sam2VisionNeck, got "
                                        r"torch.nn.modules.linear.Identity"):
        sam2_fast.optimize(model)


def test_importing_sam2_fast_does_not_import_transformers():
    code = "import sys, sam2_fast; assert 'transformers' not in sys.modules, 'transformers was imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_mask_generation_pipeline_gives_the_same_masks():
    # transformers' Sam2ImageProcessor (and so the mask-generation pipeline) needs torchvision.
    needs_torchvision.import_module("torchvision")
    import numpy as np
    from PIL import Image

    processor = transformers.Sam2ImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    model = _model("Sam2Model")
    generator = transformers.pipeline("mask-generation", model=model, image_processor=processor, device="cpu")
    pixels = np.random.default_rng(33).integers(0, 256, size=(120, 160, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    # Keep every mask the random heads make (the default thresholds could leave none to compare).
    options = dict(points_per_crop=4, points_per_batch=16, pred_iou_thresh=-1.0, stability_score_thresh=-1.0)
    expected = generator(image, **options)
    sam2_fast.optimize(model)
    actual = generator(image, **options)
    assert len(actual["masks"]) == len(expected["masks"])
    assert_fp32_close(torch.as_tensor(actual["scores"]), torch.as_tensor(expected["scores"]), "scores")
    for index, (got, want) in enumerate(zip(actual["masks"], expected["masks"])):
        # Binarised masks: a pixel whose logit lies within rounding of the threshold may flip.
        assert np.mean(np.asarray(got) != np.asarray(want)) < 1e-3, f"mask {index}"


def test_benchmark_runs_and_writes_its_table(tmp_path, capsys):
    transformers_embeddings.main(["--config", "tiny", "--size", "64", "--rounds", "2", "--out", str(tmp_path)])
    text = capsys.readouterr().out
    assert "| transformers | " in text and "| transformers + sam2_fast | " in text
    assert f"transformers {transformers.__version__}" in text and f"torch {torch.__version__}" in text
    written = sorted(path.suffix for path in tmp_path.iterdir())
    assert written == [".json", ".md"]
