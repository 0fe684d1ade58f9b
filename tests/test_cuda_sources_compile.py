"""Every CUDA source of the extension (csrc/cuda/*.cu) compiles with nvcc for sm_80 and sm_90.

GPUs are rarely available, so this checks the CUDA kernels on any machine with nvcc. The CPU torch wheel ships
incomplete CUDA headers (no c10/cuda/impl/cuda_cmake_macros.h), so the headers come from the CUDA build of a pinned
torch release: its Linux x86_64 wheel is downloaded once with `pip download` and only `torch/include/` is kept,
cached under .cache/torch_cuda_headers/ (gitignored). Without network the test skips, or fails when CI=true.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CUDA_SOURCES = sorted((REPO / "csrc" / "cuda").glob("*.cu"))
# The headers' torch release: pinned so that every run compiles against the same API. A CUDA wheel on PyPI.
HEADERS_TORCH_VERSION = "2.14.1"
HEADERS_DIR = REPO / ".cache" / "torch_cuda_headers" / f"torch-{HEADERS_TORCH_VERSION}"
# Present only in a CUDA build's headers; its absence means pip fetched a CPU wheel.
CUDA_ONLY_HEADER = Path("torch/include/c10/cuda/impl/cuda_cmake_macros.h")
ARCHS = ("80", "90")
IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _unavailable(reason: str):
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: the CUDA sources must be compile-checked)")
    pytest.skip(reason)


def _download_headers() -> None:
    """pip-download the CUDA torch wheel and unpack its torch/include/ into HEADERS_DIR, atomically."""
    HEADERS_DIR.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=HEADERS_DIR.parent) as scratch:
        command = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--platform", "manylinux_2_28_x86_64", f"torch=={HEADERS_TORCH_VERSION}", "-d", scratch,
        ]
        result = subprocess.run(command, capture_output=True, text=True)
        wheels = list(Path(scratch).glob("torch-*.whl"))
        if result.returncode != 0 or not wheels:
            _unavailable(
                f"could not download the CUDA torch=={HEADERS_TORCH_VERSION} wheel for its headers:\n"
                f"{' '.join(command)}\n{result.stdout[-2000:]}{result.stderr[-2000:]}"
            )
        unpacked = Path(scratch) / "unpacked"
        with zipfile.ZipFile(wheels[0]) as wheel:
            wheel.extractall(unpacked, [name for name in wheel.namelist() if name.startswith("torch/include/")])
        if not (unpacked / CUDA_ONLY_HEADER).is_file():
            pytest.fail(f"{wheels[0].name} is not a CUDA build of torch: it lacks {CUDA_ONLY_HEADER}")
        try:
            os.rename(unpacked, HEADERS_DIR)
        except OSError:  # another process cached it first
            if not (HEADERS_DIR / CUDA_ONLY_HEADER).is_file():
                raise


@pytest.fixture(scope="module")
def torch_cuda_include() -> Path:
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not on PATH")
    if not (HEADERS_DIR / CUDA_ONLY_HEADER).is_file():
        _download_headers()
    return HEADERS_DIR / "torch" / "include"


@pytest.mark.skipif(not CUDA_SOURCES, reason="no CUDA sources in csrc/cuda")
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda path: path.name)
def test_cuda_source_compiles(source: Path, torch_cuda_include: Path, tmp_path: Path):
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS  # the flags torch's own CUDAExtension build passes

    gencode = [flag for arch in ARCHS for flag in ("-gencode", f"arch=compute_{arch},code=sm_{arch}")]
    command = [
        "nvcc", "-c", str(source), "-o", str(tmp_path / (source.stem + ".o")), "-std=c++20", "-O3",
        "-Xcompiler", "-fPIC", "-DSAM2_FAST_WITH_CUDA=1", "-DTORCH_EXTENSION_NAME=_C",
        *COMMON_NVCC_FLAGS, *gencode, "--threads", str(len(ARCHS)),
        f"-I{torch_cuda_include}", f"-I{torch_cuda_include / 'torch' / 'csrc' / 'api' / 'include'}",
        f"-I{sysconfig.get_paths()['include']}", f"-I{REPO / 'csrc'}",  # sources include headers from csrc/, as setup.py
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, f"nvcc failed on {source.name}:\n{' '.join(command)}\n{result.stderr[-6000:]}"
