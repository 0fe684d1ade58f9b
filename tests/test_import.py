"""``import sam2_fast`` does no work beyond registering its ops and configs: settings are read when used (so that
one changed after import takes effect) and process-wide hooks wait for the feature that needs them."""
import subprocess
import sys

import pytest


def _run(code: str, **env) -> subprocess.CompletedProcess:
    environment = {"PATH": "", "SAM2_FAST_BACKEND": "", "SAM2_FAST_CPU_FP32_GEMM": "", **env}
    return subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True, timeout=300)


def test_settings_changed_after_import_take_effect():
    result = _run(
        "import os, sam2_fast\n"
        "print(sam2_fast.get_backend(), sam2_fast.cpu_fp32_gemm())\n"
        "os.environ['SAM2_FAST_BACKEND'] = 'torch'; os.environ['SAM2_FAST_CPU_FP32_GEMM'] = 'blas'\n"
        "print(sam2_fast.get_backend(), sam2_fast.cpu_fp32_gemm())\n"
        "with sam2_fast.use_backend('extension'): print(sam2_fast.get_backend())\n"
        "print(sam2_fast.get_backend())\n"
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.split("\n")
    assert lines[0].split()[0] == "auto"
    assert lines[1:4] == ["torch blas", "extension", "torch"]


@pytest.mark.parametrize("variable, value, message", [
    ("SAM2_FAST_BACKEND", "fastest", "unknown sam2_fast backend 'fastest' in the environment variable SAM2_FAST_BACKEND"),
    ("SAM2_FAST_CPU_FP32_GEMM", "mkl", "unknown CPU fp32 GEMM library 'mkl' in the environment variable"),
])
def test_a_bad_setting_set_after_import_is_refused_at_use(variable, value, message):
    result = _run(f"import os, sam2_fast\nos.environ[{variable!r}] = {value!r}\n"
                  "sam2_fast.get_backend(); sam2_fast.cpu_fp32_gemm()")
    assert result.returncode != 0 and message in result.stderr, result.stderr


def test_import_installs_no_module_hooks():
    result = _run(
        "import torch.nn.modules.module as m\n"
        "import sam2_fast\n"
        "print(len(m._global_parameter_registration_hooks), len(m._global_buffer_registration_hooks),"
        " len(m._global_module_registration_hooks))\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0", "0", "0"]


def test_traced_code_reuses_the_backend_read_eagerly(monkeypatch):
    # A trace does not read the environment once eager code has: the value eager code last read holds there.
    import torch

    from sam2_fast import ops
    from sam2_fast.ops import dispatch

    monkeypatch.setattr(dispatch, "_requested_backend", None)
    monkeypatch.setattr(dispatch, "_environment_backend", None)
    monkeypatch.setenv("SAM2_FAST_BACKEND", "torch")
    assert ops.get_backend() == "torch"
    monkeypatch.setenv("SAM2_FAST_BACKEND", "extension")
    with monkeypatch.context() as tracing:
        tracing.setattr(torch.compiler, "is_compiling", lambda: True)
        assert ops.get_backend() == "torch"
    assert ops.get_backend() == "extension"  # eager code reads it again


ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_the_triton_sources_do_not_shadow_a_kernels_package():
    # The Triton sources sit in the top-level kernels/ folder, installed as sam2_fast.kernels. Run from the repository
    # root, `import kernels` must not find them as a package: transformers looks for Hugging Face's `kernels`
    # package and imports whatever that name finds. A folder without __init__.py is at most an empty namespace,
    # which transformers recognises as no package, and an installed `kernels` (transformers depends on it) wins.
    code = ("import importlib.util\n"
            "spec = importlib.util.find_spec('kernels')\n"
            "print(spec is None or spec.origin is None or 'site-packages' in spec.origin)\n"
            "import sam2_fast.kernels.launch\n"
            "print(sam2_fast.kernels.launch.__file__.startswith(__import__('os').getcwd()))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "True"]
    pytest.importorskip("transformers")
    result = subprocess.run([sys.executable, "-c", "import transformers; transformers.Sam2Model"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
