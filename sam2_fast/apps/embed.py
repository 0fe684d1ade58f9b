"""Embed many images with SAM-2's image encoder: ``sam2-fast embed INPUT... --out DIR``.

    sam2-fast embed photos/ more.jpg list.txt --config sam2.1_hiera_base_plus \\
        --checkpoint sam2.1_hiera_base_plus.pt --out embeddings/
    python -m sam2_fast.embed ...                              # the same
    torchrun --nproc-per-node 4 -m sam2_fast.embed ...         # one process per GPU (or CPU share)

INPUTs are image files, folders (searched recursively for image files) and list files (``.txt``/``.lst``: one
path per line, relative to the list's folder). Each image is decoded with Pillow in DataLoader workers and
prepared as SAM-2 prepares it (resized to ``--image-size``, ImageNet mean/std), encoded in batches, and its
embeddings (``vision_features`` and the high-resolution ``backbone_fpn`` levels SAM-2's decoder uses; choose with
``--features``) written to safetensors shards in ``DIR/shards/``. ``DIR/index.jsonl`` has one line per image:
its path, status (``ok`` or ``error``), shard file and row, and original (height, width); an image that cannot
be read is reported there and at the end, and the others go on.

A rerun with the same DIR resumes: images already in a complete shard are skipped; a shard that a crash cut
short is found (its size does not match its header), removed and its images embedded again. Every shard is
written to a temporary file and renamed when complete, and the shards themselves are the record:
``index.jsonl`` is rewritten from them at the end of each run.

Under torchrun (``torch.distributed``: NCCL on GPUs, gloo on CPUs; multi-node with torchrun's usual
``--nnodes``/``--rdzv-endpoint`` flags, DIR on a shared filesystem), rank 0 finds what is left to do and the
ranks split it; each writes its own shards and rank 0 writes the index. Finished images are skipped before the
split, so a rerun with another number of processes still embeds every image exactly once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import secrets
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .. import ops
from ..model.build import build_image_encoder
from ..io.configs import CONFIGS, DEFAULT_CONFIG
from ..io.images import ImageError, is_image_name, normalize, read_rgb, resize

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# The encoder outputs that can be stored, by their name in the shards. vision_features is also SAM-2's
# backbone_fpn[2]; backbone_fpn.0 and .1 are the high-resolution maps its mask decoder uses (stride 4 and 8).
FEATURES = ("vision_features", "backbone_fpn.0", "backbone_fpn.1")
LIST_SUFFIXES = (".txt", ".lst")
SHARD_FOLDER = "shards"
INDEX_FILE = "index.jsonl"
SHARD_METADATA_KEY = "sam2_fast_embed"


# ----------------------------------------------------------------------------------------------------------------
# Inputs

def _read_list(path: str) -> List[str]:
    """The entries of a list file: one path a line; blank lines and ``#`` comments skipped."""
    try:
        with open(path) as listing:
            lines = listing.read().splitlines()
    except UnicodeDecodeError as error:
        raise ImageError(f"image list {path}: not a text file (one image path a line)") from error
    except OSError as error:
        raise ImageError(f"image list {path}: cannot be read ({error.strerror or error})") from error
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def collect_inputs(sources: Sequence[str]) -> List[str]:
    """The image paths named by ``sources`` (files, folders, list files), absolute, each once, in order. A list
    file that cannot be read raises :class:`~sam2_fast.io.images.ImageError`; a missing or bad image is the run's
    to report."""
    paths: Dict[str, None] = {}
    for source in sources:
        if os.path.isdir(source):
            for folder, folders, files in os.walk(source):
                folders.sort()
                paths.update((os.path.abspath(os.path.join(folder, name)), None)
                             for name in sorted(files) if is_image_name(name))
        elif source.lower().endswith(LIST_SUFFIXES):
            base = os.path.dirname(os.path.abspath(source))
            paths.update((os.path.abspath(os.path.join(base, entry)), None) for entry in _read_list(source))
        else:
            # Named explicitly: tried whatever its name, and reported if it is missing or not an image.
            paths[os.path.abspath(source)] = None
    return list(paths)


