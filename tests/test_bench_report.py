"""The benchmark report's own code, on fake timings: CLI parsing, the matrix, tables, JSON and the plot.

No benchmarking happens here; these run in a few seconds.
"""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ is a package at the repo root

from bench import matrix as bench_matrix  # noqa: E402
from bench import report  # noqa: E402
from bench import measure  # noqa: E402
from bench.measure import device_name, device_slug, environment, summarize, utc_now  # noqa: E402


def _encoder_rows(impl_samples, dtype="fp32", batch=2):
    rows = []
    for impl, samples in impl_samples.items():
        row = {"kind": "encoder", "config": "tiny", "image_size": 512, "batch": batch, "dtype": dtype, "impl": impl,
               "backends": None, "first_call_s": 1.5, "iterations_per_sample": 1, "rel_error": 1e-6,
               "rel_error_output": "backbone_fpn[2]", "peak_memory_bytes": 64 * 2**20, "memory_method": "fake"}
        row.update(measure.timing_fields(samples, batch))
        row["images_per_s"] = batch / row["median_s"]
        rows.append(row)
    report._add_speedups(rows)
    return rows


def _op_row(impl, seconds, flops=None, bytes_moved=None):
    peaks = {"flops": {"fp32": 1e12}, "bandwidth": None}
    case = type("Case", (), {"flops": flops, "bytes_moved": bytes_moved})
    row = {"kind": "op", "config": "tiny", "image_size": 512, "batch": 1, "op": "maxpool2x2", "site": "stage2",
           "shape": "x 1x128x128x192", "dtype": "fp32", "impl": impl, "first_call_s": 0.01, "rel_error": 0.0}
    row.update(measure.timing_fields([seconds] * 3, 1))
    row.update(report._op_roofline(case, torch.float32, row["median_s"], peaks))
    return row


def _fake_results():
    meta = environment(torch.device("cpu"))
    meta.update(started=utc_now(), finished=utc_now(), rounds=3, argv=["--repeats", "3"],
                auto_backends={"window_attention": "extension"}, backend_status={}, memory_method="fake method")
    encoder = _encoder_rows({"reference": [0.4, 0.5, 0.6], "reference+compile": [0.5] * 3, "extension": [0.2] * 3})
    encoder += _encoder_rows({"reference": [0.3] * 3, "extension": [0.1] * 3}, dtype="bf16-autocast")
    ops = [_op_row("reference", 2e-3, bytes_moved=4e6), _op_row("extension", 1e-3, bytes_moved=4e6)]
    ops[-1]["rel_error"] = 0.0
    report._add_speedups(ops)
    rooflines = {"source": "fake", "flops": {"fp32": 1e12}, "bandwidth": None}
    return {"meta": meta, "matrix": {}, "rooflines": rooflines, "encoder": encoder, "ops": ops}


def test_cli_defaults_and_overrides():
    args = report.parse_args([])
    assert args.ops == report.BENCH_OPS and args.repeats is None and not args.no_memory
    cpu_default = report.matrix_from_args(args, "cpu")
    assert cpu_default.configs == ("tiny",) and cpu_default.sizes == (512,) and cpu_default.batches == (1,)
    assert cpu_default.dtypes == ("fp32", "bf16-autocast")
    assert all(not bench_matrix.Impl(name).compiled for name in cpu_default.impls)

    args = report.parse_args(["--configs", "tiny,large", "--sizes", "256, 1024", "--batches", "1,8", "--dtypes",
                              "fp32,bf16", "--impls", "reference,torch+compile", "--repeats", "3", "--out", "x",
                              "--ops", "maxpool2x2", "--no-memory"])
    matrix = report.matrix_from_args(args, "cpu")
    assert matrix.configs == ("tiny", "large") and matrix.sizes == (256, 1024) and matrix.batches == (1, 8)
    assert matrix.dtypes == ("fp32", "bf16") and matrix.impls == ("reference", "torch+compile")
    assert args.repeats == 3 and args.out == Path("x") and args.ops == ("maxpool2x2",) and args.no_memory
    assert report.matrix_from_args(report.parse_args(["--impls", "all"]), "cpu").impls is None
    assert report.parse_args(["--ops", "none"]).ops == ()


