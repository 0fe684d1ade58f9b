"""Embedding throughput end to end: ``sam2-fast embed`` against a plain loop with the reference encoder.

    python -m bench.embed_throughput                       # tiny, 512x512, 16 JPEG files, 3 interleaved rounds
    python -m bench.embed_throughput --device cuda --config sam2.1_hiera_base_plus --image-size 1024 --images 64

Both sides start from the same JPEG files and the same weights file and end with the embeddings on disk
(``vision_features`` and the two high-resolution ``backbone_fpn`` levels):

- ``sam2-fast embed``: the command's own code in this process (``sam2_fast.embed.main``): DataLoader workers
  decode, batches go through sam2_fast's encoder, safetensors shards and the index are written; in fp32, and
  with ``--dtype bf16`` (its usual speed-up on CPUs).
- ``reference loop``: what a script would do with the `sam2` package: for each file, decode with Pillow,
  prepare it as SAM-2 does, run the reference encoder on it, write its embeddings to a safetensors file.

Each timing covers building the encoder and loading the weights, every image, and the writes. The two run
interleaved, ``--rounds`` times each, and the result is the median images/s of each and their ratio. Results go
to ``bench/results/embed-throughput-<device>.{md,json}``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from sam2_fast.apps import embed
from sam2_fast.io.images import model_input
from sam2_fast.testing.reference import build_reference_encoder

from .measure import device_slug, environment, summarize, synchronize, utc_now
from .workloads import REPO_ROOT

FEATURES = ",".join(embed.FEATURES)


def write_jpegs(folder: Path, count: int, seed: int = 0) -> List[str]:
    """``count`` 640x480 JPEG files of smooth gradients with noise: decoding cost like camera pictures'."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:480, 0:640].astype(np.float32)
    paths = []
    for i in range(count):
        base = np.stack([x / 640 * 255, y / 480 * 255, (x + y) / 1120 * 255], axis=-1)
        pixels = np.clip(base * rng.uniform(0.5, 1.0) + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        path = folder / f"image{i:04d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(str(path))
    return paths


def reference_loop(paths: Sequence[str], checkpoint: str, args: argparse.Namespace, out: Path,
                   device: torch.device) -> None:
    """The plain script: one file at a time through the reference encoder, one safetensors file per image."""
    from safetensors.torch import save_file

    encoder = build_reference_encoder(args.config)
    encoder.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    encoder.to(device)
    out.mkdir(parents=True)
    with torch.inference_mode():
        for i, path in enumerate(paths):
            output = encoder(model_input(path, args.image_size)[None].to(device))
            tensors = {"vision_features": output["vision_features"][0],
                       **{f"backbone_fpn.{level}": output["backbone_fpn"][level][0] for level in (0, 1)}}
            save_file({name: t.contiguous().cpu() for name, t in tensors.items()}, str(out / f"{i:06d}.safetensors"))


def cli_run(folder: Path, checkpoint: str, args: argparse.Namespace, out: Path, device: torch.device,
            dtype: str) -> None:
    embed.main([str(folder), "--out", str(out), "--config", args.config, "--checkpoint", checkpoint,
                "--image-size", str(args.image_size), "--batch-size", str(args.batch_size),
                "--workers", str(args.workers), "--device", str(device), "--features", FEATURES, "--dtype", dtype])


def speedup_rows(samples: Dict[str, List[float]], images: int) -> Dict[str, dict]:
    """Per impl: images/s from the median run, and its speed-up over the reference loop, as the ratio of the
    medians and as the median of each round's ratio (runs of one round are minutes apart at most, so the paired
    ratio is less sensitive to the machine's load changing between rounds)."""
    reference = samples["reference loop"]
    rows = {}
    for name, seconds in samples.items():
        stats = summarize(seconds)
        rows[name] = {
            "samples": seconds, "seconds": stats, "images_per_s": images / stats["median"],
            "p20_images_per_s": images / stats["p80"], "p80_images_per_s": images / stats["p20"],
            "speedup": summarize(reference)["median"] / stats["median"],
            "paired_speedup": float(np.median([r / s for r, s in zip(reference, seconds)])),
        }
    return rows


def timed(fn: Callable[[], None], device: torch.device) -> float:
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def render_markdown(results: dict) -> str:
    meta, setup = results["environment"], results["setup"]
    lines = [
        "# Embedding throughput: `sam2-fast embed` vs a plain loop with the reference encoder",
        "",
        f"- device: {meta['device_name']}; CPU capability {meta['cpu_capability']}, native bf16 "
        f"{meta['cpu_native_bf16']}; torch {meta['torch']}, sam2 {meta['sam2']}",
        f"- git {meta['git_commit']}{' (uncommitted changes in the tree)' if meta['git_dirty'] else ''}; {results['date']}",
        f"- {setup['images']} JPEG files 640x480, config {setup['config']}, {setup['image_size']}x{setup['image_size']}, "
        f"reference loop in fp32; CLI batch {setup['batch_size']}, {setup['workers']} decoding worker(s); {setup['rounds']} interleaved "
        "rounds each; every timing includes building the encoder, decoding, encoding and writing",
        f"- command: `{results['command']}`",
        f"- machine load (1-minute load average, {results['load_average_1min']['cpus']} CPUs): "
        f"{results['load_average_1min']['before']:.1f} before, {results['load_average_1min']['after']:.1f} after",
        "",
        "| impl | images/s (median) | p20-p80 images/s | s per run (median) | vs reference loop (medians) | "
        "vs reference loop (median of per-round ratios) |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in results["rows"].items():
        lines.append(f"| {name} | {row['images_per_s']:.2f} | {row['p20_images_per_s']:.2f}-{row['p80_images_per_s']:.2f}"
                     f" | {row['seconds']['median']:.1f} | {row['speedup']:.2f}x | {row['paired_speedup']:.2f}x |")
    lines.append("")
    lines.append("Raw seconds per run: " + "; ".join(f"{name}: {', '.join(f'{s:.2f}' for s in row['samples'])}"
                                                       for name, row in results["rows"].items()))
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="sam2.1_hiera_tiny")
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cli-dtypes", default="fp32,bf16", help="the CLI's --dtype values to run (the reference "
                                                                   "loop runs in fp32)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--results", default=str(REPO_ROOT / "bench" / "results"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        folder = scratch / "images"
        folder.mkdir()
        paths = write_jpegs(folder, args.images)
        checkpoint = str(scratch / "weights.pt")
        torch.manual_seed(0)
        torch.save(build_reference_encoder(args.config).state_dict(), checkpoint)

        runs: Dict[str, Callable[[Path], None]] = {
            "reference loop": lambda out: reference_loop(paths, checkpoint, args, out, device),
            **{f"sam2-fast embed --dtype {dtype}": functools.partial(cli_run, folder, checkpoint, args, device=device,
                                                                     dtype=dtype)
               for dtype in args.cli_dtypes.split(",")},
        }
        samples: Dict[str, List[float]] = {name: [] for name in runs}
        # Other work on the machine slows every run; its load (runnable processes, 1-minute average) is kept with
        # the result.
        load_before = os.getloadavg()[0]
        for round_index in range(args.rounds):
            for name, run in runs.items():
                seconds = timed(lambda: run(scratch / f"out-{round_index}-{name.split()[-1]}"), device)
                samples[name].append(seconds)
                print(f"round {round_index + 1}/{args.rounds} {name}: {seconds:.2f} s, {args.images / seconds:.2f} images/s")

    load_after = os.getloadavg()[0]
    rows = speedup_rows(samples, args.images)
    results = {
        "date": utc_now(), "environment": environment(device), "rows": rows,
        "load_average_1min": {"before": load_before, "after": load_after, "cpus": os.cpu_count()},
        "command": "python -m bench.embed_throughput " + " ".join(argv if argv is not None else sys.argv[1:]),
        "setup": {key: getattr(args, key) for key in ("config", "image_size", "images", "batch_size", "workers",
                                                      "rounds", "cli_dtypes")},
    }
    markdown = render_markdown(results)
    print(markdown)
    out_dir = Path(args.results)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"embed-throughput-{device_slug(device)}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown)
    print(f"wrote {stem}.md and .json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
