import gc
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


_LAST_OF_MODULE = pytest.StashKey[dict]()


def pytest_collection_finish(session):
    # The last test of each module in the order they will run, after shuffling and deselection.
    session.config.stash[_LAST_OF_MODULE] = {item.path: item.nodeid for item in session.items}


def pytest_runtest_teardown(item, nextitem):
    """When a test module's last test (in the order they run, shuffled or not) is done, its cached models and
    results go: functools caches in the module's namespace are cleared. The suite otherwise grew to ~15 GB in one
    process (every module's cached encoders and float64 truths kept to the end), too near these machines' 24 GiB
    for two processes at once."""
    if item.config.stash.get(_LAST_OF_MODULE, {}).get(item.path) != item.nodeid:
        return
    for value in list(vars(item.module).values()):
        if callable(getattr(value, "cache_clear", None)) and hasattr(value, "cache_info"):
            value.cache_clear()
    gc.collect()


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
def library(monkeypatch):
    """Set the eager fp32 CPU GEMM library (sam2_fast.gemm.cpu_gemm) for one test, restoring the setting after it
    (None included: the environment variable's)."""
    from sam2_fast.gemm import cpu_gemm

    monkeypatch.setattr(cpu_gemm, "_setting", cpu_gemm._setting)
    yield cpu_gemm.set_fp32_library


@pytest.fixture
def threads():
    """Set torch's CPU thread count for one test, restoring it after."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)
