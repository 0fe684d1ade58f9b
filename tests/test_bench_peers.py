"""``python -m bench.peers`` end to end at a small size: every system runs, its times are finite and its outputs
match the fp32 reference (tiny config, 64x64, one round; about 20 s on 2 cores, most of it the ONNX export)."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ is a package at the repo root

from bench import peers  # noqa: E402

# fp32 systems compute what the reference computes, in another summation order (other GEMM blockings, fused
# kernels): about 1e-6 of the output's scale over tiny's 12 blocks. 1e-4 leaves 100x headroom, while an export
# that changes an op's meaning (padding, interpolation, a dropped output) errs by 1e-1 or more.
FP32_REL_TOLERANCE = 1e-4
# bf16 keeps 8 significant bits (a rounding of 2^-9 = 2e-3 per value), compounded over the blocks: sam2_fast's bf16
# and the reference's own bf16 err by about 1e-2 at the output's scale, OpenVINO's bf16 by about 4e-2 (it keeps
# more intermediate results in bf16). 0.1 still fails a broken graph, whose errors are of the output's order.
BF16_REL_TOLERANCE = 0.1
# Quick to export and run, and stage 3's 14x14 windows still pad its 4x4 map (the export keeps that padding).
SIZE = 64


def test_cli_rejects_unknown_systems_and_bad_sizes():
    with pytest.raises(SystemExit):
        peers.parse_args(["--systems", "reference,tensorrt"])
    with pytest.raises(SystemExit):
        peers.parse_args(["--sizes", "100"])
    args = peers.parse_args(["--systems", "reference,onnxruntime"])
    assert [system.name for system in args.systems] == ["reference", "onnxruntime"]


def test_peers_end_to_end(tmp_path):
    missing = sorted({name for system in peers.SYSTEMS for name in peers.missing_packages(system)})
    if missing:
        pytest.skip(f"the peer runtimes are not installed (missing {', '.join(missing)}): {peers.INSTALL_HINT}")
    threads = torch.get_num_threads()  # what the process already uses: the tool sets it for every system
    assert peers.main(["--configs", "tiny", "--sizes", str(SIZE), "--rounds", "1", "--threads", str(threads),
                       "--out", str(tmp_path)]) == 0
    (json_path,) = tmp_path.glob("peers-*.json")
    text = json_path.with_suffix(".md").read_text()
    results = json.loads(json_path.read_text())
    rows = {row["system"]: row for row in results["rows"]}
    assert list(rows) == list(peers.SYSTEM_NAMES)
    assert results["meta"]["threads"] == threads and not results["meta"]["skipped"]
    for name, row in rows.items():
        assert f"| tiny | {SIZE} | 1 | {name} |" in text
        assert len(row["samples_s"]) == 1 and math.isfinite(row["median_s"]) and row["median_s"] > 0
        tolerance = BF16_REL_TOLERANCE if "bf16" in row["runs_in"] else FP32_REL_TOLERANCE
        assert row["rel_error"] <= tolerance, f"{name}: rel. error {row['rel_error']:.2e} > {tolerance:.0e}"
    assert rows["reference"]["rel_error"] == 0.0 and rows["reference"]["speedup_vs_reference"] == 1.0
    for name in ("onnxruntime", "openvino-f32", "openvino-bf16"):
        assert rows[name]["export_s"] > 0 and rows[name]["compile_s"] > 0
    assert rows["openvino-f32"]["convert_s"] > 0 and rows["openvino-f32"]["runs_in"] == "f32"


def test_missing_runtime_is_skipped_with_what_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(peers, "missing_packages", lambda system: ["openvino"] if system.runtime == "openvino" else [])
    assert peers.main(["--configs", "tiny", "--sizes", "32", "--rounds", "1", "--threads", str(torch.get_num_threads()),
                       "--systems", "reference,openvino-f32", "--out", str(tmp_path)]) == 0
    assert "skipping openvino-f32, needs openvino: `pip install .[peers]`" in capsys.readouterr().err
    (json_path,) = tmp_path.glob("peers-*.json")
    results = json.loads(json_path.read_text())
    assert [row["system"] for row in results["rows"]] == ["reference"]
    assert "pip install .[peers]" in results["meta"]["skipped"]["openvino-f32"]
    assert "Skipped openvino-f32" in json_path.with_suffix(".md").read_text()
    assert peers.main(["--systems", "openvino-bf16", "--out", str(tmp_path)]) == 2
