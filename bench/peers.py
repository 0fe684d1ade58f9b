"""``python -m bench.peers``: the runtimes a CPU user would pick for the SAM-2 image encoder, side by side.

Systems, all on the CPU in one process, with the same seeded weights, the same image and the same thread count:

- ``reference``: the `sam2` package's encoder, eager, fp32;
- ``sam2_fast``, ``sam2_fast-bf16``, ``sam2_fast-bf16-autocast``: sam2_fast's encoder (backend ``auto``) in fp32,
  with weights and input cast to bf16, and with fp32 weights under bf16 autocast;
- ``onnxruntime``: the reference encoder exported to ONNX by ``torch.onnx.export`` (the dynamo exporter; the output
  dict flattened to ``vision_features``, ``vision_pos_enc.*``, ``backbone_fpn.*``), run by ONNX Runtime's CPU
  execution provider in fp32;
- ``openvino-f32``, ``openvino-bf16``: that ONNX file converted by ``openvino.convert_model`` and compiled for the
  CPU with ``INFERENCE_PRECISION_HINT`` f32, and bf16 (OpenVINO's default on CPUs with bf16 units; on a CPU
  without them OpenVINO runs f32 instead, which the "runs in" column shows).

Threads: ``torch.set_num_threads``, ONNX Runtime's ``intra_op_num_threads`` (one inter-op thread) and OpenVINO's
``INFERENCE_NUM_THREADS`` (latency hint: one stream) all get ``--threads``. Every system is warmed up, then timed in
rounds that interleave the systems, rotating their order each round (``bench.report.interleaved_samples``).
Errors are against the reference's fp32 outputs on the same image. The export, the conversion and the compile are
timed apart from the forward.

    python -m bench.peers --configs tiny,base_plus --sizes 512,1024 --rounds 5

Writes ``<out>/peers-<device-slug>.md`` and ``.json``. ONNX Runtime and OpenVINO are optional:
``pip install .[peers]``; without them their systems are skipped with a message and the others still run.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import importlib.util
import sys
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm import tqdm

from .matrix import Impl, Matrix, check_matrix, parse_list
from .measure import (
    EXTRA_WARMUP_CALLS, cpu_line, device_name, environment, timing_fields, utc_now, warm_up, write_rows_and_markdown,
)
from .report import interleaved_samples
from .workloads import EncoderSet, build_encoder, seeded_image, short_name

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
DEVICE = torch.device("cpu")
INSTALL_HINT = "pip install .[peers]"
# torch.onnx.export's dynamo exporter needs onnx and onnxscript, whichever runtime reads the file.
EXPORT_PACKAGES = ("onnx", "onnxscript")


@dataclasses.dataclass(frozen=True)
class System:
    """One way to run the encoder: ``runtime`` is torch, onnxruntime or openvino; ``precision`` a bench dtype for
    torch (fp32, bf16, bf16-autocast) and the inference precision hint for OpenVINO."""

    name: str
    runtime: str
    precision: str
    description: str

    @property
    def packages(self) -> Tuple[str, ...]:
        """The optional packages this system needs (import names)."""
        return () if self.runtime == "torch" else EXPORT_PACKAGES + (self.runtime,)


SYSTEMS = (
    System("reference", "torch", "fp32", "the `sam2` package's encoder, eager"),
    System("sam2_fast", "torch", "fp32", "sam2_fast's encoder, backend auto"),
    System("sam2_fast-bf16", "torch", "bf16", "sam2_fast, weights and input cast to bf16"),
    System("sam2_fast-bf16-autocast", "torch", "bf16-autocast", "sam2_fast, fp32 weights under bf16 autocast"),
    System("onnxruntime", "onnxruntime", "fp32", "the reference exported to ONNX, ONNX Runtime CPU EP"),
    System("openvino-f32", "openvino", "f32", "the ONNX file through openvino.convert_model, CPU, f32 hint"),
    System("openvino-bf16", "openvino", "bf16", "the ONNX file through openvino.convert_model, CPU, bf16 hint"),
)
SYSTEM_NAMES = tuple(system.name for system in SYSTEMS)


def missing_packages(system: System) -> List[str]:
    return [name for name in system.packages if importlib.util.find_spec(name) is None]


def package_versions() -> Dict[str, Optional[str]]:
    """Versions of the peers' packages (None where not installed)."""
    versions = {}
    for name in ("onnx", "onnxscript", "onnxruntime", "openvino"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return versions


# ------------------------------------------------------------------------------------------------------------
# Outputs

def output_names(num_levels: int) -> List[str]:
    """The flattened order of the encoder's output dict, the ONNX file's output names."""
    return (["vision_features"] + [f"vision_pos_enc.{i}" for i in range(num_levels)]
            + [f"backbone_fpn.{i}" for i in range(num_levels)])


def flatten_outputs(output: dict) -> List[torch.Tensor]:
    """The encoder's output dict as a list in :func:`output_names` order."""
    return [output["vision_features"], *output["vision_pos_enc"], *output["backbone_fpn"]]


class FlatOutputs(torch.nn.Module):
    """The encoder with its output dict flattened into a tuple: ONNX outputs are a flat list."""

    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, image: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        return tuple(flatten_outputs(self.encoder(image)))


def output_errors(actual: Sequence, expected: Sequence[torch.Tensor], names: Sequence[str]) -> dict:
    """Worst max |actual - expected| over the outputs, and the worst of max |actual - expected| / max |expected|
    (the error at each output's scale), with the output it comes from."""
    if len(actual) != len(expected):
        raise ValueError(f"expected {len(expected)} outputs ({', '.join(names)}), got {len(actual)}")
    worst_abs, worst_rel = (0.0, names[0]), (0.0, names[0])
    for name, got, want in zip(names, actual, expected):
        got = (got if isinstance(got, torch.Tensor) else torch.from_numpy(np.asarray(got))).double()
        want = want.double()
        if got.shape != want.shape:
            raise ValueError(f"output {name}: expected shape {tuple(want.shape)}, got {tuple(got.shape)}")
        difference = (got - want).abs().max().item()
        worst_abs = max(worst_abs, (difference, name))
        worst_rel = max(worst_rel, (difference / max(want.abs().max().item(), 1e-30), name))
    return {"max_abs_error": worst_abs[0], "max_abs_error_output": worst_abs[1],
            "rel_error": worst_rel[0], "rel_error_output": worst_rel[1]}


# ------------------------------------------------------------------------------------------------------------
# Preparing each system: a callable ``fn() -> raw output`` and a function from that raw output to the flat list

@dataclasses.dataclass
class Prepared:
    """A system ready to run: ``forward()`` returns its raw output, ``outputs(raw)`` the flat list of tensors or
    arrays; ``compile_s`` is ONNX Runtime's session creation or OpenVINO's compile, ``runs_in`` the precision it
    computes in (for OpenVINO, as its compiled model reports it)."""

    forward: Callable[[], object]
    outputs: Callable[[object], Sequence]
    runs_in: str
    compile_s: Optional[float] = None


def export_onnx(encoder: torch.nn.Module, image: torch.Tensor, names: Sequence[str], path: Path) -> dict:
    """``encoder`` exported to ``path`` for ``image``'s shape (static shapes, outputs named ``names``); returns
    how, and the file's opset and node count."""
    import onnx

    torch.onnx.export(FlatOutputs(encoder), (image,), str(path), dynamo=True, input_names=["image"],
                      output_names=list(names), verbose=False)
    model = onnx.load(str(path), load_external_data=False)
    opset = next((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), None)
    return {"exporter": "torch.onnx.export(dynamo=True)", "opset": opset, "onnx_nodes": len(model.graph.node)}


def prepare_torch(system: System, config: str, image: torch.Tensor) -> Prepared:
    encoders = EncoderSet(config, system.precision, DEVICE)
    forward = encoders.callable(Impl("reference" if system.name == "reference" else "auto"))
    model_input = encoders.input_for(image)
    return Prepared(lambda: forward(model_input), flatten_outputs, system.precision)


def prepare_onnxruntime(path: Path, image: torch.Tensor, threads: int) -> Prepared:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads  # the calling thread included, as torch counts its threads
    options.inter_op_num_threads = 1
    # ONNX Runtime's workers otherwise spin on after Run returns (35-40 ms of CPU time in the 0.2 s after a call,
    # against none for OpenVINO's and a few ms for torch's OpenMP threads), taking a core from whichever system the
    # interleaved rounds run next. They spin again from the next Run on: ONNX Runtime's own time is unchanged.
    options.add_session_config_entry("session.force_spinning_stop", "1")
    begin = time.perf_counter()
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    compile_s = time.perf_counter() - begin
    feed = {session.get_inputs()[0].name: image.numpy()}
    return Prepared(lambda: session.run(None, feed), lambda raw: raw, "fp32", compile_s)


def convert_openvino(path: Path):
    """The ONNX file at ``path`` as an OpenVINO model (``openvino.convert_model``)."""
    import openvino

    return openvino.convert_model(str(path))


@functools.lru_cache(maxsize=None)
def openvino_core():
    import openvino

    return openvino.Core()


def prepare_openvino(model, precision: str, image: torch.Tensor, threads: int) -> Prepared:
    import openvino.properties as props
    import openvino.properties.hint as hints

    config = {hints.inference_precision: precision, props.inference_num_threads: threads,
              hints.performance_mode: hints.PerformanceMode.LATENCY}
    begin = time.perf_counter()
    compiled = openvino_core().compile_model(model, "CPU", config)
    compile_s = time.perf_counter() - begin
    request, array, ports = compiled.create_infer_request(), image.numpy(), list(compiled.outputs)
    runs_in = compiled.get_property(hints.inference_precision).to_string()
    return Prepared(lambda: request.infer({0: array}), lambda raw: [raw[port] for port in ports], runs_in, compile_s)


# ------------------------------------------------------------------------------------------------------------
# Running

def steps_per_case(systems: Sequence[System], rounds: int) -> int:
    """Progress steps of one case: the export and the conversion where needed, then per system its preparation,
    its warm-up and ``rounds`` samples."""
    exported = any(system.runtime != "torch" for system in systems)
    converted = any(system.runtime == "openvino" for system in systems)
    return int(exported) + int(converted) + len(systems) * (rounds + 2)


def measure_case(config: str, size: int, batch: int, systems: Sequence[System], rounds: int, threads: int,
                 progress: tqdm) -> List[dict]:
    """One row per system of one (config, size, batch)."""
    case = f"{short_name(config)} {size} b{batch}"
    image = seeded_image(batch, size, DEVICE)

    def timed(what: str, fn: Callable):
        """``fn()``, shown as the current step, and its seconds, printed once done."""
        progress.set_postfix_str(f"{case}: {what}")
        begin = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - begin
        progress.update(1)
        progress.write(f"{case}: {what}: {seconds:.1f} s")
        return result, seconds

    reference = build_encoder(config, True, "fp32", DEVICE)
    with torch.no_grad():
        expected = flatten_outputs(reference(image))
    names = output_names((len(expected) - 1) // 2)
    onnx_details, export_s, openvino_model, convert_s = None, None, None, None
    prepared: Dict[str, Prepared] = {}
    with tempfile.TemporaryDirectory(prefix="sam2_fast-peers-") as folder:
        onnx_path = Path(folder) / "encoder.onnx"
        if any(system.runtime != "torch" for system in systems):
            onnx_details, export_s = timed("ONNX export",
                                           functools.partial(export_onnx, reference, image, names, onnx_path))
        del reference
        for system in systems:
            if system.runtime == "openvino" and openvino_model is None:
                openvino_model, convert_s = timed("openvino.convert_model", lambda: convert_openvino(onnx_path))
            if system.runtime == "torch":
                prepare = functools.partial(prepare_torch, system, config, image)
            elif system.runtime == "onnxruntime":
                prepare = functools.partial(prepare_onnxruntime, onnx_path, image, threads)
            else:
                prepare = functools.partial(prepare_openvino, openvino_model, system.precision, image, threads)
            what = {"torch": "build", "onnxruntime": "session", "openvino": "compile"}[system.runtime]
            prepared[system.name], _ = timed(f"{system.name} {what}", prepare)

        rows: Dict[str, dict] = {}
        for system in systems:
            progress.set_postfix_str(f"{case}: {system.name} warm-up")
            first_call_s, raw = warm_up(prepared[system.name].forward, DEVICE, EXTRA_WARMUP_CALLS["cpu"])
            errors = output_errors(prepared[system.name].outputs(raw), expected, names)
            del raw
            progress.update(1)
            exported = system.runtime != "torch"
            rows[system.name] = {
                "config": short_name(config), "image_size": size, "batch": batch, "system": system.name,
                "runtime": system.runtime, "precision": system.precision, "runs_in": prepared[system.name].runs_in,
                "onnx": onnx_details if exported else None, "export_s": export_s if exported else None,
                "convert_s": convert_s if system.runtime == "openvino" else None,
                "compile_s": prepared[system.name].compile_s, "first_call_s": first_call_s, **errors,
            }
        progress.set_postfix_str(f"{case}: timing")
        callables = {name: entry.forward for name, entry in prepared.items()}
        samples = interleaved_samples(callables, dict.fromkeys(callables, 1), rounds, DEVICE, progress)
    del prepared, callables, openvino_model
    gc.collect()
    for name, row in rows.items():
        row.update(timing_fields(samples[name], batch))
    reference_median = rows["reference"]["median_s"] if "reference" in rows else None
    for row in rows.values():
        row["speedup_vs_reference"] = reference_median / row["median_s"] if reference_median else None
    return list(rows.values())


def runtime_details() -> dict:
    """What ONNX Runtime and OpenVINO see of this machine, where installed."""
    details = {}
    if importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime

        details["onnxruntime_providers"] = onnxruntime.get_available_providers()
    if importlib.util.find_spec("openvino") is not None:
        core = openvino_core()
        details["openvino_cpu"] = core.get_property("CPU", "FULL_DEVICE_NAME")
        details["openvino_capabilities"] = list(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    return details


# ------------------------------------------------------------------------------------------------------------
# Writing

def _seconds(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.1f}"


def markdown(rows: Sequence[dict], meta: dict) -> str:
    versions = meta["packages"]
    lines = [
        f"# CPU runtimes side by side: {meta['device_name']}",
        "",
        f"- Run: {meta['started']} to {meta['finished']}, interleaved rounds per system after warm-up: "
        f"{meta['rounds']}, `python -m bench.peers {' '.join(meta['argv'])}`",
        f"- torch {meta['environment']['torch']}, onnxruntime {versions['onnxruntime'] or 'not installed'}, openvino "
        f"{versions['openvino'] or 'not installed'}, onnx {versions['onnx'] or 'not installed'}, onnxscript "
        f"{versions['onnxscript'] or 'not installed'}, sam2 {meta['environment']['sam2']}, sam2_fast "
        f"{meta['environment']['sam2_fast']}, Python {meta['environment']['python']}",
        f"- {cpu_line(meta['environment'])}",
        f"- OpenVINO sees: {meta['runtimes'].get('openvino_cpu', 'not installed')} "
        f"({', '.join(meta['runtimes'].get('openvino_capabilities', [])) or '-'})",
        f"- Threads: {meta['threads']} for every system (torch.set_num_threads; ONNX Runtime intra_op_num_threads, "
        "one inter-op thread, its workers' spinning stopped when a call returns; OpenVINO INFERENCE_NUM_THREADS, "
        "latency hint)",
        f"- git {meta['environment']['git_commit']}"
        + (" (uncommitted changes in the tree)" if meta["environment"]["git_dirty"] else ""),
        *[f"- Skipped {name}: {reason}" for name, reason in meta["skipped"].items()],
        "",
        "## Encoder forward",
        "",
        "| config | size | batch | system | ms/img (median) | p20-p80 ms/img | vs reference fp32 | max abs error | "
        "rel. error |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        speedup = "-" if row["speedup_vs_reference"] is None else f"{row['speedup_vs_reference']:.2f}x"
        lines.append(
            f"| {row['config']} | {row['image_size']} | {row['batch']} | {row['system']} | "
            f"{row['median_ms_per_image']:.1f} | {row['p20_ms_per_image']:.1f}-{row['p80_ms_per_image']:.1f} | "
            f"{speedup} | {row['max_abs_error']:.1e} | {row['rel_error']:.1e} |"
        )
    lines += [
        "",
        "## Export, conversion, compilation",
        "",
        "| config | size | batch | system | runs in | ONNX export s | OpenVINO convert s | compile s | "
        "first call s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['config']} | {row['image_size']} | {row['batch']} | {row['system']} | {row['runs_in']} | "
            f"{_seconds(row['export_s'])} | {_seconds(row['convert_s'])} | {_seconds(row['compile_s'])} | "
            f"{row['first_call_s']:.2f} |"
        )
    onnx = next((row["onnx"] for row in rows if row.get("onnx")), None)
    lines += [
        "",
        "## How to read this",
        "",
        "- Times are medians over interleaved rounds (the systems' order rotates every round), with the 20th-80th "
        "percentiles; ms/img divides by the batch. `vs reference fp32` is a ratio of medians of this same run.",
        "- Systems: " + "; ".join(f"`{system.name}`: {system.description}" for system in SYSTEMS) + ".",
        "- The ONNX file is exported once per (config, size, batch) with static shapes"
        + (f" ({onnx['exporter']}, opset {onnx['opset']}, {onnx['onnx_nodes']} nodes)" if onnx else "")
        + "; ONNX Runtime and OpenVINO read that same file, so their rows repeat its export time, and both "
        "OpenVINO rows share one conversion. `compile s`: ONNX Runtime's session creation (its graph "
        "optimizations), OpenVINO's `compile_model`. `first call s`: the first forward after that, excluded from "
        "the timings. `runs in`: for OpenVINO, the precision its compiled model reports (a bf16 hint runs f32 on a "
        "CPU without bf16 units).",
        "- max abs error: max |output - reference fp32| over every output (`vision_features`, `vision_pos_enc.*`, "
        "`backbone_fpn.*`); rel. error: that difference over max |reference fp32| of the same output, worst over "
        "the outputs. Same seeded weights and image for every system.",
        "",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------
# Command line

def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", type=parse_list, default=("tiny",),
                        help="comma list: tiny, small, base_plus, large (default: tiny)")
    parser.add_argument("--sizes", type=functools.partial(parse_list, kind=int), default=(512,),
                        help="comma list of image sizes, multiples of 32 (default: 512)")
    parser.add_argument("--batch", type=int, default=1, help="images per forward (default: 1)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per system and case (default: 5)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help=f"threads of every system (default: torch's, here {torch.get_num_threads()})")
    parser.add_argument("--systems", default="all", help=f"comma list of {', '.join(SYSTEM_NAMES)}, or 'all'")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: bench/results)")
    args = parser.parse_args(argv)
    try:
        check_matrix(Matrix(tuple(args.configs), tuple(args.sizes), (args.batch,), ("fp32",), None))
    except (KeyError, ValueError) as error:
        parser.error(str(error))
    for name, value in (("--rounds", args.rounds), ("--threads", args.threads)):
        if value < 1:
            parser.error(f"{name} must be at least 1, got {value}")
    names = SYSTEM_NAMES if args.systems.strip() == "all" else parse_list(args.systems)
    unknown = [name for name in names if name not in SYSTEM_NAMES]
    if unknown or not names:
        parser.error(f"unknown systems {unknown} in --systems: expected some of {', '.join(SYSTEM_NAMES)} or 'all'")
    args.systems = [system for system in SYSTEMS if system.name in names]
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    skipped, systems = {}, []
    for system in args.systems:
        missing = missing_packages(system)
        if missing:
            skipped[system.name] = (f"needs {', '.join(missing)}: `{INSTALL_HINT}` "
                                    f"(or `pip install {' '.join(missing)}`)")
            print(f"bench.peers: skipping {system.name}, {skipped[system.name]}", file=sys.stderr)
        else:
            systems.append(system)
    if not systems:
        print("bench.peers: none of the requested systems can run here", file=sys.stderr)
        return 2
    started = utc_now()
    cases = [(config, size) for config in args.configs for size in args.sizes]
    rows: List[dict] = []
    with tqdm(total=len(cases) * steps_per_case(systems, args.rounds), desc="peers", unit="step") as progress:
        for config, size in cases:
            rows += measure_case(config, size, args.batch, systems, args.rounds, args.threads, progress)
    meta = {
        "argv": list(argv if argv is not None else sys.argv[1:]), "started": started, "finished": utc_now(),
        "rounds": args.rounds, "threads": args.threads, "device_name": device_name(DEVICE),
        "systems": [system.name for system in systems], "skipped": skipped, "packages": package_versions(),
        "runtimes": runtime_details(), "environment": environment(DEVICE),
    }
    write_rows_and_markdown(str(args.out), "peers", DEVICE, meta, rows, markdown(rows, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
