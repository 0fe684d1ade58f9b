"""``python -m bench.train_step``: one fine-tuning step of the image encoder (forward + backward; the optimizer step
is left out), the reference `sam2` encoder against sam2_fast's, in one process.

Implementations, all in train mode with the same seeded weights and image:
- ``reference``: the `sam2` package's encoder, eager;
- ``sam2_fast``: sam2_fast's encoder, eager, backend ``auto`` (its backward kernels where it has them);
- ``sam2_fast+ckpt``: the same with activation checkpointing (``sam2_fast.set_activation_checkpointing``).

A step: gradients set to None (as ``optimizer.zero_grad()`` does), the forward under bf16 autocast if asked, loss =
sum of the mean of each ``backbone_fpn`` level, backward. Rounds are interleaved (every implementation once per
round, after one warm-up step each), so that a machine whose speed drifts affects all alike; medians with p20-p80.

Peak memory of a step: on CUDA ``torch.cuda.max_memory_allocated`` minus what was allocated before it; on CPU, which
has no allocator counter, the peak bytes of live tensors the step creates (``bench.tensor_memory``: activations kept
for the backward, temporaries, the gradients), measured on one extra step.

Writes ``<out>/train-step-<device>.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
from typing import Callable, Dict, List

import torch
from tqdm import tqdm

from .measure import cpu_line

IMPLS = ("reference", "sam2_fast", "sam2_fast+ckpt")
DTYPES = ("fp32", "bf16-autocast")


def build_step(config: str, impl: str, dtype: str, image: torch.Tensor) -> Callable[[], None]:
    """One training step of ``impl`` on ``image`` (a closure over its own encoder)."""
    import sam2_fast
    from bench.workloads import build_encoder

    model = build_encoder(config, impl == "reference", "fp32", image.device).train()
    if impl.endswith("+ckpt"):
        sam2_fast.set_activation_checkpointing(model)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        with torch.autocast(image.device.type, dtype=torch.bfloat16, enabled=dtype == "bf16-autocast"):
            out = model(image)
        sum(level.float().mean() for level in out["backbone_fpn"]).backward()

    return step


def peak_bytes(step: Callable[[], None], device: torch.device) -> int:
    from sam2_fast.testing.tensor_memory import peak_tensor_bytes

    if device.type != "cuda":
        return peak_tensor_bytes(step)[0]
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def measure_case(config: str, size: int, batch: int, dtype: str, impls: List[str], repeats: int,
                 device: torch.device, progress: tqdm) -> List[dict]:
    """Rows (one per impl) of one (config, size, batch, dtype): seconds per step and peak memory. ``progress``
    advances by one per step run (:func:`steps_per_case` of them)."""
    from bench.measure import summarize, synchronize, time_calls
    from bench.workloads import seeded_image, short_name

    case = f"{short_name(config)} {size} b{batch} {dtype}"
    image = seeded_image(batch, size, device)
    steps = {impl: build_step(config, impl, dtype, image) for impl in impls}
    for impl, step in steps.items():
        progress.set_postfix_str(f"{case} {impl}: warm-up")
        step()
        progress.update()
    seconds: Dict[str, List[float]] = {impl: [] for impl in impls}
    for _ in range(repeats):
        for impl, step in steps.items():
            progress.set_postfix_str(f"{case} {impl}: timing")
            seconds[impl].append(time_calls(step, device))
            progress.update()
    synchronize(device)
    rows = []
    for impl in impls:
        progress.set_postfix_str(f"{case} {impl}: memory")
        stats = summarize(seconds[impl])
        rows.append({"config": short_name(config), "size": size, "batch": batch, "dtype": dtype, "impl": impl,
                     "s_per_step": stats, "samples_s": seconds[impl], "peak_bytes": peak_bytes(steps[impl], device)})
        progress.update()
    reference = next((row for row in rows if row["impl"] == "reference"), None)
    for row in rows:
        row["speedup_vs_reference"] = (reference["s_per_step"]["median"] / row["s_per_step"]["median"]
                                       if reference else None)
        row["memory_vs_reference"] = row["peak_bytes"] / reference["peak_bytes"] if reference else None
    return rows


def steps_per_case(num_impls: int, repeats: int) -> int:
    """Steps :func:`measure_case` runs: a warm-up, ``repeats`` timed and one memory step per implementation."""
    return num_impls * (repeats + 2)


def markdown(rows: List[dict], meta: dict) -> str:
    lines = [
        f"# Training step: forward + backward ({meta['device_name']})",
        "",
        f"`python -m bench.train_step {meta['argv']}`: {meta['repeats']} interleaved rounds after one warm-up step "
        "each; the optimizer step is not included. Peak memory: " + meta["memory_method"] + ".",
        "",
        "| config | size | batch | dtype | impl | s/step (median) | p20-p80 s | vs reference | peak MiB | memory vs ref |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        stats = row["s_per_step"]
        speedup = f"{row['speedup_vs_reference']:.2f}x" if row["speedup_vs_reference"] else "-"
        memory = f"{row['memory_vs_reference']:.2f}x" if row["memory_vs_reference"] else "-"
        lines.append(
            f"| {row['config']} | {row['size']} | {row['batch']} | {row['dtype']} | {row['impl']} | "
            f"{stats['median']:.3f} | {stats['p20']:.3f}-{stats['p80']:.3f} | {speedup} | "
            f"{row['peak_bytes'] / 2**20:.0f} | {memory} |"
        )
    backward = ", ".join(f"{op} {how}" for op, how in meta["active_backward"].items())
    lines += ["", f"sam2_fast's backward per op: {backward}.", ""]
    if meta["environment"].get("device_type") == "cpu":
        lines += [f"{cpu_line(meta['environment'])}.", ""]
    lines += ["Environment: " + ", ".join(f"{k} {v}" for k, v in meta["environment"].items()), ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.train_step", description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--configs", default=None, help="comma list (default: tiny,base_plus on CPU, base_plus on CUDA)")
    parser.add_argument("--sizes", default=None, help="comma list (default: 512 on CPU, 1024 on CUDA)")
    parser.add_argument("--batch", type=int, default=None, help="default: 2 on CPU, 4 on CUDA")
    parser.add_argument("--dtypes", default=None, help=f"comma list of {', '.join(DTYPES)} "
                        "(default: both on CPU, bf16-autocast on CUDA)")
    parser.add_argument("--impls", default=",".join(IMPLS), help=f"comma list of {', '.join(IMPLS)}")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)

    import sam2_fast
    from bench.measure import CUDA_MEMORY_METHOD, device_name, environment, write_rows_and_markdown

    on_gpu = args.device == "cuda"
    configs = (args.configs or ("base_plus" if on_gpu else "tiny,base_plus")).split(",")
    sizes = [int(s) for s in (args.sizes or ("1024" if on_gpu else "512")).split(",")]
    batch = args.batch or (4 if on_gpu else 2)
    dtypes = (args.dtypes or ("bf16-autocast" if on_gpu else ",".join(DTYPES))).split(",")
    impls = args.impls.split(",")
    for name, values, allowed in (("dtypes", dtypes, DTYPES), ("impls", impls, IMPLS)):
        if set(values) - set(allowed):
            parser.error(f"unknown {name} {sorted(set(values) - set(allowed))}: expected some of {', '.join(allowed)}")
    device = torch.device(args.device)
    rows = []
    cases = [(config, size, dtype) for config in configs for size in sizes for dtype in dtypes]
    with tqdm(total=len(cases) * steps_per_case(len(impls), args.repeats), desc="train step", unit="step") as progress:
        for config, size, dtype in cases:
            case = measure_case(config, size, batch, dtype, impls, args.repeats, device, progress)
            for row in case:
                progress.write(f"{row['config']} {size} b{batch} {dtype} {row['impl']}: "
                               f"{row['s_per_step']['median']:.3f} s/step, {row['peak_bytes'] / 2**20:.0f} MiB")
            rows += case
    meta = {
        "argv": " ".join(argv if argv is not None else __import__("sys").argv[1:]),
        "repeats": args.repeats, "device_name": device_name(device),
        "memory_method": CUDA_MEMORY_METHOD.replace("one forward", "one step") if on_gpu else (
            "peak bytes of live tensors created during one step (bench.tensor_memory); the CPU has no allocator "
            "counter"),
        "active_backward": sam2_fast.active_backward(device.type), "environment": environment(device),
    }
    write_rows_and_markdown(args.out, "train-step", device, meta, rows, markdown(rows, meta))


if __name__ == "__main__":
    main()
