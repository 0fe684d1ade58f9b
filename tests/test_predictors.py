"""SAM-2's own predictors, end to end, on a model that sam2_fast.optimize gave its encoder: the masks and scores of
the same predictors on an unoptimized copy of the model. SAM2ImagePredictor (set_image, set_image_batch, predict
with points, a box or both, predict_batch), SAM2VideoPredictor (init_state on JPEG frames, add_new_points_or_box,
propagate_in_video) and SAM2AutomaticMaskGenerator.

The image predictor and the mask generator need torchvision (sam2.utils.transforms, torchvision's NMS): they skip
where it does not import (the main environment) and run in `make test`'s torch 2.14 + torchvision environment
(tests/needs_torchvision.py). The video predictor needs neither and runs everywhere. The predictors resize every
image to the model's 1024x1024: a few seconds per encoder call on 2 cores, so each model encodes each image once.
"""

import copy
import functools
import os

import numpy as np
import pytest
import torch

import sam2_fast
from sam2_fast.backends import extension

import needs_torchvision
from helpers import assert_close_verbose, assert_fp32_close, fp32_tolerance
from test_optimize import _model

CONFIG_FILE = "configs/sam2.1/sam2.1_hiera_t.yaml"
# Two images of sizes other than the model's, for set_image_batch and predict_batch (HWC uint8, as users pass them).
IMAGES = [torch.rand(70, 90, 3, generator=torch.Generator().manual_seed(31)).mul(255).byte().numpy(),
          torch.rand(64, 80, 3, generator=torch.Generator().manual_seed(32)).mul(255).byte().numpy()]
POINTS = np.array([[30.0, 40.0], [60.0, 20.0]])  # (x, y) in pixels of IMAGES[0]
POINT_LABELS = np.array([1, 0])  # a foreground click and a background one
BOX = np.array([10.0, 15.0, 70.0, 55.0])  # x0, y0, x1, y1
PROMPTS = {
    "points": dict(point_coords=POINTS, point_labels=POINT_LABELS),
    "box": dict(box=BOX),
    "points_and_box": dict(point_coords=POINTS, point_labels=POINT_LABELS, box=BOX),
}


@functools.lru_cache(maxsize=2)
def _models(builder: str):
    """(reference, optimized): one SAM-2 model with seeded weights, and its deep copy given sam2_fast's encoder."""
    reference = _model(builder, CONFIG_FILE).eval()
    return reference, sam2_fast.optimize(copy.deepcopy(reference))


def _assert_same_masks(actual_logits, expected_logits, name: str, actual_masks=None, expected_masks=None):
    """Logits within fp32 tolerance, and masks (logits > 0, the predictors' mask_threshold) equal except where the
    reference's logit lies within that tolerance of 0, where rounding alone may put it on either side.

    The logits are checked, not only the masks: with random weights a mask may come out all empty or all full,
    which would match whatever the logits were. And the masks of the whole call must hold both values somewhere.
    """
    actual_logits, expected_logits = torch.as_tensor(actual_logits), torch.as_tensor(expected_logits)
    # Same weights, same math: the encoders' outputs differ in float summation order only, and SAM-2's heads, the
    # same code on both sides, carry that into the logits and scores at the same relative size.
    atol = fp32_tolerance(expected_logits)
    assert_close_verbose(actual_logits, expected_logits, atol=atol, name=f"{name} logits")
    if actual_masks is None:
        actual_masks, expected_masks = actual_logits > 0, expected_logits > 0
    actual_masks, expected_masks = torch.as_tensor(actual_masks).bool(), torch.as_tensor(expected_masks).bool()
    differ = actual_masks != expected_masks
    far_from_threshold = differ & (expected_logits.abs() > atol)
    assert not far_from_threshold.any(), (
        f"{name}: {int(differ.sum())} of {differ.numel()} mask pixels differ, {int(far_from_threshold.sum())} of them "
        f"where the reference's logit is farther than {atol:.2g} from 0, first at "
        f"{far_from_threshold.nonzero()[:5].tolist()}")
    assert 0 < expected_masks.float().mean() < 1, f"{name}: the reference's masks are all one value, a vacuous check"


@functools.lru_cache(maxsize=1)
def _image_predictors():
    """(reference, optimized) SAM2ImagePredictor, each with IMAGES[0] set."""
    predictor_class = needs_torchvision.import_module("sam2.sam2_image_predictor").SAM2ImagePredictor
    predictors = tuple(predictor_class(model) for model in _models("build_sam2"))
    for predictor in predictors:
        predictor.set_image(IMAGES[0])
    return predictors


@pytest.mark.slow
@pytest.mark.parametrize("prompt", list(PROMPTS))
def test_image_predictor_predict(prompt):
    reference, optimized = _image_predictors()
    assert isinstance(optimized.model.image_encoder, sam2_fast.OptimizedImageEncoder)
    (expected_logits, expected_scores, expected_low_res), (actual_logits, actual_scores, actual_low_res) = (
        predictor.predict(**PROMPTS[prompt], return_logits=True) for predictor in (reference, optimized))
    expected_masks, actual_masks = (predictor.predict(**PROMPTS[prompt])[0] for predictor in (reference, optimized))
    _assert_same_masks(actual_logits, expected_logits, f"predict({prompt})", actual_masks, expected_masks)
    assert_fp32_close(actual_low_res, expected_low_res, f"predict({prompt}) low-res logits")
    assert_fp32_close(actual_scores, expected_scores, f"predict({prompt}) scores")


