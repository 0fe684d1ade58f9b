"""How things are measured: timing, statistics, peak memory, the device's description and its roofline."""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from sam2_fast.gemm.cpu_gemm import fp32_library as cpu_fp32_gemm
from sam2_fast.backends.precision import brgemm_attention_backward, cpu_units, cpu_units_label, extension_bf16_attention

from .workloads import REPO_ROOT

# Datasheet peaks, dense (no sparsity): FLOP/s per dtype the attention runs in, and HBM bytes/s. The first entry
# whose key is in the device name wins, so the specific names come first. Everything else is measured.
DEVICE_PEAKS = (
    ("H100 PCIe", {"bf16": 756e12, "fp32": 51e12}, 2.0e12),
    ("H100 NVL", {"bf16": 835e12, "fp32": 60e12}, 3.9e12),
    ("H100", {"bf16": 989e12, "fp32": 67e12}, 3.35e12),
    ("H200", {"bf16": 989e12, "fp32": 67e12}, 4.8e12),
    ("A100", {"bf16": 312e12, "fp32": 19.5e12}, 2.0e12),
)


# ------------------------------------------------------------------------------------------------------------
# Timing

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable, device: torch.device, iterations: int = 1) -> float:
    """Seconds per call of ``fn`` over ``iterations`` back-to-back calls (CUDA events on GPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iterations):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / iterations
    begin = time.perf_counter()
    for _ in range(iterations):
        fn()
    return (time.perf_counter() - begin) / iterations


def timed_with_cuda_events(fn: Callable, device: torch.device):
    """(callable for pytest-benchmark, list it fills with seconds per call). On CUDA the callable brackets ``fn``
    with CUDA events and synchronizes, so a wall-clock timer sees finished work and the list gets event times."""
    seconds: List[float] = []
    if device.type != "cuda":
        return fn, seconds

    def run():
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        seconds.append(start.elapsed_time(end) / 1e3)

    return run, seconds


# Extra warm-up calls after the first (compiling) one: CUDA also settles cuDNN/cuBLAS heuristics and caches.
EXTRA_WARMUP_CALLS = {"cpu": 1, "cuda": 3}


def warm_up(fn: Callable, device: torch.device, extra_calls: int):
    """(seconds of the first call, which includes any compilation, output of the last call)."""
    synchronize(device)
    begin = time.perf_counter()
    output = fn()
    synchronize(device)
    first_call_s = time.perf_counter() - begin
    for _ in range(extra_calls):
        output = fn()
    synchronize(device)
    return first_call_s, output


def calibrate(fn: Callable, device: torch.device, target_s: float, max_iterations: int = 1000) -> int:
    """Calls per sample so that one sample lasts about ``target_s`` (at least 1)."""
    if target_s <= 0:
        return 1
    once = float(np.median([time_calls(fn, device) for _ in range(3)]))
    return int(min(max_iterations, max(1, math.ceil(target_s / max(once, 1e-9)))))


def summarize(samples: Sequence[float]) -> Dict[str, float]:
    """Median with the 20th and 80th percentiles."""
    values = np.asarray(samples, dtype=np.float64)
    return {
        "median": float(np.median(values)),
        "p20": float(np.percentile(values, 20)),
        "p80": float(np.percentile(values, 80)),
    }


def timing_fields(samples: Sequence[float], per: int) -> dict:
    """A result row's timing entries: the samples (seconds per call), their median and 20th/80th percentiles, and
    those in milliseconds per image for calls of ``per`` images."""
    stats = summarize(samples)
    return {
        "samples_s": list(samples),
        "median_s": stats["median"], "p20_s": stats["p20"], "p80_s": stats["p80"],
        "median_ms_per_image": 1e3 * stats["median"] / per,
        "p20_ms_per_image": 1e3 * stats["p20"] / per,
        "p80_ms_per_image": 1e3 * stats["p80"] / per,
    }


# ------------------------------------------------------------------------------------------------------------
# Peak memory

CUDA_MEMORY_METHOD = "torch.cuda.max_memory_allocated during one forward minus what was allocated before it"
CPU_MEMORY_METHOD = (
    "peak RSS growth during one forward (VmHWM after clearing it, minus VmRSS before), in a fresh process, "
    "after two warm-up forwards; glibc MALLOC_MMAP_THRESHOLD_=65536 so freed buffers leave RSS"
)


def cuda_forward_peak_bytes(fn: Callable, device: torch.device) -> int:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    output = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del output
    return peak


def read_proc_status_bytes(field: str) -> int:
    """``VmRSS``/``VmHWM`` of this process from /proc/self/status, in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field} line")


