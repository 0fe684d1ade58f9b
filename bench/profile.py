"""``python -m bench.profile``: where one forward's time goes, the `sam2` reference beside sam2_fast.

Runs both encoders (same seeded weights, same image) under ``torch.profiler`` in one process, interleaved, and
groups the operators' self time per forward into categories (GEMMs, attention, copies, elementwise passes, ...).
The reference's column shows what a fusion has to remove; ours shows what is left. Writes
``bench/results/profile-<device>.md`` beside the benchmark report.
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path
from typing import Dict, List, Tuple

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


def categorized_ms(prof, forwards: int) -> Dict[str, float]:
    """Self time per category, in ms per forward. Custom-op wrappers (sam2_fast::) have near-zero self time:
    their kernel's time is the backend op's (sam2_fast_ext::) self time."""
    totals: Dict[str, float] = collections.defaultdict(float)
    for event in prof.key_averages():
        totals[_CATEGORY_OF.get(event.key, "other (allocation, views, dispatch)")] += event.self_cpu_time_total
    return {category: us / 1000 / forwards for category, us in totals.items()}


def profile_case(config: str, size: int, dtype: str, forwards: int) -> Dict[str, Dict[str, float]]:
    device = torch.device("cpu")
    encoders = EncoderSet(config, dtype, device)
    image = encoders.input_for(seeded_image(1, size, device))
    impls = {"reference": Impl("reference"), "sam2_fast": Impl("auto")}
    runs = {label: encoders.callable(impl) for label, impl in impls.items()}
    for run in runs.values():
        run(image)  # warm-up: caches, first-touch of weights
    result = {}
    for label, run in runs.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(forwards):
                run(image)
        result[label] = categorized_ms(prof, forwards)
    return result


def markdown(cases: Dict[str, Dict[str, Dict[str, float]]], device: torch.device) -> str:
    lines = [
        f"# Where a forward's time goes: `sam2` reference vs sam2_fast ({device_name(device)})",
        "",
        "Self time of the operators in one forward (torch.profiler, ms per forward, mean over the profiled "
        "forwards), grouped by what they do. Profiling adds overhead per operator; totals are above the timed "
        "benchmark's. `python -m bench.profile` regenerates this file.",
        "",
    ]
    for case, columns in cases.items():
        categories = [c for c, _ in CATEGORIES] + ["other (allocation, views, dispatch)"]
        lines += [f"## {case}", "", "| category | reference ms | sam2_fast ms | saved ms |", "|---|---|---|---|"]
        ref, ours = columns["reference"], columns["sam2_fast"]
        for category in categories:
            r, o = ref.get(category, 0.0), ours.get(category, 0.0)
            if r or o:
                lines.append(f"| {category} | {r:.1f} | {o:.1f} | {r - o:+.1f} |")
        total_r, total_o = sum(ref.values()), sum(ours.values())
        lines += [f"| **total** | **{total_r:.1f}** | **{total_o:.1f}** | **{total_r - total_o:+.1f}** |", ""]
    meta = environment(device)
    lines += [f"{cpu_line(meta)}.", "", "Environment: " + ", ".join(f"{k} {v}" for k, v in meta.items()), ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="tiny,base_plus", help="comma list of configs")
    parser.add_argument("--sizes", default="512", help="comma list of image sizes")
    parser.add_argument("--dtypes", default="fp32", help="comma list of fp32, bf16-autocast, bf16")
    parser.add_argument("--forwards", type=int, default=3, help="profiled forwards per encoder")
    parser.add_argument("--out", default="bench/results", help="output folder")
    args = parser.parse_args(argv)
    device = torch.device("cpu")
    todo = [(c, int(s), d) for c in args.configs.split(",") for s in args.sizes.split(",") for d in args.dtypes.split(",")]
    cases = {}
    for config, size, dtype in tqdm(todo, desc="profiling", unit="case"):
        cases[f"{short_name(config)} {size}x{size}, batch 1, {dtype}"] = profile_case(config, size, dtype, args.forwards)
    text = markdown(cases, device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"profile-{device_slug(device)}.md"
    path.write_text(text)
    print(text)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