class ImageFiles(torch.utils.data.Dataset):
    """Image paths -> (position, encoder input (3, S, S) or None, original (h, w) or None, error message or None)."""

    def __init__(self, paths: Sequence[str], image_size: int):
        self.paths = list(paths)
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, position: int):
        try:
            rgb = read_rgb(self.paths[position])
        except ImageError as error:  # a per-image failure: reported in the index, the run goes on
            return position, None, None, str(error)
        return position, normalize(resize(rgb, self.image_size)), tuple(rgb.shape[:2]), None


@dataclasses.dataclass
class Batch:
    positions: List[int]
    pixels: Optional[torch.Tensor]           # (B, 3, S, S) normalised, None if every image in it failed
    sizes: List[Tuple[int, int]]
    failures: List[Tuple[int, str]]


def collate(items) -> Batch:
    good = [item for item in items if item[3] is None]
    return Batch(
        positions=[item[0] for item in good],
        pixels=torch.stack([item[1] for item in good]) if good else None,
        sizes=[item[2] for item in good],
        failures=[(item[0], item[3]) for item in items if item[3] is not None],
    )


# ----------------------------------------------------------------------------------------------------------------
# Shards: safetensors files whose metadata lists their rows' paths and sizes, written under a temporary name and
# renamed when complete.

def _safetensors_torch():
    try:
        import safetensors.torch
    except ImportError as error:
        raise SystemExit("sam2-fast embed writes safetensors files: pip install safetensors") from error
    return safetensors.torch


def write_shard(path: str, tensors: Dict[str, torch.Tensor], record: dict) -> None:
    temporary = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
    _safetensors_torch().save_file({name: t.contiguous() for name, t in tensors.items()}, temporary,
                                   metadata={SHARD_METADATA_KEY: json.dumps(record)})
    os.replace(temporary, path)


def read_shard_record(path: str) -> Optional[dict]:
    """The record a complete shard carries, or None if the file was cut short. A complete safetensors file that
    is not one of ours stops the run (it is not ours to remove).

    A safetensors file is an 8-byte header length, a JSON header giving every tensor's byte range, and the data:
    complete exactly when its size is the end of the last range.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as file:
            header_length = int.from_bytes(file.read(8), "little")
            if header_length <= 0 or 8 + header_length > size:
                return None
            header = json.loads(file.read(header_length))
        data_end = max((entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"),
                       default=0)
    except (ValueError, KeyError, TypeError, IndexError):
        return None
    if 8 + header_length + data_end != size:
        return None
    try:
        return json.loads(header["__metadata__"][SHARD_METADATA_KEY])
    except (KeyError, TypeError, ValueError):
        raise SystemExit(f"{path} is a safetensors file but not a sam2-fast embed shard: move it out of "
                         f"{os.path.dirname(path)}") from None


def scan_shards(out_dir: str, remove_incomplete: bool) -> Tuple[Dict[str, dict], List[str]]:
    """(complete shards: file name -> record, incomplete ones found) in ``out_dir/shards``. With
    ``remove_incomplete``, deletes the incomplete ones and any temporary files an interrupted run left."""
    folder = os.path.join(out_dir, SHARD_FOLDER)
    complete, incomplete = {}, []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        path = os.path.join(folder, name)
        if name.startswith(".") and name.endswith(".tmp"):
            if remove_incomplete:
                os.remove(path)
            continue
        if not name.endswith(".safetensors"):
            continue
        record = read_shard_record(path)
        if record is None:
            incomplete.append(name)
            if remove_incomplete:
                os.remove(path)
        else:
            complete[name] = record
    return complete, incomplete


# ----------------------------------------------------------------------------------------------------------------
# Processes

@dataclasses.dataclass
class Processes:
    rank: int
    world_size: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def start_processes(device_name: Optional[str]) -> Processes:
    """This process's place in a torchrun job (or a job of one), with the process group started if needed."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device_type = device_name or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device_type)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world_size > 1:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    return Processes(rank=rank, world_size=world_size, device=device)


def _broadcast(processes: Processes, value):
    if not processes.distributed:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def _gather(processes: Processes, value) -> list:
    if not processes.distributed:
        return [value]
    gathered = [None] * processes.world_size
    dist.all_gather_object(gathered, value)
    return gathered


# ----------------------------------------------------------------------------------------------------------------
# The run

