"""``python -m bench.transformers_embeddings``: Hugging Face transformers' ``Sam2Model.get_image_embeddings`` before
and after ``sam2_fast.optimize``, in one process.

Two copies of one seeded model (``sam2_fast.testing.transformers_models``: a named config's encoder, the image size
set to ``--size``): ``transformers`` as built, ``transformers + sam2_fast`` after ``sam2_fast.optimize`` with the
given options. After warm-up calls, the rounds are interleaved (``bench.report.interleaved_samples``: each copy once
per round, their order rotated), so a machine whose speed drifts affects both alike; medians with p20-p80, the
speed-up of the medians, and the largest error of any embedding level against the unoptimized model's, relative to
that level's largest magnitude.

Prints a markdown table; ``--out DIR`` also writes ``DIR/transformers-embeddings-<device>.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import copy
import sys
from typing import Dict, List, Optional, Sequence

import torch
from tqdm import tqdm

from .measure import (EXTRA_WARMUP_CALLS, calibrate, cpu_line, device_name, environment, timing_fields, utc_now,
                      warm_up, write_rows_and_markdown)
from .report import interleaved_samples

IMPLS = ("transformers", "transformers + sam2_fast")
# Seconds one timed sample should last: on a GPU a call takes milliseconds, so a sample repeats it.
SAMPLE_TARGET_S = {"cpu": 0.0, "cuda": 0.2}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.transformers_embeddings",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny", help="sam2_fast config name (tiny, small, base_plus, large, ...)")
    parser.add_argument("--size", type=int, default=1024, help="image height and width (a multiple of 32)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                        help="optimize's dtype: the sam2_fast encoder computes in it (the model stays fp32)")
    parser.add_argument("--backend", default=None, help="optimize's backend (default: the process-wide one)")
    parser.add_argument("--capture", action="store_true", help="optimize with capture=True (CUDA graphs)")
    parser.add_argument("--out", default=None, help="folder for the .md and .json (default: print only)")
    return parser.parse_args(argv)


def relative_error(actual: List[torch.Tensor], expected: List[torch.Tensor]) -> float:
    """The largest error of any level, relative to that level's largest magnitude."""
    return max(((a.double() - e.double()).abs().max() / e.double().abs().max().clamp_min(1e-30)).item()
               for a, e in zip(actual, expected))


def measure(args: argparse.Namespace) -> List[dict]:
    import sam2_fast
    from sam2_fast.testing.transformers_models import build_transformers_model

    device = torch.device(args.device)
    plain = build_transformers_model("Sam2Model", args.config, args.size).to(device)
    optimized = sam2_fast.optimize(copy.deepcopy(plain), backend=args.backend, capture=args.capture,
                                   dtype=torch.bfloat16 if args.dtype == "bf16" else None)
    pixels = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0)).to(device)
    calls = {impl: (lambda model=model: model.get_image_embeddings(pixels))
             for impl, model in zip(IMPLS, (plain, optimized))}
    rows: Dict[str, dict] = {}
    outputs = {}
    with torch.inference_mode(), tqdm(total=args.rounds * len(IMPLS), desc="get_image_embeddings") as progress:
        for impl, call in calls.items():
            first_call_s, outputs[impl] = warm_up(call, device, EXTRA_WARMUP_CALLS[device.type])
            rows[impl] = {"impl": impl, "first_call_s": first_call_s,
                          "iterations_per_sample": calibrate(call, device, SAMPLE_TARGET_S[device.type])}
        samples = interleaved_samples(calls, {impl: row["iterations_per_sample"] for impl, row in rows.items()},
                                      args.rounds, device, progress)
    for impl, row in rows.items():
        row.update(config=args.config, size=args.size, batch=args.batch, dtype=args.dtype,
                   **timing_fields(samples[impl], args.batch),
                   rel_error=relative_error(outputs[impl], outputs[IMPLS[0]]))
    for row in rows.values():
        row["speedup"] = rows[IMPLS[0]]["median_s"] / row["median_s"]
    return list(rows.values())


def markdown(rows: List[dict], meta: dict) -> str:
    first = rows[0]
    lines = [
        "# transformers Sam2Model.get_image_embeddings, before and after sam2_fast.optimize",
        "",
        f"Config {first['config']}, {first['size']}x{first['size']}, batch {first['batch']}, optimize dtype "
        f"{first['dtype']}; {meta['device_name']}; torch {meta['environment']['torch']}, transformers "
        f"{meta['transformers']}, sam2_fast {meta['environment']['sam2_fast']}, commit "
        f"{meta['environment']['git_commit']}{' (dirty)' if meta['environment']['git_dirty'] else ''}.",
    ]
    if meta["environment"]["device_type"] == "cpu":
        lines.append(cpu_line(meta["environment"]) + ".")
    lines += [
        f"{meta['rounds']} interleaved rounds; `{meta['argv']}`.",
        "",
        "| impl | median ms | p20-p80 ms | speed-up | first call s | max error vs transformers |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row['impl']} | {1e3 * row['median_s']:.2f} | {1e3 * row['p20_s']:.2f}-"
                     f"{1e3 * row['p80_s']:.2f} | {row['speedup']:.2f}x | {row['first_call_s']:.2f} | "
                     f"{row['rel_error']:.1e} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    from sam2_fast.testing.transformers_models import import_transformers

    transformers = import_transformers()
    device = torch.device(args.device)
    started = utc_now()
    rows = measure(args)
    meta = {"argv": " ".join(argv if argv is not None else sys.argv[1:]), "rounds": args.rounds,
            "device_name": device_name(device), "transformers": transformers.__version__, "started": started,
            "finished": utc_now(), "environment": environment(device)}
    text = markdown(rows, meta)
    if args.out is None:
        print(text)
    else:
        write_rows_and_markdown(args.out, "transformers-embeddings", device, meta, rows, text)


if __name__ == "__main__":
    main()
