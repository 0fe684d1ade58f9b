"""``python -m bench.cold_start``: time to the first output in a fresh process.

Every path runs in its own new Python process (imports included, as a user's job starts) on the same seeded
encoder and image:
- ``eager``: build the encoder and call it;
- ``compile-cold`` / ``compile-warm``: ``torch.compile`` (``--compile-mode``) with an empty inductor cache, then a
  second process with that cache filled (dynamo still traces, inductor reuses its compiled code);
- ``reference-compile-cold``: the `sam2` encoder under ``torch.compile`` in the same mode, empty cache (what
  sam2's ``compile_image_encoder: True`` costs at every start);
- ``aot``: ``sam2_fast.load_exported`` of a package written once beforehand by ``sam2_fast.export_encoder``
  (that one-time export is timed and reported too);
- ``capture`` (CUDA): ``sam2_fast.capture_cuda_graphs``, whose first call records.

Writes ``<out>/cold-start-<device>.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

PATHS = ("eager", "compile-cold", "compile-warm", "reference-compile-cold", "aot", "capture")
REPO_ROOT = Path(__file__).resolve().parents[1]


def _child(args: argparse.Namespace) -> None:
    """One path in this (fresh) process; prints a JSON line with its timings."""
    started = time.perf_counter()
    import torch

    import sam2_fast
    from bench.workloads import build_encoder, seeded_image

    device = torch.device(args.device)
    imported = time.perf_counter()
    image = seeded_image(args.batch, args.size, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16-autocast")
    if args.path == "aot":
        forward = sam2_fast.load_exported(args.package)
    else:
        encoder = build_encoder(args.config, args.path.startswith("reference"), "fp32", device)
        if "compile" in args.path:
            mode = None if args.compile_mode == "default" else args.compile_mode
            forward = torch.compile(encoder, mode=mode, fullgraph=True, dynamic=False)
        elif args.path == "capture":
            forward = sam2_fast.capture_cuda_graphs(encoder)
        else:
            forward = encoder
    ready = time.perf_counter()
    with torch.inference_mode(), autocast:
        output = forward(image)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    first = time.perf_counter()
    assert output["vision_features"].shape[0] == args.batch
    print(json.dumps({"import_s": imported - started, "setup_s": ready - imported, "first_call_s": first - ready,
                      "in_process_s": first - started}))


def _run_child(path: str, args: argparse.Namespace, cache_dir: str, package: Optional[str]) -> Dict[str, float]:
    command = [sys.executable, "-m", "bench.cold_start", "--child", path, "--config", args.config, "--size",
               str(args.size), "--batch", str(args.batch), "--dtype", args.dtype, "--device", args.device,
               "--compile-mode", args.compile_mode] + (["--package", package] if package else [])
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache_dir)
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
    wall = time.perf_counter() - start
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{path} failed (exit {done.returncode}): {(done.stderr or done.stdout)[-2000:]}")
    return dict(json.loads(lines[-1]), process_wall_s=wall)


def _export(args: argparse.Namespace, package: str, cache_dir: str) -> float:
    """Seconds to write the package (export + AOTInductor compile), in its own process with an empty cache."""
    code = (
        "import torch, sam2_fast\n"
        "from bench.workloads import build_encoder, seeded_image\n"
        f"device = torch.device({args.device!r})\n"
        f"encoder = build_encoder({args.config!r}, False, 'fp32', device)\n"
        f"image = seeded_image({args.batch}, {args.size}, device)\n"
        f"dtype = torch.bfloat16 if {args.dtype!r} == 'bf16-autocast' else None\n"
        f"sam2_fast.export_encoder(encoder, image, {package!r}, autocast_dtype=dtype)\n"
    )
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True, timeout=args.timeout,
                   env=dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache_dir))
    return time.perf_counter() - start


def markdown(rows: List[dict], meta: dict) -> str:
    lines = [
        f"# Time to the first output in a fresh process ({meta['device_name']})",
        "",
        f"{meta['config']} at {meta['size']}x{meta['size']}, batch {meta['batch']}, {meta['dtype']}, compile mode "
        f"{meta['compile_mode']}. Each path is a new Python process; `process s` is its whole life (interpreter "
        "start and imports included), `first call s` the first forward after setting up (compilation, recording or "
        f"package loading happen there or in `setup s`). The AOT package was written once beforehand in "
        f"{meta['export_s']:.1f} s. `python -m bench.cold_start` regenerates this file.",
        "",
        "| path | process s | imports s | setup s | first call s |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row['path']} | {row['process_wall_s']:.1f} | {row['import_s']:.1f} | {row['setup_s']:.1f} "
                     f"| {row['first_call_s']:.1f} |")
    lines += ["", "Environment: " + ", ".join(f"{k} {v}" for k, v in meta["environment"].items()), ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.cold_start", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", choices=("fp32", "bf16-autocast"), default="fp32")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--compile-mode", default="default",
                        choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"))
    parser.add_argument("--paths", default=None, help=f"comma list of {', '.join(PATHS)} (default: all that apply)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per process")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--child", choices=PATHS, help=argparse.SUPPRESS)
    parser.add_argument("--package", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        args.path = args.child
        _child(args)
        return

    import torch
    from tqdm import tqdm

    from bench.measure import device_name, environment, write_rows_and_markdown

    device = torch.device(args.device)
    paths = args.paths.split(",") if args.paths else [p for p in PATHS if p != "capture" or args.device == "cuda"]
    unknown = set(paths) - set(PATHS)
    if unknown:
        parser.error(f"unknown paths {sorted(unknown)}: expected some of {', '.join(PATHS)}")
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        package = os.path.join(scratch, "encoder.pt2")
        export_s = _export(args, package, os.path.join(scratch, "export-cache")) if "aot" in paths else float("nan")
        caches = {"compile-cold": "ours", "compile-warm": "ours", "reference-compile-cold": "reference"}
        for path in tqdm(paths, desc="fresh processes", unit="process"):
            cache_dir = os.path.join(scratch, "cache-" + caches.get(path, path))
            rows.append(dict(_run_child(path, args, cache_dir, package if path == "aot" else None), path=path))
    meta = {"config": args.config, "size": args.size, "batch": args.batch, "dtype": args.dtype,
            "compile_mode": args.compile_mode, "export_s": export_s, "device_name": device_name(device),
            "environment": environment(device)}
    write_rows_and_markdown(args.out, "cold-start", device, meta, rows, markdown(rows, meta))


if __name__ == "__main__":
    main()
