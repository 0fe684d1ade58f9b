"""``python -m bench.report``: benchmark a matrix of cases in one process and write a table, JSON and a plot.

Per case, every implementation is warmed up first (compilation included; its time is reported as "first call"),
then timed in rounds that interleave the implementations, rotating their order each round, so that load on the
machine hits them alike. Rows give the median with the 20th and 80th percentiles; speedups are ratios of medians
from this same run. Writes ``<out>/<device-slug>.md``, ``.json`` (environment and every raw timing) and ``.png``.

Defaults: on CPU tiny 512x512, batch 1, fp32 and bf16 autocast, eager implementations; on CUDA base_plus
1024x1024, batch 1 and 8, bf16 autocast, every implementation (see ``bench.matrix.default_matrix``).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import os
import sys
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch

import sam2_fast

from . import matrix as bench_matrix
from .matrix import Impl, Matrix
from .measure import (
    CPU_MEMORY_METHOD, CUDA_MEMORY_METHOD, EXTRA_WARMUP_CALLS, calibrate, cpu_line, cpu_forward_peak_bytes, cuda_forward_peak_bytes, dtype_label,
    environment, rooflines, time_calls, timing_fields, utc_now, warm_up,
)
from .workloads import (
    BENCH_OPS, COMPILE_MODE_ENV_VAR, COMPILE_MODES, EncoderSet, build_encoder, compile_mode, feature_outputs,
    op_callable, op_cases, op_expected, relative_error, seeded_image, short_name, worst_relative_error,
)

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
DEFAULT_REPEATS = {"cpu": 10, "cuda": 20}
# How long one sample should last (calls per sample are calibrated to it).
OP_SAMPLE_S = {"cpu": 0.02, "cuda": 0.005}
ENCODER_SAMPLE_S = {"cpu": 0.0, "cuda": 0.005}
MIB = 2**20


# ------------------------------------------------------------------------------------------------------------
# Command line

def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.report", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    names, integers = bench_matrix.parse_list, functools.partial(bench_matrix.parse_list, kind=int)
    integers.__name__ = "comma list of integers"  # argparse names the type in its error message
    parser.add_argument("--configs", type=names,
                        help="comma list: tiny, small, base_plus, large (or any sam2_fast config name)")
    parser.add_argument("--sizes", type=integers, help="comma list of image sizes (multiples of 32)")
    parser.add_argument("--batches", type=integers, help="comma list of batch sizes")
    parser.add_argument("--dtypes", type=names, help=f"comma list of {', '.join(bench_matrix.DTYPES)}")
    parser.add_argument("--impls", help=f"comma list of {', '.join(bench_matrix.IMPL_NAMES)}, or 'all'")
    parser.add_argument("--repeats", type=int, help="timed rounds per implementation and case (default: CPU 10, CUDA 20)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: bench/results)")
    parser.add_argument("--ops", default=",".join(BENCH_OPS),
                        help=f"comma list of per-op benchmarks ({', '.join(BENCH_OPS)}), or 'none'")
    parser.add_argument("--full", action="store_true", help="start from the wide matrix (SAM2_FAST_BENCH_FULL)")
    parser.add_argument("--no-memory", action="store_true", help="skip peak-memory measurements")
    parser.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available")
    parser.add_argument("--compile-mode", choices=COMPILE_MODES,
                        help="torch.compile mode of the +compile implementations (default: max-autotune on CUDA, "
                             f"default on CPU; also {COMPILE_MODE_ENV_VAR})")
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    ops_wanted = () if args.ops.strip() == "none" else bench_matrix.parse_list(args.ops)
    for op in ops_wanted:
        if op not in BENCH_OPS:
            parser.error(f"unknown op {op!r} in --ops: expected some of {', '.join(BENCH_OPS)} or 'none'")
    args.ops = ops_wanted
    return args


def matrix_from_args(args: argparse.Namespace, device_type: str) -> Matrix:
    matrix = bench_matrix.default_matrix(device_type, full=args.full)
    overrides = {}
    for field in ("configs", "sizes", "batches", "dtypes"):
        if getattr(args, field):
            overrides[field] = getattr(args, field)
    if args.impls:
        overrides["impls"] = None if args.impls.strip() == "all" else bench_matrix.parse_list(args.impls)
    return bench_matrix.check_matrix(dataclasses.replace(matrix, **overrides))


# ------------------------------------------------------------------------------------------------------------
# Running

def interleaved_samples(callables: Dict[str, Callable], iterations: Dict[str, int], rounds: int,
                        device: torch.device, progress) -> Dict[str, List[float]]:
    """Seconds per call of each callable, ``rounds`` samples each, their order rotated every round."""
    names = list(callables)
    samples: Dict[str, List[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(time_calls(callables[name], device, iterations[name]))
            progress.update(1)
    return samples


def _add_speedups(rows: List[dict]) -> None:
    """speedup vs reference eager and vs reference compiled, among rows of one case."""
    medians = {row["impl"]: row["median_s"] for row in rows}
    for row in rows:
        for key, baseline in (("speedup_vs_reference", "reference"),
                              ("speedup_vs_reference_compiled", "reference+compile")):
            row[key] = medians[baseline] / row["median_s"] if baseline in medians else None


def bench_encoder_case(encoders: EncoderSet, impls: List[Impl], image: torch.Tensor, expected, rounds: int,
                       measure_memory: bool, progress) -> List[dict]:
    device = encoders.device
    batch, image_size = image.shape[0], image.shape[-1]
    image = encoders.input_for(image)
    callables, iterations, rows = {}, {}, {}
    for impl in impls:
        forward = encoders.callable(impl)
        progress.set_postfix_str(f"{short_name(encoders.config)} {image_size} b{batch} {encoders.dtype} {impl.name}: warm-up")
        first_call_s, output = warm_up(lambda: forward(image), device, EXTRA_WARMUP_CALLS[device.type])
        error, error_output = worst_relative_error(feature_outputs(output), expected)
        del output
        callables[impl.name] = lambda forward=forward: forward(image)
        iterations[impl.name] = calibrate(callables[impl.name], device, ENCODER_SAMPLE_S[device.type])
        rows[impl.name] = {
            "kind": "encoder", "config": short_name(encoders.config), "image_size": image_size, "batch": batch,
            "dtype": encoders.dtype, "impl": impl.name,
            "backends": None if impl.is_reference else _resolved_backends(impl, device),
            "first_call_s": first_call_s, "iterations_per_sample": iterations[impl.name],
            "rel_error": error, "rel_error_output": error_output,
        }
        progress.update(1)
    progress.set_postfix_str(f"{short_name(encoders.config)} {image_size} b{batch} {encoders.dtype}: timing")
    samples = interleaved_samples(callables, iterations, rounds, device, progress)
    for name, row in rows.items():
        row.update(timing_fields(samples[name], batch))
        row["images_per_s"] = batch / row["median_s"]
    if measure_memory:
        progress.set_postfix_str(f"{short_name(encoders.config)} {image_size} b{batch} {encoders.dtype}: memory")
        for impl in impls:
            row = rows[impl.name]
            if device.type == "cuda":
                memory_forward = encoders.memory_callable(impl)
                row["peak_memory_bytes"] = cuda_forward_peak_bytes(lambda: memory_forward(image), device)
                row["memory_method"] = CUDA_MEMORY_METHOD
            else:
                row["peak_memory_bytes"], row["memory_method"] = cpu_forward_peak_bytes(
                    encoders.config, image_size, batch, encoders.dtype, impl.name)
    rows = list(rows.values())
    _add_speedups(rows)
    return rows


def _resolved_backends(impl: Impl, device: torch.device) -> Dict[str, str]:
    with sam2_fast.use_backend(impl.backend):
        return sam2_fast.active_backends(device.type)


def _op_roofline(case, dtype: torch.dtype, seconds: float, peaks: dict) -> dict:
    if case.flops is not None:
        achieved, peak, unit = case.flops / seconds, peaks["flops"].get(dtype_label(dtype)), "TFLOP/s"
    else:
        achieved, peak, unit = case.bytes_moved / seconds, peaks["bandwidth"], "GB/s"
    return {"achieved": achieved, "achieved_unit": unit, "roofline_fraction": achieved / peak if peak else None}


def bench_op_case(case, impls: List[Impl], dtype: torch.dtype, context: dict, rounds: int, device: torch.device,
                  peaks: dict, progress) -> List[dict]:
    expected = op_expected(case)
    callables, iterations, rows = {}, {}, {}
    for impl in impls:
        fn = op_callable(case, impl, device)
        progress.set_postfix_str(f"{case.op} {case.site} {dtype_label(dtype)} {impl.name}: warm-up")
        first_call_s, output = warm_up(fn, device, EXTRA_WARMUP_CALLS[device.type])
        callables[impl.name] = fn
        iterations[impl.name] = calibrate(fn, device, OP_SAMPLE_S[device.type])
        rows[impl.name] = dict(context, kind="op", op=case.op, site=case.site, shape=case.shape,
                               dtype=dtype_label(dtype), impl=impl.name, first_call_s=first_call_s,
                               iterations_per_sample=iterations[impl.name], flops=case.flops,
                               bytes_moved=case.bytes_moved, rel_error=relative_error(output, expected))
        del output
        progress.update(1)
    progress.set_postfix_str(f"{case.op} {case.site} {dtype_label(dtype)}: timing")
    samples = interleaved_samples(callables, iterations, rounds, device, progress)
    for name, row in rows.items():
        row.update(timing_fields(samples[name], 1))
        row.update(_op_roofline(case, dtype, row["median_s"], peaks))
        if device.type == "cuda":
            row["peak_memory_bytes"] = cuda_forward_peak_bytes(callables[name], device)
            row["memory_method"] = CUDA_MEMORY_METHOD
    rows = list(rows.values())
    _add_speedups(rows)
    return rows


def _op_dtypes(dtypes: Iterable[str]) -> List[torch.dtype]:
    """Ops see fp32 in fp32 runs and bf16 under both autocast and cast: each op dtype once."""
    return list(dict.fromkeys(bench_matrix.torch_dtype(d) for d in dtypes))


def plan_size(matrix: Matrix, ops_wanted: Sequence[str], rounds: int, device_type: str) -> int:
    """Progress steps of a run: per implementation and case, one warm-up plus ``rounds`` samples."""
    encoder_cases = len(matrix.configs) * len(matrix.dtypes) * len(matrix.sizes) * len(matrix.batches)
    total = encoder_cases * len(bench_matrix.encoder_impls(matrix.impls, device_type)) * (rounds + 1)
    sites = {"window_attention": 3, "global_attention": 1, "maxpool2x2": 1, "fpn_upsample_add": 1}
    op_runs = sum(sites[op] * len(bench_matrix.op_impls(op, matrix.impls, device_type)) for op in ops_wanted)
    op_cases_count = len(matrix.configs) * len(matrix.sizes) * len(matrix.batches) * len(_op_dtypes(matrix.dtypes))
    return total + op_cases_count * op_runs * (rounds + 1)


def run(matrix: Matrix, rounds: int, ops_wanted: Sequence[str], measure_memory: bool, device: torch.device,
        progress) -> dict:
    started = utc_now()
    impls = bench_matrix.encoder_impls(matrix.impls, device.type)
    progress.set_postfix_str("measuring rooflines")
    peaks = rooflines(device)
    encoder_rows: List[dict] = []
    op_rows: List[dict] = []
    for config in matrix.configs:
        # The errors of every dtype and implementation are against the reference in fp32 on the same image.
        reference_fp32 = build_encoder(config, reference=True, dtype="fp32", device=device)
        expected = {}
        with torch.no_grad():
            for size in matrix.sizes:
                for batch in matrix.batches:
                    expected[size, batch] = feature_outputs(reference_fp32(seeded_image(batch, size, device)))
        del reference_fp32
        for dtype in matrix.dtypes:
            encoders = EncoderSet(config, dtype, device)
            for size in matrix.sizes:
                for batch in matrix.batches:
                    encoder_rows += bench_encoder_case(encoders, impls, seeded_image(batch, size, device),
                                                       expected[size, batch], rounds, measure_memory, progress)
            del encoders
            torch._dynamo.reset()
            gc.collect()
        del expected
        for size in matrix.sizes:
            for batch in matrix.batches:
                for dtype in _op_dtypes(matrix.dtypes):
                    context = {"config": short_name(config), "image_size": size, "batch": batch}
                    for case in op_cases(config, size, batch, dtype, device, ops_wanted):
                        op_impls = bench_matrix.op_impls(case.op, matrix.impls, device.type)
                        op_rows += bench_op_case(case, op_impls, dtype, context, rounds, device, peaks, progress)
        torch._dynamo.reset()
    meta = environment(device)
    meta.update(started=started, finished=utc_now(), rounds=rounds, argv=sys.argv[1:],
                auto_backends=bench_matrix.auto_resolution(device.type), compile_mode=compile_mode(device.type),
                backend_status=sam2_fast.backend_status(device.type),
                memory_method=(CUDA_MEMORY_METHOD if device.type == "cuda" else CPU_MEMORY_METHOD)
                if measure_memory else None)
    return {"meta": meta, "matrix": dataclasses.asdict(matrix), "rooflines": peaks,
            "encoder": encoder_rows, "ops": op_rows}


# ------------------------------------------------------------------------------------------------------------
# Writing

def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def _speedup(value) -> str:
    return _fmt(value, ".2f") + ("x" if value is not None else "")


def _markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


ENCODER_COLUMNS = ("config", "size", "batch", "dtype", "impl", "ms/img (median)", "p20-p80 ms/img", "img/s",
                   "vs ref eager", "vs ref compiled", "first call s", "peak mem MiB", "rel. error")
OP_COLUMNS = ("op", "site", "shape", "dtype", "impl", "median us", "p20-p80 us", "achieved", "of roofline",
              "vs ref eager", "vs ref compiled", "rel. error")


def encoder_table(rows: Sequence[dict]) -> str:
    def cells(row):
        memory = row.get("peak_memory_bytes")
        return (
            row["config"], str(row["image_size"]), str(row["batch"]), row["dtype"], row["impl"],
            f"{row['median_ms_per_image']:.1f}", f"{row['p20_ms_per_image']:.1f}-{row['p80_ms_per_image']:.1f}",
            f"{row['images_per_s']:.2f}", _speedup(row.get("speedup_vs_reference")),
            _speedup(row.get("speedup_vs_reference_compiled")), f"{row['first_call_s']:.1f}",
            _fmt(None if memory is None else memory / MIB, ".0f"), f"{row['rel_error']:.1e}",
        )

    return _markdown_table(ENCODER_COLUMNS, map(cells, rows))


def _achieved(row: dict) -> str:
    scale = 1e12 if row["achieved_unit"] == "TFLOP/s" else 1e9
    return f"{row['achieved'] / scale:.3g} {row['achieved_unit']}"


def op_table(rows: Sequence[dict]) -> str:
    def cells(row):
        fraction = row.get("roofline_fraction")
        return (
            row["op"], row["site"], row["shape"], row["dtype"], row["impl"], f"{1e6 * row['median_s']:.1f}",
            f"{1e6 * row['p20_s']:.1f}-{1e6 * row['p80_s']:.1f}", _achieved(row),
            "unknown" if fraction is None else f"{100 * fraction:.1f}%",
            _speedup(row.get("speedup_vs_reference")), _speedup(row.get("speedup_vs_reference_compiled")),
            f"{row['rel_error']:.1e}",
        )

    return _markdown_table(OP_COLUMNS, map(cells, rows))


def _roofline_line(peaks: dict) -> str:
    flops = ", ".join(f"{dtype} {value / 1e12:.3g} TFLOP/s" for dtype, value in peaks["flops"].items()) or "unknown"
    bandwidth = _fmt(None if peaks["bandwidth"] is None else peaks["bandwidth"] / 1e9, ".3g", "unknown")
    return f"{flops}; memory {bandwidth} GB/s ({peaks['source']})"


def render_markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [
        f"# sam2_fast benchmark: {meta['device_name']}",
        "",
        f"- Run: {meta['started']} to {meta['finished']}, {meta['rounds']} interleaved rounds per implementation, "
        f"`{' '.join(['python -m bench.report', *meta['argv']])}`",
        f"- torch {meta['torch']}, triton {meta['triton']}, sam2 {meta['sam2']}, sam2_fast {meta['sam2_fast']}, "
        f"Python {meta['python']}; {cpu_line(meta)}",
        f"- git {meta['git_commit']}{' (uncommitted changes in the tree)' if meta['git_dirty'] else ''}",
        f"- Roofline: {_roofline_line(results['rooflines'])}",
        f"- `auto` resolves to: {', '.join(f'{op} {b}' for op, b in meta['auto_backends'].items())}",
        "",
        "## Whole encoder",
        "",
        encoder_table(results["encoder"]) if results["encoder"] else "(none)",
        "",
        "## Ops",
        "",
        op_table(results["ops"]) if results["ops"] else "(none)",
        "",
        "## How to read this",
        "",
        "- Times are medians over interleaved rounds, with the 20th-80th percentiles; ms/img divides by the batch. "
        "Speedups are ratios of medians of this same run. `first call s` is the first call after building, "
        "compilation included, and is excluded from the timings.",
        "- Implementations: `reference` is the `sam2` package (ops: its own sequence for the step, e.g. pad + "
        "window_partition + SDPA + window_unpartition); `torch`, `extension`, `triton` are sam2_fast with that "
        "backend; `auto` is sam2_fast's per-op choice; `+compile` is `torch.compile(fullgraph=True)` "
        f"(mode: {meta.get('compile_mode', 'max-autotune on CUDA, default on CPU')}); `+capture` is "
        "`sam2_fast.capture_cuda_graphs` (one CUDA graph per shape, recorded at the first call; its peak memory is "
        "that of recording and replaying once, graph pool included). All load one seeded state_dict and see the "
        "same inputs.",
        "- dtypes: `fp32`; `bf16-autocast` is fp32 weights under `torch.autocast(bfloat16)`; `bf16` casts weights "
        "and input to bfloat16."
        + ("" if meta["device_type"] == "cuda" or meta["cpu_native_bf16"] else
           f" This CPU ({meta['cpu_capability']}) has no native bf16 kernels in oneDNN: the reference's bf16 "
           "matmuls take slow fallback paths, while sam2_fast computes bf16 matmuls and convolutions in fp32 on "
           "bf16-rounded operands and rounds the results (same numbers up to summation order)."),
        "- rel. error: max |output - reference fp32| / max |reference fp32|, worst over the `backbone_fpn` levels "
        "(`vision_features` is the last); for ops, against sam2_fast's plain-PyTorch op in fp32.",
        f"- peak mem: {meta['memory_method'] or 'not measured'}.",
        *[f"  - not measured for {row['config']} {row['image_size']} batch {row['batch']} {row['dtype']} "
          f"{row['impl']}: {row['memory_method']}" for row in results["encoder"]
          if meta["memory_method"] and row.get("peak_memory_bytes") is None],
        "- Ops: attention rows give matmul TFLOP/s (QK^T and PV over the padded windows); memory-bound rows give "
        "GB/s of compulsory traffic (inputs read once, output written once); `of roofline` divides by the peak above. "
        "Inputs small enough to stay in cache can pass a streaming-copy roofline (over 100%).",
    ]
    return "\n".join(lines) + "\n"


def plot_speedups(results: dict, path: Path) -> None:
    """Bars of speedup vs reference eager per (config, size, batch), one panel per dtype."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in results["encoder"] if row["impl"] != "reference"]
    dtypes = list(dict.fromkeys(row["dtype"] for row in results["encoder"])) or ["(no data)"]
    impls = list(dict.fromkeys(row["impl"] for row in rows))
    groups = list(dict.fromkeys((row["config"], row["image_size"], row["batch"]) for row in results["encoder"]))
    panel_width = max(4.0, 0.6 * len(groups) * max(1, len(impls)) + 2.0)
    figure, axes = plt.subplots(1, len(dtypes), figsize=(panel_width * len(dtypes), 4.5), squeeze=False, sharey=True)
    width = 0.8 / max(1, len(impls))
    for axis, dtype in zip(axes[0], dtypes):
        for index, impl in enumerate(impls):
            xs, heights = [], []
            for position, group in enumerate(groups):
                for row in rows:
                    if (row["config"], row["image_size"], row["batch"]) == group and row["dtype"] == dtype \
                            and row["impl"] == impl and row.get("speedup_vs_reference") is not None:
                        xs.append(position + (index - (len(impls) - 1) / 2) * width)
                        heights.append(row["speedup_vs_reference"])
            bars = axis.bar(xs, heights, width, label=impl)
            axis.bar_label(bars, fmt="%.2f", fontsize=8)
        axis.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        axis.set_xticks(range(len(groups)), [f"{c}\n{s}px, batch {b}" for c, s, b in groups])
        axis.set_xlim(-0.7, len(groups) - 0.3)
        axis.set_title(dtype)
        axis.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("speedup vs reference eager (median)")
    if impls:
        figure.legend(*axes[0][0].get_legend_handles_labels(), loc="lower center", ncol=len(impls), fontsize=8)
    figure.suptitle(f"sam2_fast image encoder: {results['meta']['device_name']}", fontsize=10)
    figure.tight_layout(rect=(0, 0.07, 1, 1))
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_results(results: dict, out_dir: Path) -> Dict[str, Path]:
    """Write ``<slug>.md``, ``.json`` and ``.png`` into ``out_dir``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / results["meta"]["device_slug"]
    paths = {"md": stem.with_suffix(".md"), "json": stem.with_suffix(".json"), "png": stem.with_suffix(".png")}
    paths["md"].write_text(render_markdown(results))
    paths["json"].write_text(json.dumps(results, indent=1) + "\n")
    plot_speedups(results, paths["png"])
    return paths


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    from tqdm import tqdm

    if args.compile_mode:
        os.environ[COMPILE_MODE_ENV_VAR] = args.compile_mode
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    matrix = matrix_from_args(args, device.type)
    bench_matrix.check_impls(matrix.impls or (), device.type)
    rounds = args.repeats or DEFAULT_REPEATS[device.type]
    impls = bench_matrix.encoder_impls(matrix.impls, device.type)
    print(f"device: {device.type}; encoder implementations: {', '.join(i.name for i in impls)}", file=sys.stderr)
    with tqdm(total=plan_size(matrix, args.ops, rounds, device.type), desc="bench", unit="step") as progress:
        results = run(matrix, rounds, args.ops, not args.no_memory, device, progress)
    print(render_markdown(results))
    for path in write_results(results, args.out).values():
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