@pytest.mark.slow
def test_image_predictor_set_image_batch_and_predict_batch():
    predictor_class = needs_torchvision.import_module("sam2.sam2_image_predictor").SAM2ImagePredictor
    # One image prompted with points, the other with a box (in its own pixels).
    prompts = dict(point_coords_batch=[POINTS, None], point_labels_batch=[POINT_LABELS, None], box_batch=[None, BOX])
    outputs = []
    for model in _models("build_sam2"):
        predictor = predictor_class(model)
        predictor.set_image_batch(IMAGES)
        logits, scores, _ = predictor.predict_batch(**prompts, return_logits=True)
        masks, _, _ = predictor.predict_batch(**prompts)
        outputs.append((logits, scores, masks))
    (expected_logits, expected_scores, expected_masks), (actual_logits, actual_scores, actual_masks) = outputs
    for index in range(len(IMAGES)):
        name = f"predict_batch image {index}"
        _assert_same_masks(actual_logits[index], expected_logits[index], name, actual_masks[index],
                           expected_masks[index])
        assert_fp32_close(actual_scores[index], expected_scores[index], f"{name} scores")


@pytest.mark.slow
def test_video_predictor_add_points_and_box_then_propagate(tmp_path):
    from PIL import Image

    # Three 64x80 frames of one random picture sliding right by 3 pixels a frame.
    picture = torch.rand(64, 80, 3, generator=torch.Generator().manual_seed(33)).mul(255).byte()
    for index in range(3):
        Image.fromarray(picture.roll(3 * index, dims=1).numpy()).save(tmp_path / f"{index:05d}.jpg")
    reference, optimized = _models("build_sam2_video_predictor")
    assert isinstance(optimized.image_encoder, sam2_fast.OptimizedImageEncoder)
    results = []
    for predictor in (reference, optimized):
        state = predictor.init_state(str(tmp_path))
        # A click and a box for one object on the first frame (sam2 prepends the box as two corner points).
        _, _, added = predictor.add_new_points_or_box(state, frame_idx=0, obj_id=1, points=POINTS[:1],
                                                       labels=POINT_LABELS[:1], box=BOX)
        propagated = {index: logits.clone() for index, _, logits in predictor.propagate_in_video(state)}
        results.append((added, propagated))
    (expected_added, expected_frames), (actual_added, actual_frames) = results
    _assert_same_masks(actual_added, expected_added, "add_new_points_or_box")
    assert sorted(actual_frames) == sorted(expected_frames) == [0, 1, 2]
    for index, expected in expected_frames.items():
        _assert_same_masks(actual_frames[index], expected, f"propagate_in_video frame {index}")


@pytest.mark.slow
def test_automatic_mask_generator():
    generator_class = needs_torchvision.import_module("sam2.automatic_mask_generator").SAM2AutomaticMaskGenerator
    outputs = []
    for model in _models("build_sam2"):
        # Random weights give low-confidence masks whose boxes mostly cover the whole image: no score threshold and
        # NMS only of identical boxes keep every mask (4x4 points, 3 masks each) for the comparison, and a stability
        # offset at the scale of these logits (+-0.5) makes the stability scores informative.
        generator = generator_class(model, points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                                    stability_score_offset=0.1, box_nms_thresh=1.0)
        recorded = []  # (logits, scores) of every prompt batch, which the generator thresholds itself

        def recording_predict(*args, predict=generator.predictor._predict, **kwargs):
            masks, scores, low_res = predict(*args, **kwargs)
            recorded.append((masks.flatten(0, 1), scores.flatten()))
            return masks, scores, low_res

        generator.predictor._predict = recording_predict
        records = generator.generate(IMAGES[0])
        outputs.append((records, torch.cat([logits for logits, _ in recorded]),
                        torch.cat([scores for _, scores in recorded])))
    (expected_records, expected_logits, expected_scores), (actual_records, actual_logits, _) = outputs
    _assert_same_masks(actual_logits, expected_logits, "the generator's predictions")
    assert len(actual_records) == len(expected_records) == 4 * 4 * 3
    for index, (actual, expected) in enumerate(zip(actual_records, expected_records)):
        name = f"mask {index}"
        assert actual["point_coords"] == expected["point_coords"], name
        assert_fp32_close(actual["predicted_iou"], expected["predicted_iou"], f"{name} predicted_iou")
        assert_fp32_close(actual["stability_score"], expected["stability_score"], f"{name} stability_score")
        # The logits this mask was thresholded from: those of the prediction with its score (from the same call).
        source = expected_logits[expected_scores == expected["predicted_iou"]]
        assert len(source) == 1, f"{name}: {len(source)} predictions have its predicted_iou"
        assert torch.equal(torch.as_tensor(expected["segmentation"]), source[0] > 0), name
        differ = torch.as_tensor(actual["segmentation"]) != torch.as_tensor(expected["segmentation"])
        assert (source[0][differ].abs() <= fp32_tolerance(expected_logits)).all(), (
            f"{name}: its mask differs where the reference's logit is not near 0")


@pytest.mark.skipif(not needs_torchvision.required(),
                    reason="checks the torch 2.14 + torchvision environment of `make test` "
                           f"({needs_torchvision.REQUIRE_ENV_VAR}=1)")
def test_environment_imports_its_own_build():
    """Run from the repository, the source tree's sam2_fast (whose in-place extension is built against the main
    environment's torch) could shadow the copy installed in this environment: the extension would then fail to load
    and every test would quietly run on the torch backend."""
    import torchvision

    assert extension.load_error() is None, extension.load_error()
    import sam2_fast._C as extension_module

    package_dir = os.path.dirname(os.path.abspath(sam2_fast.__file__))
    assert os.path.dirname(os.path.abspath(extension_module.__file__)) == package_dir
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, sam2_fast from {package_dir}")