def reset_peak_rss() -> None:
    """Set VmHWM to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def cpu_forward_peak_bytes(config: str, image_size: int, batch: int, dtype: str, impl: str, timeout_s: float = 1800):
    """(bytes or None, note) from ``python -m bench.memory_probe`` in a fresh process."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    command = [sys.executable, "-m", "bench.memory_probe", "--config", config, "--size", str(image_size),
               "--batch", str(batch), "--dtype", dtype, "--impl", impl]
    try:
        done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return None, f"memory probe timed out after {timeout_s:.0f} s"
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return None, f"memory probe failed (exit {done.returncode}): {tail[0]}"
    result = json.loads(lines[-1])
    return result.get("peak_bytes"), result.get("note", "")


# ------------------------------------------------------------------------------------------------------------
# The device

def _cpuinfo_field(name: str) -> Optional[str]:
    """The first ``name`` line of /proc/cpuinfo, or None."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() == name:
                    return value.strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def cpu_family_model() -> Optional[str]:
    """``family F model M`` of /proc/cpuinfo: CPUs sold under one model name differ in it (AMD EPYC: family 25
    model 1 is Zen 3, model 17 Zen 4)."""
    family, model = _cpuinfo_field("cpu family"), _cpuinfo_field("model")
    return None if family is None or model is None else f"family {family} model {model}"


def slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model with its best low-precision unit and the thread count, e.g.
    ``AMD EPYC, AVX512-BF16 (2 threads)``."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()}, {cpu_units_label()} ({torch.get_num_threads()} threads)"


def device_slug(device: torch.device) -> str:
    """The results file name: the GPU's name, or ``cpu-<model>-<best unit>-<threads>-threads``."""
    if device.type == "cuda":
        return slugify(torch.cuda.get_device_name(device))
    return slugify(f"cpu {cpu_model()} {cpu_units_label()} {torch.get_num_threads()} threads")


def _git(*args: str) -> Optional[str]:
    try:
        done = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _version(module_name: str) -> Optional[str]:
    try:
        module = __import__(module_name)
    except Exception:
        return None
    return getattr(module, "__version__", "unknown")


