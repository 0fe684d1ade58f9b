"""Command line: ``sam2-fast info`` (backends), ``sam2-fast encode`` (a few images, timed, optionally checked
against the sam2 package) and ``sam2-fast embed`` (many images to embedding files, see :mod:`sam2_fast.embed`).

    sam2-fast encode photo.jpg --config sam2.1_hiera_base_plus --checkpoint sam2.1_hiera_base_plus.pt --out emb.pt
    sam2-fast encode --compare-reference          # a generated sample image, checked against the sam2 package
    sam2-fast embed photos/ --checkpoint sam2.1_hiera_base_plus.pt --config sam2.1_hiera_base_plus --out emb/
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from typing import List, Optional

import torch

from ..gemm import cpu_gemm
from . import embed
from .. import ops
from ..model.build import build_image_encoder
from ..io.checkpoint import CheckpointError
from ..io.configs import CONFIGS, DEFAULT_CONFIG
from .embed import DTYPES
from ..io.images import ImageError, load_image, normalize


def sample_image(size: int) -> torch.Tensor:
    """A deterministic synthetic RGB image in [0, 1], (3, size, size): smooth gradients plus a few shapes."""
    coords = torch.linspace(0, 1, size)
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    disc = ((x - 0.35) ** 2 + (y - 0.4) ** 2 < 0.04).float()
    square = ((x - 0.7).abs() < 0.12) & ((y - 0.65).abs() < 0.12)
    image = torch.stack((0.6 * x + 0.4 * disc, 0.5 * y + 0.5 * square.float(), 0.3 + 0.4 * x * y))
    return image.clamp(0, 1)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _max_relative_difference(ours: dict, reference: dict) -> List[str]:
    lines = []
    for key in ("vision_features",):
        lines.append((key, ours[key], reference[key]))
    lines += [(f"backbone_fpn[{i}]", a, b) for i, (a, b) in enumerate(zip(ours["backbone_fpn"], reference["backbone_fpn"]))]
    lines += [(f"vision_pos_enc[{i}]", a, b) for i, (a, b) in enumerate(zip(ours["vision_pos_enc"], reference["vision_pos_enc"]))]
    report = []
    for name, a, b in lines:
        error = (a.double() - b.double()).abs().max().item()
        scale = b.double().abs().max().item()
        report.append(f"  {name:<18} max |ours - sam2| = {error:.3g}  (output magnitude {scale:.3g})")
    return report


def command_info(args: argparse.Namespace) -> int:
    from .._version import __version__

    device_type = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"sam2_fast {__version__}, torch {torch.__version__}, device type {device_type}")
    print(f"backend asked for: {ops.get_backend()} (set with {ops.BACKEND_ENV_VAR} or sam2_fast.use_backend)")
    for backend, per_op in ops.backend_status(device_type).items():
        print(f"{backend}:")
        for op, status in per_op.items():
            print(f"  {op:<24} {status}")
    print(f"eager fp32 CPU GEMMs: {cpu_gemm.fp32_library()} (asked for: {cpu_gemm.get_fp32_library_setting()}; set "
          f"with {cpu_gemm.ENV_VAR} or sam2_fast.set_cpu_fp32_gemm)")
    training = "the extension's brgemm kernels" if cpu_gemm.brgemm_kernels() else "ATen"
    print(f"fp32 CPU training GEMMs: {training} (whatever the library above; sam2_fast.gemm.policy decides each GEMM)")
    return 0


def command_encode(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype]
    if args.backend:
        ops.set_backend(args.backend)
    # Every image is read before the encoder is built: a bad file stops the command before any work.
    inputs = [(source or "<generated sample>",
               normalize((sample_image(args.size) if source is None else load_image(source, args.size))[None]))
              for source in args.images or [None]]
    encoder = build_image_encoder(args.config, checkpoint=args.checkpoint, device=device, dtype=dtype)
    if args.compile:
        encoder = torch.compile(encoder, fullgraph=True)
    print(f"config {args.config}, {'checkpoint ' + args.checkpoint if args.checkpoint else 'random weights'}, "
          f"device {device}, dtype {args.dtype}, {args.size}x{args.size}")
    print("backends: " + ", ".join(f"{op}={backend}" for op, backend in ops.active_backends(device.type).items()))

    with torch.inference_mode():
        warmup_start = time.perf_counter()
        encoder(inputs[0][1].to(device, dtype))  # first call: caches, kernel compilation (and torch.compile if asked)
        _synchronize(device)
        print(f"warm-up (first call) {time.perf_counter() - warmup_start:.2f} s")

        results, times = [], []
        for source, pixels in tqdm(inputs, desc="encoding", unit="img", disable=len(inputs) < 2):
            batch = pixels.to(device, dtype)
            for _ in range(args.repeats):
                start = time.perf_counter()
                output = encoder(batch)
                _synchronize(device)
                times.append(time.perf_counter() - start)
            results.append((source, batch, output))

    times.sort()
    print(f"time per image: median {1000 * times[len(times) // 2]:.1f} ms over {len(times)} runs")
    name, _, output = results[0]
    print(f"outputs for {name}:")
    print(f"  vision_features     {tuple(output['vision_features'].shape)} {output['vision_features'].dtype}")
    for i, (features, pos) in enumerate(zip(output["backbone_fpn"], output["vision_pos_enc"])):
        print(f"  backbone_fpn[{i}]     {tuple(features.shape)} {features.dtype}; vision_pos_enc[{i}] {tuple(pos.shape)}")

    if args.compare_reference:
        from ..testing.reference import build_reference_encoder

        reference = build_reference_encoder(args.config).to(device)
        state = (encoder._orig_mod if args.compile else encoder).state_dict()
        reference.load_state_dict({k: v.float() for k, v in state.items()})
        with torch.inference_mode():
            expected = reference(results[0][1].float())
            actual = encoder(results[0][1])
        print("difference from the reference sam2 package (same weights, fp32 reference):")
        print("\n".join(_max_relative_difference(actual, expected)))

    if args.out:
        saved = [
            {"source": source, "vision_features": out["vision_features"].cpu(),
             "backbone_fpn": [t.cpu() for t in out["backbone_fpn"]]}
            for source, _, out in results
        ]
        torch.save(saved, args.out)
        print(f"saved {len(saved)} embeddings to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sam2-fast", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    # What the commands that read image and checkpoint files share.
    reading = argparse.ArgumentParser(add_help=False)
    reading.add_argument("--debug", action="store_true",
                         help="on a bad image or checkpoint file, show the traceback, not only the one-line error")

    info = commands.add_parser("info", help="which backends can run each op here")
    info.add_argument("--device", choices=("cpu", "cuda"))
    info.set_defaults(run=command_info)

    encode = commands.add_parser("encode", parents=[reading],
                                 help="encode images (or a generated sample) with a SAM-2 image encoder")
    encode.add_argument("images", nargs="*", help="image files; none: a generated sample image")
    encode.add_argument("--config", default=DEFAULT_CONFIG, choices=sorted(CONFIGS))
    encode.add_argument("--checkpoint", help="SAM-2 checkpoint (.pt full model or encoder state_dict, .safetensors)")
    encode.add_argument("--size", type=int, default=1024, help="square input size, a multiple of 32 (default 1024)")
    encode.add_argument("--device", help="default: cuda if available, else cpu")
    encode.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    encode.add_argument("--backend", choices=("auto",) + ops.BACKENDS)
    encode.add_argument("--compile", action="store_true", help="torch.compile(fullgraph=True) the encoder")
    encode.add_argument("--repeats", type=int, default=3, help="timed runs per image")
    encode.add_argument("--compare-reference", action="store_true", help="also run the sam2 package and print the max difference")
    encode.add_argument("--out", help="save the embeddings to this .pt file")
    encode.set_defaults(run=command_encode)

    embedding = commands.add_parser("embed", parents=[reading],
                                    help="embed many images into safetensors shards (resumable, torchrun)",
                                    description=embed.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    embed.add_arguments(embedding)
    embedding.set_defaults(run=embed.run)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run a command; an image or checkpoint file that cannot be read ends it with status 2 and one line on stderr
    naming the file and the reason (with ``--debug``, after the traceback)."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (CheckpointError, ImageError) as error:
        if args.debug:
            traceback.print_exc()
        print(f"sam2-fast {args.command}: error: {' '.join(str(error).splitlines())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