def settings_of(args: argparse.Namespace) -> dict:
    """What the embeddings depend on: shards made with other settings must not be mixed in one DIR."""
    return {
        "config": args.config,
        "checkpoint": os.path.abspath(args.checkpoint) if args.checkpoint else None,
        "image_size": args.image_size,
        "dtype": args.dtype,
        "features": list(args.features),
    }


def plan(args: argparse.Namespace) -> dict:
    """Rank 0's view of the work: the inputs, what is left to embed, and a new run id for shard names."""
    inputs = collect_inputs(args.inputs)
    complete, incomplete = scan_shards(args.out, remove_incomplete=True)
    settings = settings_of(args)
    for name, record in complete.items():
        if record["settings"] != settings:
            raise SystemExit(f"{args.out} holds embeddings made with other settings ({name}: {record['settings']}); "
                             f"this run's are {settings}: use another --out")
    finished = {path for record in complete.values() for path in record["paths"]}
    return {
        "inputs": inputs,
        "todo": [path for path in inputs if path not in finished],
        "skipped": sum(path in finished for path in inputs),
        "incomplete": incomplete,
        "run_id": time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3),
    }


class ShardWriter:
    """Collects embedded rows and writes a shard each time ``shard_size`` rows are waiting."""

    def __init__(self, out_dir: str, prefix: str, shard_size: int, settings: dict):
        self.folder = os.path.join(out_dir, SHARD_FOLDER)
        os.makedirs(self.folder, exist_ok=True)
        self.prefix, self.shard_size, self.settings = prefix, shard_size, settings
        self.rows: Dict[str, List[torch.Tensor]] = {}
        self.paths: List[str] = []
        self.sizes: List[Tuple[int, int]] = []
        self.shards_written = 0

    def add(self, tensors: Dict[str, torch.Tensor], paths: List[str], sizes: List[Tuple[int, int]]) -> None:
        for name, tensor in tensors.items():
            self.rows.setdefault(name, []).append(tensor)
        self.paths += paths
        self.sizes += sizes
        if len(self.paths) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self.paths:
            return
        name = f"{self.prefix}-{self.shards_written:05d}.safetensors"
        record = {"settings": self.settings, "paths": self.paths, "sizes": self.sizes}
        write_shard(os.path.join(self.folder, name), {k: torch.cat(v) for k, v in self.rows.items()}, record)
        self.rows, self.paths, self.sizes = {}, [], []
        self.shards_written += 1


def _selected_features(output: dict, features: Sequence[str]) -> Dict[str, torch.Tensor]:
    by_name = {"vision_features": output["vision_features"],
               **{f"backbone_fpn.{level}": t for level, t in enumerate(output["backbone_fpn"])}}
    return {name: by_name[name].detach().to("cpu") for name in features}