def environment(device: torch.device) -> Dict[str, object]:
    """Versions, device, CPU, threads and git commit, for every results file."""
    status = _git("status", "--porcelain")
    info = {
        "device_type": device.type,
        "device_name": device_name(device),
        "device_slug": device_slug(device),
        "cpu_model": cpu_model(),
        "cpu_family_model": cpu_family_model(),
        "cpu_units": cpu_units(),
        "extension_bf16_attention": (
            "n/a" if device.type != "cpu" else
            {True: "matrix units", False: "fp32 core", None: "extension not loaded"}[extension_bf16_attention()]
        ),
        "cpu_fp32_gemm": "n/a" if device.type != "cpu" else cpu_fp32_gemm(),
        "attention_backward_products": (
            "n/a" if device.type != "cpu" else
            {True: "brgemm", False: "BLAS", None: "extension not loaded"}[brgemm_attention_backward()]
        ),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_native_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "sam2": _sam2_version(),
        "sam2_fast": _version("sam2_fast"),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
    }
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
        info["gpu_capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    return info


def cpu_line(meta: dict) -> str:
    """The CPU, its units and what they decide, for a results file's header."""
    units = ", ".join(name for name, present in meta["cpu_units"].items() if present) or "none of AMX, AVX-512, AVX2"
    return (
        f"CPU {meta['cpu_model']} ({meta['cpu_family_model'] or 'family unknown'}; units: {units}; ATen "
        f"{meta['cpu_capability']}, {'native' if meta['cpu_native_bf16'] else 'no native'} bf16 in oneDNN; the "
        f"extension's bf16 attention: {meta['extension_bf16_attention']}; eager fp32 GEMMs: "
        f"{meta.get('cpu_fp32_gemm', 'BLAS')}; attention backward products: "
        f"{meta.get('attention_backward_products', 'BLAS')}), {meta['torch_threads']} torch threads"
    )


def _sam2_version() -> Optional[str]:
    try:
        from importlib.metadata import version

        return version("sam2")
    except Exception:
        return None


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------------------------------------
# Rooflines

def measure_copy_bandwidth(device: torch.device, megabytes: int = 256, repeats: int = 5) -> float:
    """Bytes/s of ``dst.copy_(src)`` on ``megabytes`` MiB (read + write counted), best of ``repeats``."""
    numel = megabytes * 2**20 // 4
    src = torch.ones(numel, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(time_calls(lambda: dst.copy_(src), device) for _ in range(repeats))
    return 2 * src.numel() * src.element_size() / best


def measure_matmul_rate(device: torch.device, dtype: torch.dtype, repeats: int = 3) -> Dict[str, float]:
    """FLOP/s of a square matmul in ``dtype``, best of ``repeats``: sizes grow from 512 to 2048 until one call
    lasts 0.1 s (a CPU without bf16 instructions runs bf16 matmuls at a few GFLOP/s)."""
    generator = torch.Generator().manual_seed(0)
    for size in (512, 1024, 2048):
        a = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
        b = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
        if time_calls(lambda: a @ b, device) > 0.1:
            break
    best = min(time_calls(lambda: a @ b, device) for _ in range(repeats))
    return {"flops_per_s": 2.0 * size**3 / best, "size": size}


def rooflines(device: torch.device) -> Dict[str, object]:
    """Peak FLOP/s per dtype and bytes/s: the datasheet for known GPUs; on CPU measured now, in this process."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops, bandwidth in DEVICE_PEAKS:
            if key in name:
                return {"source": f"datasheet ({key}, dense)", "flops": dict(flops), "bandwidth": bandwidth}
        return {"source": f"unknown device {name!r}: no datasheet entry", "flops": {}, "bandwidth": None}
    fp32, bf16 = measure_matmul_rate(device, torch.float32), measure_matmul_rate(device, torch.bfloat16)
    return {
        "source": (
            f"measured in this run with {torch.get_num_threads()} threads: best square torch matmul (fp32 "
            f"{fp32['size']}^3, bf16 {bf16['size']}^3; a bf16 op may compute in fp32, so its peak is the faster "
            "of the two) and a 256 MiB copy_ (read + write)"
        ),
        "flops": {"fp32": fp32["flops_per_s"], "bf16": max(fp32["flops_per_s"], bf16["flops_per_s"])},
        "measured_matmul": {"fp32": fp32, "bf16": bf16},
        "bandwidth": measure_copy_bandwidth(device),
    }


def dtype_label(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]


def write_rows_and_markdown(out: str, name: str, device: torch.device, meta: dict, rows: list, text: str) -> Path:
    """Writes ``<out>/<name>-<device slug>.json`` (``{"meta": meta, "rows": rows}``) and ``.md`` (``text``), prints
    the markdown and the paths; returns the common stem."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / f"{name}-{device_slug(device)}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    stem.with_suffix(".md").write_text(text)
    print(text)
    print(f"wrote {stem}.md and .json")
    return stem

