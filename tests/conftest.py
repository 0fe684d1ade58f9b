import os
import random

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# The global RNG's state at the start of every test (see _global_rng_reset).
GLOBAL_RNG_SEED = 20250


def pytest_addoption(parser):
    parser.addoption(
        "--shuffle-seed", type=int, default=None,
        help="run the collected tests in an order shuffled by random.Random(N), to find tests that depend on what "
             "ran before them; without it, pytest's own order",
    )


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
    shuffle_seed = config.getoption("--shuffle-seed")
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(items)


def pytest_report_header(config):
    shuffle_seed = config.getoption("--shuffle-seed")
    return None if shuffle_seed is None else f"test order shuffled with --shuffle-seed {shuffle_seed}"


@pytest.fixture(autouse=True)
def _global_rng_reset():
    """Every test starts from the same global RNG state, whatever ran before it.

    Tests and helpers draw their tensors from seeded generators of their own, and weights are a function of
    (config, seed) (helpers.seeded_state); what still draws from the global RNG (module constructors, sam2's
    stochastic depth, library internals) then draws the same numbers in any test order. Resetting, rather than
    asserting that no test touched the global RNG, lets module constructors draw: their values are overwritten by
    seeded weights, and a check would flag every constructor call.
    """
    torch.manual_seed(GLOBAL_RNG_SEED)
    yield


@pytest.fixture
def library():
    """Set the eager fp32 CPU GEMM library (sam2_fast.gemm.cpu_gemm) for one test, restoring the setting after it."""
    from sam2_fast.gemm import cpu_gemm

    before = cpu_gemm.get_fp32_library_setting()
    yield cpu_gemm.set_fp32_library
    cpu_gemm.set_fp32_library(before)


@pytest.fixture
def threads():
    """Set torch's CPU thread count for one test, restoring it after."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)