def write_index(out_dir: str, inputs: Sequence[str], failures: Dict[str, str]) -> Tuple[int, int]:
    """Rewrite ``out_dir/index.jsonl`` from the complete shards and this run's failures: this run's inputs in
    their order, then images of earlier runs' shards that were not among them. Returns (ok lines, error lines)."""
    complete, _ = scan_shards(out_dir, remove_incomplete=False)
    rows = {}
    for shard, record in complete.items():
        for row, (path, size) in enumerate(zip(record["paths"], record["sizes"])):
            rows[path] = {"path": path, "status": "ok", "shard": f"{SHARD_FOLDER}/{shard}", "row": row,
                          "original_size": list(size)}
    lines, ok, errors = [], 0, 0
    this_run = set(inputs)
    for path in list(inputs) + [path for path in rows if path not in this_run]:
        if path in rows:
            lines.append(rows[path])
            ok += 1
        elif path in failures:
            lines.append({"path": path, "status": "error", "error": failures[path]})
            errors += 1
    temporary = os.path.join(out_dir, f".{INDEX_FILE}.tmp")
    with open(temporary, "w") as index:
        index.writelines(json.dumps(line) + "\n" for line in lines)
    os.replace(temporary, os.path.join(out_dir, INDEX_FILE))
    return ok, errors


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    if args.image_size % 32:
        raise SystemExit(f"--image-size must be a multiple of 32 (the encoder's input multiple), got {args.image_size}")
    if args.backend:
        ops.set_backend(args.backend)
    processes = start_processes(args.device)
    try:
        # The checkpoint is read first: a bad one stops the run before the output folder is touched.
        encoder = build_image_encoder(args.config, checkpoint=args.checkpoint, device=processes.device,
                                      dtype=DTYPES[args.dtype])
        work = _broadcast(processes, plan(args) if processes.rank == 0 else None)
        mine = work["todo"][processes.rank::processes.world_size]
        settings = settings_of(args)
        if processes.rank == 0:
            for name in work["incomplete"]:
                print(f"removed {SHARD_FOLDER}/{name}: cut short by an interrupted run; its images are embedded again")
            print(f"{len(work['inputs'])} inputs: {work['skipped']} already embedded, {len(work['todo'])} to embed"
                  f"{f' over {processes.world_size} processes' if processes.distributed else ''}")

        if args.compile:
            encoder = torch.compile(encoder, fullgraph=True, dynamic=False)
        loader = torch.utils.data.DataLoader(
            ImageFiles(mine, args.image_size), batch_size=args.batch_size, num_workers=args.workers,
            collate_fn=collate, pin_memory=processes.device.type == "cuda",
        )
        writer = ShardWriter(args.out, f"{work['run_id']}-rank{processes.rank:03d}", args.shard_size, settings)
        failures: Dict[str, str] = {}
        start = time.perf_counter()
        progress = tqdm(total=len(mine), unit="img", desc="embedding", disable=processes.rank != 0 or not mine)
        with torch.inference_mode():
            for batch in loader:
                failures.update((mine[position], error) for position, error in batch.failures)
                if batch.pixels is not None:
                    output = encoder(batch.pixels.to(processes.device, DTYPES[args.dtype], non_blocking=True))
                    writer.add(_selected_features(output, args.features),
                               [mine[position] for position in batch.positions], batch.sizes)
                progress.update(len(batch.positions) + len(batch.failures))
        writer.flush()
        progress.close()
        elapsed = time.perf_counter() - start

        counts = _gather(processes, (len(mine) - len(failures), failures, elapsed))
        if processes.distributed:
            dist.barrier()  # every shard is renamed into place before rank 0 reads them
        if processes.rank == 0:
            all_failures = {path: error for _, rank_failures, _ in counts for path, error in rank_failures.items()}
            embedded = sum(count for count, _, _ in counts)
            wall = max(seconds for _, _, seconds in counts)
            ok, errors = write_index(args.out, work["inputs"], all_failures)
            rate = f", {embedded / wall:.2f} images/s" if wall > 0 and embedded else ""
            print(f"embedded {embedded} images in {wall:.1f} s{rate}; {ok} in the index, {errors} failed; "
                  f"index {os.path.join(args.out, INDEX_FILE)}")
            for path, error in all_failures.items():
                print(f"  failed: {path}: {error}")
    finally:
        if processes.distributed:
            dist.destroy_process_group()
    return 0


def _feature_list(text: str) -> List[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in FEATURES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {', '.join(FEATURES)}, got {text!r}")
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders, list files (.txt, .lst)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (created; reused to resume)")
    parser.add_argument("--config", default=DEFAULT_CONFIG, choices=sorted(CONFIGS))
    parser.add_argument("--checkpoint", help="SAM-2 weights: sam2 .pt, Hugging Face or timm layouts, .safetensors "
                                             "(default: random weights)")
    parser.add_argument("--image-size", type=int, default=1024, help="square model input size (SAM-2: 1024)")
    parser.add_argument("--features", type=_feature_list, default=list(FEATURES),
                        help=f"outputs to store, comma-separated (default: {','.join(FEATURES)})")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--shard-size", type=int, default=64, help="images per shard file (a shard is closed by the "
                                                                   "first batch that fills it)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes decoding images")
    parser.add_argument("--device", help="default: cuda if available (cuda:LOCAL_RANK under torchrun), else cpu")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="the encoder's weights and compute")
    parser.add_argument("--backend", choices=("auto",) + ops.BACKENDS, help="sam2_fast op backend (default: auto)")
    parser.add_argument("--compile", action="store_true", help="torch.compile(fullgraph=True) the encoder")


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m sam2_fast.embed ARGS``: ``sam2-fast embed ARGS``, with its handling of bad files."""
    from .cli import main as cli_main  # cli imports this module

    return cli_main(["embed", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
