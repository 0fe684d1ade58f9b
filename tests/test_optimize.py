"""sam2_fast.optimize on whole SAM-2 models built by sam2 itself: the image encoder is swapped in place, the
parameters are shared (not copied), and what SAM-2's heads receive is the reference's."""

import copy

import pytest
import torch

import sam2_fast
from sam2_fast import ops

import needs_torchvision
from helpers import (assert_fp32_close, check_low_precision_outputs, flat_outputs, global_rng_seeded,
                     randomize_)

build_sam = pytest.importorskip("sam2.build_sam")

IMAGE = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(21))


def _model(builder: str, config_file: str, seed: int = 22):
    """A SAM-2 model whose weights are a function of ``seed``: sam2's initialisation of the heads drawn from the
    seeded global RNG, the image encoder's from helpers.randomize_."""
    with global_rng_seeded(seed):
        model = getattr(build_sam, builder)(config_file, device="cpu")
    randomize_(model.image_encoder, seed)
    return model


def _head_inputs(model, image):
    """What SAM-2's heads get: forward_image's outputs, and _prepare_backbone_features' flattened ones."""
    with torch.no_grad():
        backbone_out = model.forward_image(image)
        _, vision_feats, vision_pos_embeds, feat_sizes = model._prepare_backbone_features(dict(backbone_out))
    return backbone_out, vision_feats, vision_pos_embeds, feat_sizes


def _assert_same_head_inputs(actual, expected):
    (backbone_a, feats_a, pos_a, sizes_a), (backbone_e, feats_e, pos_e, sizes_e) = actual, expected
    for (name, e), (_, a) in zip(flat_outputs(backbone_e), flat_outputs(backbone_a)):
        assert_fp32_close(a, e, f"forward_image {name}")
    assert sizes_a == sizes_e
    for level, (a, e) in enumerate(zip(feats_a, feats_e)):
        assert_fp32_close(a, e, f"_prepare_backbone_features vision_feats[{level}]")
    for level, (a, e) in enumerate(zip(pos_a, pos_e)):
        assert_fp32_close(a, e, f"_prepare_backbone_features vision_pos_embeds[{level}]")


@pytest.mark.parametrize("builder, config_file", [
    ("build_sam2", "configs/sam2.1/sam2.1_hiera_t.yaml"),
    ("build_sam2_video_predictor", "configs/sam2/sam2_hiera_s.yaml"),
])
def test_optimize_swaps_the_encoder_sharing_its_parameters(builder, config_file):
    model = _model(builder, config_file)
    expected = _head_inputs(model, IMAGE)
    parameters_before = dict(model.image_encoder.named_parameters())
    pointers_before = {name: p.data_ptr() for name, p in model.named_parameters()}
    state_keys_before = list(model.state_dict())

    assert sam2_fast.optimize(model) is model
    assert isinstance(model.image_encoder, sam2_fast.OptimizedImageEncoder)
    _assert_same_head_inputs(_head_inputs(model, IMAGE), expected)
    # Shared, not copied: the very Parameter objects, at the same addresses; the model's keys unchanged.
    parameters_after = dict(model.image_encoder.named_parameters())
    assert parameters_after.keys() == parameters_before.keys()
    for name, parameter in parameters_after.items():
        assert parameter is parameters_before[name], name
    assert {name: p.data_ptr() for name, p in model.named_parameters()} == pointers_before
    assert list(model.state_dict()) == state_keys_before
    # Loading weights into the model reaches our encoder (the tensors are the model's).
    state = model.state_dict()
    state["image_encoder.trunk.pos_embed"] = torch.zeros_like(state["image_encoder.trunk.pos_embed"])
    model.load_state_dict(state)
    assert model.image_encoder.trunk.pos_embed.abs().max() == 0


def test_backend_is_pinned_and_compile_traces_in_one_graph():
    model = _model("build_sam2", "configs/sam2.1/sam2.1_hiera_t.yaml")
    expected = _head_inputs(model, IMAGE)
    # The eager dynamo backend checks the whole forward traces with fullgraph, in seconds instead of inductor's
    # minutes on 2 cores.
    sam2_fast.optimize(model, backend="torch", compile={"backend": "eager", "fullgraph": True})
    # A process-wide backend that cannot run here (Triton on a CPU without the interpreter) is not used: the
    # encoder runs on the one it was given.
    with ops.use_backend("triton"):
        if ops.runs_whole_encoder("triton", "cpu"):
            pytest.skip("the Triton backend runs on CPU here (TRITON_INTERPRET=1): no unavailable backend to pin past")
        actual = _head_inputs(model, IMAGE)
    _assert_same_head_inputs(actual, expected)
    assert ops.get_backend() == "auto"


def test_unavailable_backend_is_refused():
    model = _model("build_sam2", "configs/sam2.1/sam2.1_hiera_t.yaml")
    if ops.runs_whole_encoder("triton", "cpu"):
        pytest.skip("the Triton backend runs on CPU here (TRITON_INTERPRET=1)")
    with pytest.raises(ops.BackendUnavailableError, match="backend 'triton' cannot run the encoder on cpu"):
        sam2_fast.optimize(model, backend="triton")


