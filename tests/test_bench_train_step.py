"""The training-step benchmark's own code: the tensor-memory counter on a known allocation pattern, and the table."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ is a package at the repo root

from bench import train_step  # noqa: E402
from sam2_fast.testing.tensor_memory import peak_tensor_bytes  # noqa: E402

MIB = 2**20


def test_peak_tensor_bytes_counts_live_tensors_only():
    weight = torch.ones(MIB // 4)  # existed before: not counted, nor are its views

    def work():
        a, b = torch.zeros(MIB // 4), torch.zeros(MIB // 4)  # 2 MiB live
        view = weight.view(-1, 4).t()  # a view allocates nothing
        del a
        c = torch.zeros(2 * MIB // 4)  # 1 + 2 MiB live: the peak
        c.add_(1)  # in place: nothing new
        del b, c
        return torch.zeros(16) + view.sum()

    peak, result = peak_tensor_bytes(work)
    assert peak == 3 * MIB
    assert result.shape == (16,)


def test_markdown_table_has_one_row_per_impl_with_ratios():
    stats = {"median": 2.0, "p20": 1.9, "p80": 2.1}
    rows = [
        {"config": "tiny", "size": 512, "batch": 2, "dtype": "fp32", "impl": impl, "s_per_step": dict(stats),
         "peak_bytes": peak, "speedup_vs_reference": speedup, "memory_vs_reference": memory}
        for impl, peak, speedup, memory in (("reference", 100 * MIB, 1.0, 1.0), ("sam2_fast", 50 * MIB, 1.25, 0.5))
    ]
    meta = {"device_name": "a CPU", "argv": "--configs tiny", "repeats": 3, "memory_method": "live tensors",
            "active_backward": {"window_attention": "extension kernel"}, "environment": {"torch": "2.13.0"}}
    text = train_step.markdown(rows, meta)
    assert "| tiny | 512 | 2 | fp32 | sam2_fast | 2.000 | 1.900-2.100 | 1.25x | 50 | 0.50x |" in text
    assert "window_attention extension kernel" in text and "a CPU" in text


def test_measure_case_runs_every_impl_and_counts_its_steps():
    import io

    from tqdm import tqdm

    impls, repeats = list(train_step.IMPLS), 1
    with tqdm(total=train_step.steps_per_case(len(impls), repeats), file=io.StringIO()) as progress:
        rows = train_step.measure_case("tiny", 64, 1, "fp32", impls, repeats, torch.device("cpu"), progress)
        assert progress.n == progress.total
    assert [row["impl"] for row in rows] == impls
    reference, fast, checkpointed = rows
    assert reference["speedup_vs_reference"] == 1.0 and reference["memory_vs_reference"] == 1.0
    assert all(row["peak_bytes"] > 0 and len(row["samples_s"]) == repeats for row in rows)
    # Checkpointing keeps only each block's input: less live memory than the same encoder without it.
    assert checkpointed["peak_bytes"] < fast["peak_bytes"]