def test_compile_mode_defaults_and_override(monkeypatch):
    from bench import workloads

    monkeypatch.delenv(workloads.COMPILE_MODE_ENV_VAR, raising=False)
    assert workloads.compile_mode("cuda") == "max-autotune" and workloads.compile_mode("cpu") == "default"
    assert report.parse_args(["--compile-mode", "default"]).compile_mode == "default"
    monkeypatch.setenv(workloads.COMPILE_MODE_ENV_VAR, "reduce-overhead")
    assert workloads.compile_mode("cuda") == "reduce-overhead"
    monkeypatch.setenv(workloads.COMPILE_MODE_ENV_VAR, "fastest")
    with pytest.raises(ValueError, match="SAM2_FAST_BENCH_COMPILE_MODE='fastest': expected one of default"):
        workloads.compile_mode("cpu")


@pytest.mark.parametrize("argv", [["--repeats", "0"], ["--ops", "conv"], ["--sizes", "x"], ["--compile-mode", "x"]])
def test_cli_rejects_bad_arguments(argv):
    with pytest.raises(SystemExit):
        report.matrix_from_args(report.parse_args(argv), "cpu")


@pytest.mark.parametrize("field, value, message", [
    ("--sizes", "100", "multiples of 32"), ("--dtypes", "fp16", "unknown dtype"),
    ("--impls", "reference+jit", "unknown implementation"), ("--configs", "huge", "unknown SAM-2 encoder config"),
])
def test_matrix_errors_name_what_was_expected(field, value, message):
    with pytest.raises((ValueError, KeyError), match=message):
        report.matrix_from_args(report.parse_args([field, value]), "cpu")


def test_matrix_from_env_widens_and_overrides():
    full = bench_matrix.matrix_from_env("cpu", {"SAM2_FAST_BENCH_FULL": "1"})
    assert set(full.configs) == {"tiny", "small", "base_plus", "large"} and full.impls is None
    gpu = bench_matrix.matrix_from_env("cuda", {"SAM2_FAST_BENCH_BATCHES": "4"})
    assert gpu.configs == ("base_plus",) and gpu.sizes == (1024,) and gpu.batches == (4,)
    assert gpu.dtypes == ("bf16-autocast",)


def test_impl_names():
    impl = bench_matrix.Impl("extension+compile")
    assert impl.compiled and impl.backend == "extension" and not impl.is_reference
    assert bench_matrix.Impl("reference").backend is None
    assert "reference" in [i.name for i in bench_matrix.encoder_impls(None, "cpu")]
    assert bench_matrix.op_impls("maxpool2x2", ["reference", "torch"], "cpu") == [
        bench_matrix.Impl("reference"), bench_matrix.Impl("torch")]


def test_auto_asked_for_by_name_runs():
    # Where auto resolves to a single backend it is left out of the default run, but asked for by name it runs.
    bench_matrix.check_impls(["auto", "auto+compile"], "cpu")
    names = [i.name for i in bench_matrix.encoder_impls(["reference", "auto"], "cpu")]
    assert names == ["reference", "auto"]


def test_summary_and_speedups():
    assert summarize([1.0, 2.0, 3.0, 4.0, 5.0]) == {"median": 3.0, "p20": 1.8, "p80": 4.2}
    rows = _encoder_rows({"reference": [0.4, 0.5, 0.6], "reference+compile": [0.25] * 3, "torch": [0.25] * 3})
    by_impl = {row["impl"]: row for row in rows}
    assert by_impl["torch"]["speedup_vs_reference"] == pytest.approx(2.0)
    assert by_impl["torch"]["speedup_vs_reference_compiled"] == pytest.approx(1.0)
    assert by_impl["torch"]["median_ms_per_image"] == pytest.approx(125.0)
    assert by_impl["torch"]["images_per_s"] == pytest.approx(8.0)
    no_compiled = _encoder_rows({"reference": [0.5], "torch": [0.25]})
    assert no_compiled[1]["speedup_vs_reference_compiled"] is None