def test_low_precision_dtype_keeps_the_models_dtype():
    model = _model("build_sam2", "configs/sam2.1/sam2.1_hiera_t.yaml")
    reference_bf16 = copy.deepcopy(model.image_encoder).to(torch.bfloat16)
    with torch.no_grad():
        exact = model.image_encoder(IMAGE)
        reference_low = reference_bf16(IMAGE.to(torch.bfloat16))
    parameters_before = dict(model.image_encoder.named_parameters())

    sam2_fast.optimize(model, dtype=torch.bfloat16)
    for name, parameter in model.image_encoder.named_parameters():
        assert parameter is parameters_before[name] and parameter.dtype == torch.bfloat16, name
    with torch.no_grad():
        ours = model.image_encoder(IMAGE)
    # Outputs come back in the model's dtype; their error is judged as the reference's own bf16 run's.
    for name, tensor in flat_outputs(ours):
        assert tensor.dtype == torch.float32, name
    check_low_precision_outputs(exact, reference_low, _in_dtypes_of(ours, reference_low))
    with torch.no_grad():
        backbone_out = model.forward_image(IMAGE)  # SAM-2's fp32 head convs take our outputs as they are
    assert backbone_out["backbone_fpn"][0].dtype == torch.float32


def _in_dtypes_of(output: dict, like: dict) -> dict:
    """``output`` cast to the dtypes of ``like``'s tensors (check_low_precision_outputs compares dtypes too)."""
    return {
        "vision_features": output["vision_features"].to(like["vision_features"].dtype),
        "vision_pos_enc": [t.to(r.dtype) for t, r in zip(output["vision_pos_enc"], like["vision_pos_enc"])],
        "backbone_fpn": [t.to(r.dtype) for t, r in zip(output["backbone_fpn"], like["backbone_fpn"])],
    }


class _NotSam2(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.image_encoder = torch.nn.Identity()


@pytest.mark.parametrize("model", [torch.nn.Linear(2, 2), _NotSam2(), object()], ids=["linear", "lookalike", "object"])
def test_unrecognised_model_names_what_was_expected(model):
    with pytest.raises(TypeError, match=r"expected a SAM-2 model \(sam2.modeling.sam2_base.SAM2Base.*SAM2ImagePredictor"):
        sam2_fast.optimize(model)


def test_unrecognised_image_encoder_names_what_was_expected():
    model = build_sam.build_sam2("configs/sam2.1/sam2.1_hiera_t.yaml", device="cpu")
    model.image_encoder.neck = torch.nn.Identity()
    with pytest.raises(TypeError, match=r"expected image_encoder.neck to be "
                                        r"sam2.modeling.backbones.image_encoder.FpnNeck or sam2_fast.model.image_encoder.FpnNeck"):
        sam2_fast.optimize(model)


def _image_predictor_class():
    return needs_torchvision.import_module("sam2.sam2_image_predictor").SAM2ImagePredictor


@pytest.mark.slow
def test_image_predictor_set_image_and_batch():
    predictor_class = _image_predictor_class()
    # The predictor resizes to the model's 1024x1024: a few seconds per encoder call on 2 cores.
    images = [torch.rand(70, 90, 3, generator=torch.Generator().manual_seed(i)).mul(255).byte().numpy()
              for i in range(2)]
    predictor = predictor_class(_model("build_sam2", "configs/sam2.1/sam2.1_hiera_t.yaml"))
    predictor.set_image(images[0])
    single = copy.deepcopy(predictor._features)
    predictor.set_image_batch(images)
    batch = copy.deepcopy(predictor._features)

    assert sam2_fast.optimize(predictor) is predictor
    assert isinstance(predictor.model.image_encoder, sam2_fast.OptimizedImageEncoder)
    for set_call, expected in ((lambda: predictor.set_image(images[0]), single),
                               (lambda: predictor.set_image_batch(images), batch)):
        set_call()
        assert_fp32_close(predictor._features["image_embed"], expected["image_embed"], "image_embed")
        for level, (a, e) in enumerate(zip(predictor._features["high_res_feats"], expected["high_res_feats"])):
            assert_fp32_close(a, e, f"high_res_feats[{level}]")


def test_capture_keeps_the_encoders_backend_keys_and_outputs():
    # capture=True wraps the optimized encoder: its backend and compute dtype still apply (the wrapper records the
    # encoder's own forward), the model's keys and tensors stay. On CPU it runs eagerly (graphs need CUDA).
    model = _model("build_sam2", "configs/sam2.1/sam2.1_hiera_t.yaml")
    expected = _head_inputs(model, IMAGE)
    keys_before = list(model.state_dict())
    with pytest.raises(ValueError, match="pick one"):
        sam2_fast.optimize(model, compile=True, capture=True)
    sam2_fast.optimize(model, backend="torch", capture={"max_graphs": 2})
    assert isinstance(model.image_encoder, sam2_fast.CudaGraphImageEncoder) and model.image_encoder.max_graphs == 2
    assert list(model.state_dict()) == keys_before
    with ops.use_backend("triton"), pytest.warns(UserWarning, match="CUDA graphs need CUDA tensors"):
        if ops.runs_whole_encoder("triton", "cpu"):
            pytest.skip("the Triton backend runs on CPU here (TRITON_INTERPRET=1): no unavailable backend to pin past")
        actual = _head_inputs(model, IMAGE)
    _assert_same_head_inputs(actual, expected)


@pytest.mark.gpu
def test_capture_on_cuda_matches_the_reference_model():
    model = _model("build_sam2", "configs/sam2.1/sam2.1_hiera_t.yaml").cuda()
    image = IMAGE.cuda()
    expected = _head_inputs(model, image)
    sam2_fast.optimize(model, capture=True)
    _head_inputs(model, image)  # records
    _assert_same_head_inputs(_head_inputs(model, image), expected)
    assert model.image_encoder.num_graphs == 1
