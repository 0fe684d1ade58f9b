"""Imports of what needs torchvision (sam2's image predictor and automatic mask generator, timm), for the tests that
use it.

torchvision has no build for the main environment's CPU torch, so there these tests skip, with a reason naming it.
`make test` runs them again in a second environment that has torchvision (torch 2.14 with torchvision 0.29) under
SAM2_FAST_REQUIRE_TORCHVISION=1: there a failed import fails the test instead of skipping it, so that a broken
install cannot pass as a row of skips.
"""

import importlib
import os
from types import ModuleType

import pytest

REQUIRE_ENV_VAR = "SAM2_FAST_REQUIRE_TORCHVISION"


def required() -> bool:
    """Whether this run must have torchvision (SAM2_FAST_REQUIRE_TORCHVISION=1)."""
    return os.environ.get(REQUIRE_ENV_VAR) == "1"


def import_module(name: str) -> ModuleType:
    """``importlib.import_module(name)``; where it fails, a skip of the calling test naming torchvision, or a failure
    under SAM2_FAST_REQUIRE_TORCHVISION=1."""
    try:
        return importlib.import_module(name)
    except ImportError as error:
        reason = f"{name} does not import here ({error}): it needs torchvision, which has no CPU build for this torch"
        if required():
            pytest.fail(f"{reason}; {REQUIRE_ENV_VAR}=1 requires it")
        pytest.skip(reason)
