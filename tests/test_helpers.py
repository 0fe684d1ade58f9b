"""The tests' own yardsticks can fail: check_gradients refuses what it must refuse."""
import pytest
import torch

from helpers import FP32_GRADIENT_ERROR_FLOOR, check_gradients


def _case(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    truth = {"w": torch.randn(64, 48, generator=generator, dtype=torch.float64)}
    noise = torch.randn(64, 48, generator=generator, dtype=torch.float64)
    # The reference rounds each element by about 1e-5 of the largest.
    reference = {"w": truth["w"] + 1e-5 * truth["w"].abs().max() * noise / noise.abs().max()}
    return truth, reference


def _with_error(truth: dict, error: torch.Tensor) -> dict:
    return {"w": (truth["w"] + error * truth["w"].abs().max()).float()}


def test_check_gradients_accepts_errors_like_the_reference():
    truth, reference = _case()
    ours = {"w": reference["w"].flip(0).sub(truth["w"].flip(0)).add(truth["w"]).float()}  # same errors, moved rows
    check_gradients(ours, reference, truth)


def test_check_gradients_accepts_one_larger_element_when_the_rms_error_is_alike():
    # The reference's errors with one element 3x as large: the largest error is past 2x, the RMS error is not.
    truth, reference = _case()
    error = (reference["w"] - truth["w"]) / truth["w"].abs().max()
    error[5, 7] = 3 * error.abs().max()
    check_gradients(_with_error(truth, error), reference, truth)


@pytest.mark.parametrize("kind", ["one_row", "everywhere", "one_element_far", "nan"])
def test_check_gradients_refuses_wrong_gradients(kind):
    truth, reference = _case()
    error = (reference["w"] - truth["w"]) / truth["w"].abs().max()
    if kind == "one_row":  # a row further off than twice the bound (a row up to that far passes: see helpers)
        error[3] = 5 * error.abs().max() + FP32_GRADIENT_ERROR_FLOOR
    elif kind == "everywhere":  # every element's error 3x the reference's: the RMS error is past its bound too
        error = 3 * error
    elif kind == "one_element_far":  # past twice the bound even where the RMS error is alike
        error[5, 7] = 5 * error.abs().max() + FP32_GRADIENT_ERROR_FLOOR
    ours = _with_error(truth, error)
    if kind == "nan":
        ours["w"][0, 0] = float("nan")
    with pytest.raises(AssertionError, match="w: "):
        check_gradients(ours, reference, truth)