def test_tables_have_every_column():
    results = _fake_results()
    markdown = report.render_markdown(results)
    for column in report.ENCODER_COLUMNS + report.OP_COLUMNS:
        assert f" {column} |" in markdown
    encoder_lines = [line for line in markdown.splitlines() if line.startswith("| tiny |")]
    assert len(encoder_lines) == len(results["encoder"])
    assert all(line.count("|") == len(report.ENCODER_COLUMNS) + 1 for line in encoder_lines)
    assert "| 2.50x |" in markdown  # reference 0.5 s vs extension 0.2 s, medians
    assert "unknown" in markdown  # no bandwidth peak in the fake roofline
    assert results["meta"]["device_name"] in markdown


def test_write_results_writes_markdown_json_and_png(tmp_path):
    results = _fake_results()
    paths = report.write_results(results, tmp_path)
    assert paths["md"].name == results["meta"]["device_slug"] + ".md"
    loaded = json.loads(paths["json"].read_text())
    for key in ("torch", "triton", "device_name", "cpu_model", "cpu_family_model", "cpu_units",
                "extension_bf16_attention", "torch_threads", "git_commit", "started", "finished"):
        assert key in loaded["meta"]
    assert loaded["encoder"][0]["samples_s"] == [0.4, 0.5, 0.6]
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("kernel,category", [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_kernel",
     "GEMM (linear)"),
    ("nvjet_hsh_128x256_64x4_2x1_v_bz_coopA_NNT", "GEMM (linear)"),
    ("void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_16x16_128x2_tn_align8>", "GEMM (linear)"),
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x64x64", "convolution"),
    ("_window_attention_kernel", "attention"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4>, false>", "attention"),
    ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<float, float, false>", "LayerNorm"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl(at::TensorIteratorBase&)>",
     "elementwise (add, GELU)"),
    ("void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)>",
     "copies and dtype casts (partition, permute, bias broadcast, pad)"),
    ("Memcpy DtoD (Device -> Device)", "copies and dtype casts (partition, permute, bias broadcast, pad)"),
    ("void at::native::max_pool_forward_nhwc<c10::BFloat16, float>", "max-pool"),
    ("void at::native::upsample_nearest2d_nhwc_out_frame<float>", "FPN upsample + add"),
    ("triton_per_fused_add_native_layer_norm_3", "inductor fused kernels"),
    ("some_unknown_kernel", "other kernels"),
])
def test_cuda_profile_categories(kernel, category):
    from bench.profile import cuda_kernel_category

    assert cuda_kernel_category(kernel) == category


def test_cuda_profile_idle_time_is_wall_less_kernels():
    from bench.profile import GPU_IDLE, categorized_cuda_ms

    columns = categorized_cuda_ms([("nvjet_gemm", 3000.0), ("_window_attention_kernel", 1000.0)], forwards=2,
                                  wall_ms=5.0)
    assert columns == {"GEMM (linear)": 1.5, "attention": 0.5, GPU_IDLE: 3.0}


def test_cpu_results_name_the_cpu_and_its_units():
    # Machines of one model name differ in their bf16 units (an AVX2-only and an AVX512-BF16 AMD EPYC): the file
    # name and the header say which one measured.
    from sam2_fast.backends import precision

    cpu = torch.device("cpu")
    meta = environment(cpu)
    label = precision.cpu_units_label()
    assert label in device_name(cpu) and measure.slugify(label) in device_slug(cpu)
    assert set(meta["cpu_units"]) == set(precision.CPU_UNITS)
    assert meta["cpu_units"]["avx512_bf16"] == torch.cpu._is_avx512_bf16_supported()
    header = measure.cpu_line(meta)
    assert meta["cpu_model"] in header and str(meta["extension_bf16_attention"]) in header
