"""One encoder forward in a fresh process, reporting how much its resident memory grew: the CPU peak-memory
number of ``bench.report`` (CPU has no allocator peak counter like ``torch.cuda.max_memory_allocated``).

Run by :func:`bench.measure.cpu_forward_peak_bytes` with ``MALLOC_MMAP_THRESHOLD_=65536``, so that glibc serves
every large buffer with mmap and returns it on free: RSS then tracks live tensors. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import gc
import json

import torch

from .matrix import DTYPES, Impl
from .measure import CPU_MEMORY_METHOD, read_proc_status_bytes, reset_peak_rss
from .workloads import EncoderSet, seeded_image


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--dtype", choices=DTYPES, required=True)
    parser.add_argument("--impl", required=True)
    args = parser.parse_args(argv)

    device = torch.device("cpu")
    impl = Impl(args.impl)
    encoders = EncoderSet(args.config, args.dtype, device)
    forward = encoders.callable(impl)
    image = encoders.input_for(seeded_image(args.batch, args.size, device))
    for _ in range(2):
        forward(image)
    gc.collect()
    baseline = read_proc_status_bytes("VmRSS")
    try:
        reset_peak_rss()
    except OSError as error:
        print(json.dumps({"peak_bytes": None, "note": f"cannot reset the peak RSS ({error})"}))
        return
    output = forward(image)
    peak = read_proc_status_bytes("VmHWM") - baseline
    del output
    print(json.dumps({"peak_bytes": peak, "baseline_rss_bytes": baseline, "note": CPU_MEMORY_METHOD}))


if __name__ == "__main__":
    main()
