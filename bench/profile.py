"""``python -m bench.profile``: where one forward's time goes, the `sam2` reference beside sam2_fast.

Runs both encoders (same seeded weights, same image) under ``torch.profiler`` in one process, and groups the time
per forward into categories (GEMMs, attention, copies, elementwise passes, ...): on CPU the operators' self time,
on CUDA the GPU kernels' time (by kernel name), with each forward's wall time beside it, so that the gap (the GPU
idle, waiting for launches from Python) shows too. The reference's column shows what a fusion has to remove; ours
shows what is left. Writes ``bench/results/profile-<device>.md`` beside the benchmark report.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time
from pathlib import Path
from typing import Dict, Iterable, List, Tuple

import torch
from torch.profiler import ProfilerActivity, profile
from tqdm import tqdm

from .matrix import Impl
from .measure import cpu_line, device_name, device_slug, environment
from .workloads import EncoderSet, seeded_image, short_name

# Operator name (aten:: and our namespaces) -> category. Unlisted operators fall into "other".
CATEGORIES: List[Tuple[str, Tuple[str, ...]]] = [
    ("GEMM (linear)", ("aten::addmm", "aten::addmm_", "aten::mm", "aten::bmm", "aten::matmul",
                       "mkldnn::_linear_pointwise")),
    ("attention", ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_efficient_attention",
                   "aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_cudnn_attention",
                   "sam2_fast_ext::window_attention", "sam2_fast_ext::global_attention",
                   "sam2_fast::window_attention", "sam2_fast::global_attention")),
    ("copies and dtype casts (partition, permute, bias broadcast, pad)",
     ("aten::copy_", "aten::constant_pad_nd", "aten::cat", "aten::repeat", "aten::fill_", "aten::zero_")),
    ("elementwise (add, GELU)", ("aten::add", "aten::add_", "aten::gelu", "aten::gelu_", "aten::div", "aten::mul",
                                 "sam2_fast_ext::bias_gelu_", "sam2_fast::bias_gelu_")),
    ("LayerNorm", ("aten::native_layer_norm",)),
    ("convolution", ("aten::mkldnn_convolution", "aten::_slow_conv2d_forward")),
    ("max-pool", ("aten::max_pool2d_with_indices", "aten::max_pool2d", "sam2_fast_ext::maxpool2x2",
                  "sam2_fast::maxpool2x2")),
    ("FPN upsample + add",
     ("aten::upsample_nearest2d", "sam2_fast_ext::fpn_upsample_add", "sam2_fast::fpn_upsample_add")),
    ("pos-embed (bicubic, sine)", ("aten::upsample_bicubic2d", "aten::cumsum", "aten::sin", "aten::cos", "aten::pow",
                                   "sam2_fast_ext::sine_position_encoding")),
]
_CATEGORY_OF = {name: category for category, names in CATEGORIES for name in names}
OTHER = "other (allocation, views, dispatch)"

# GPU kernels -> category, by the first pattern found in the lowercased kernel name (checked in this order: a cuDNN
# convolution's name also holds "xmma", a Triton kernel of inductor's names the aten ops it fused).
CUDA_KERNEL_CATEGORIES: List[Tuple[str, Tuple[str, ...]]] = [
    ("attention", ("_window_attention_kernel", "_global_attention_kernel", "flash", "fmha", "attention",
                   "efficient_attention")),
    ("convolution", ("conv2d", "convolution", "cudnn", "implicit_gemm", "fprop")),
    ("max-pool", ("_maxpool2x2_kernel", "max_pool")),
    ("FPN upsample + add", ("_fpn_upsample_add_kernel", "upsample_nearest")),
    ("pos-embed (bicubic, sine)", ("upsample_bicubic", "sine_position")),
    ("inductor fused kernels", ("triton_poi", "triton_per", "triton_red", "triton_tem")),
    ("LayerNorm", ("layer_norm", "layernorm")),
    ("GEMM (linear)", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "splitk", "sm90_", "sm80_")),
    ("copies and dtype casts (partition, permute, bias broadcast, pad)",
     ("copy", "memcpy", "memset", "cat_", "catarray", "fill", "pad", "index")),
    ("elementwise (add, GELU)", ("gelu", "add", "mul", "div", "elementwise")),
]
GPU_IDLE = "GPU idle (waiting for launches)"


def cuda_kernel_category(name: str) -> str:
    """The category of a GPU kernel, by its name."""
    lowered = name.lower()
    for category, patterns in CUDA_KERNEL_CATEGORIES:
        if any(pattern in lowered for pattern in patterns):
            return category
    return "other kernels"


def categorized_ms(prof, forwards: int) -> Dict[str, float]:
    """CPU operators' self time per category, in ms per forward. Custom-op wrappers (sam2_fast::) have near-zero
    self time: their kernel's time is the backend op's (sam2_fast_ext::) self time."""
    totals: Dict[str, float] = collections.defaultdict(float)
    for event in prof.key_averages():
        totals[_CATEGORY_OF.get(event.key, OTHER)] += event.self_cpu_time_total
    return {category: us / 1000 / forwards for category, us in totals.items()}


def categorized_cuda_ms(kernel_times_us: Iterable[Tuple[str, float]], forwards: int, wall_ms: float) -> Dict[str, float]:
    """GPU kernel time per category in ms per forward, from (kernel name, total us) pairs, plus the GPU's idle
    time: a forward's wall time less its kernels' time (kernels of one stream do not overlap)."""
    totals: Dict[str, float] = collections.defaultdict(float)
    for name, microseconds in kernel_times_us:
        totals[cuda_kernel_category(name)] += microseconds / 1000 / forwards
    totals[GPU_IDLE] = max(0.0, wall_ms - sum(totals.values()))
    return dict(totals)


def _cuda_kernel_times(prof) -> List[Tuple[str, float]]:
    from torch.autograd import DeviceType

    return [(event.key, event.self_device_time_total) for event in prof.key_averages()
            if event.device_type == DeviceType.CUDA]


def _wall_ms(run, image, device: torch.device, forwards: int) -> float:
    """Median wall time of one forward, in ms, outside the profiler."""
    times = []
    for _ in range(forwards):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        run(image)
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def profile_case(config: str, size: int, batch: int, dtype: str, forwards: int,
                 device: torch.device) -> Dict[str, Dict[str, float]]:
    encoders = EncoderSet(config, dtype, device)
    image = encoders.input_for(seeded_image(batch, size, device))
    impls = {"reference": Impl("reference"), "sam2_fast": Impl("auto")}
    runs = {label: encoders.callable(impl) for label, impl in impls.items()}
    for run in runs.values():
        run(image)  # warm-up: caches, first-touch of weights, Triton compiles
    result = {}
    for label, run in runs.items():
        if device.type == "cuda":
            wall_ms = _wall_ms(run, image, device, forwards)
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(forwards):
                    run(image)
                torch.cuda.synchronize(device)
            result[label] = categorized_cuda_ms(_cuda_kernel_times(prof), forwards, wall_ms)
        else:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(forwards):
                    run(image)
            result[label] = categorized_ms(prof, forwards)
    return result


def markdown(cases: Dict[str, Dict[str, Dict[str, float]]], device: torch.device) -> str:
    if device.type == "cuda":
        what = ("GPU kernel time of one forward (torch.profiler, ms per forward, mean over the profiled forwards), "
                "grouped by kernel name, and the GPU's idle time: the median wall time of an unprofiled forward less "
                "its kernels' time, which is where a launch-bound forward loses. ")
        categories = [c for c, _ in CUDA_KERNEL_CATEGORIES] + ["other kernels", GPU_IDLE]
    else:
        what = ("Self time of the operators in one forward (torch.profiler, ms per forward, mean over the profiled "
                "forwards), grouped by what they do. Profiling adds overhead per operator; totals are above the "
                "timed benchmark's. ")
        categories = [c for c, _ in CATEGORIES] + [OTHER]
    lines = [
        f"# Where a forward's time goes: `sam2` reference vs sam2_fast ({device_name(device)})",
        "",
        what + "`python -m bench.profile` regenerates this file.",
        "",
    ]
    for case, columns in cases.items():
        lines += [f"## {case}", "", "| category | reference ms | sam2_fast ms | saved ms |", "|---|---|---|---|"]
        ref, ours = columns["reference"], columns["sam2_fast"]
        digits = 2 if device.type == "cuda" else 1  # GPU forwards take milliseconds, CPU ones hundreds
        for category in categories:
            r, o = ref.get(category, 0.0), ours.get(category, 0.0)
            if r or o:
                lines.append(f"| {category} | {r:.{digits}f} | {o:.{digits}f} | {r - o:+.{digits}f} |")
        total_r, total_o = sum(ref.values()), sum(ours.values())
        lines += [f"| **total** | **{total_r:.{digits}f}** | **{total_o:.{digits}f}** | "
                  f"**{total_r - total_o:+.{digits}f}** |", ""]
    meta = environment(device)
    lines += [f"{cpu_line(meta)}.", "", "Environment: " + ", ".join(f"{k} {v}" for k, v in meta.items()), ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="tiny,base_plus", help="comma list of configs")
    parser.add_argument("--sizes", default="512", help="comma list of image sizes")
    parser.add_argument("--dtypes", default="fp32", help="comma list of fp32, bf16-autocast, bf16")
    parser.add_argument("--batches", default="1", help="comma list of batch sizes")
    parser.add_argument("--forwards", type=int, default=3, help="profiled forwards per encoder")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--out", default="bench/results", help="output folder")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    device = torch.device(args.device)
    todo = [(c, int(s), int(b), d) for c in args.configs.split(",") for s in args.sizes.split(",")
            for b in args.batches.split(",") for d in args.dtypes.split(",")]
    cases = {}
    for config, size, batch, dtype in tqdm(todo, desc="profiling", unit="case"):
        cases[f"{short_name(config)} {size}x{size}, batch {batch}, {dtype}"] = profile_case(
            config, size, batch, dtype, args.forwards, device
        )
    text = markdown(cases, device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"profile-{device_slug(device)}.md"
    path.write_text(text)
    print(text)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
