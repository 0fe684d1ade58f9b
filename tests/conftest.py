import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture
def library():
    """Set the eager fp32 CPU GEMM library (sam2_fast.cpu_gemm) for one test, restoring the setting after it."""
    from sam2_fast import cpu_gemm

    before = cpu_gemm.get_fp32_library_setting()
    yield cpu_gemm.set_fp32_library
    cpu_gemm.set_fp32_library(before)
