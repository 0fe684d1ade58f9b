"""The pytest-benchmark suite: ``pytest bench/`` (the repo's testpaths only cover tests/, so name the folder).

The matrix is ``bench.matrix.matrix_from_env``: small by default (CPU: tiny 512, batch 1, fp32 and bf16 autocast,
eager implementations; CUDA: base_plus 1024, batch 1 and 8, bf16 autocast, all implementations),
``SAM2_FAST_BENCH_FULL=1`` widens it, ``SAM2_FAST_BENCH_{CONFIGS,SIZES,BATCHES,DTYPES,IMPLS}`` set one axis and
``SAM2_FAST_BENCH_ROUNDS`` the timed rounds. Warm-up and compilation run before timing and are recorded in each
benchmark's ``extra_info`` (``first_call_s``), with the error against the reference in fp32.
"""

from __future__ import annotations

import os
from typing import Dict, Tuple

import pytest
import torch

from bench import matrix as bench_matrix
from bench.workloads import EncoderSet, build_encoder, feature_outputs, op_cases, seeded_image, short_name

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ROUNDS = int(os.environ.get("SAM2_FAST_BENCH_ROUNDS", {"cpu": 5, "cuda": 20}[DEVICE.type]))
OP_SITES = {"window_attention": 3, "global_attention": 1, "maxpool2x2": 1, "fpn_upsample_add": 1}


def _encoder_params(matrix):
    impls = bench_matrix.encoder_impls(matrix.impls, DEVICE.type)
    for config in matrix.configs:
        for dtype in matrix.dtypes:
            for size in matrix.sizes:
                for batch in matrix.batches:
                    for impl in impls:
                        yield pytest.param(
                            (config, size, batch, dtype, impl),
                            id=f"{short_name(config)}-{size}-b{batch}-{dtype}-{impl.name}",
                        )


def _op_params(matrix):
    op_dtypes = dict.fromkeys(bench_matrix.torch_dtype(d) for d in matrix.dtypes)
    for config in matrix.configs:
        for size in matrix.sizes:
            for batch in matrix.batches:
                for dtype in op_dtypes:
                    for op, sites in OP_SITES.items():
                        for site in range(sites):
                            for impl in bench_matrix.op_impls(op, matrix.impls, DEVICE.type):
                                label = "fp32" if dtype == torch.float32 else "bf16"
                                yield pytest.param(
                                    (config, size, batch, dtype, op, site, impl),
                                    id=f"{op}{site}-{short_name(config)}-{size}-b{batch}-{label}-{impl.name}",
                                )


def pytest_generate_tests(metafunc):
    if "encoder_case" in metafunc.fixturenames or "op_case" in metafunc.fixturenames:
        matrix = bench_matrix.matrix_from_env(DEVICE.type)
    if "encoder_case" in metafunc.fixturenames:
        metafunc.parametrize("encoder_case", list(_encoder_params(matrix)))
    if "op_case" in metafunc.fixturenames:
        metafunc.parametrize("op_case", list(_op_params(matrix)))


class Workbench:
    """Models, images and fp32 reference outputs shared by the benchmarks; one encoder set kept at a time (the
    parameters come ordered by config and dtype)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._encoders: Dict[Tuple, EncoderSet] = {}
        self._expected: Dict[Tuple, list] = {}
        self._op_cases: Dict[Tuple, list] = {}

    def encoders(self, config: str, dtype: str) -> EncoderSet:
        key = (config, dtype)
        if key not in self._encoders:
            self._encoders.clear()
            torch._dynamo.reset()
            self._encoders[key] = EncoderSet(config, dtype, self.device)
        return self._encoders[key]

    def image(self, batch: int, size: int) -> torch.Tensor:
        return seeded_image(batch, size, self.device)

    def expected(self, config: str, size: int, batch: int) -> list:
        """The reference encoder's fp32 outputs on the shared image."""
        key = (config, size, batch)
        if key not in self._expected:
            reference = build_encoder(config, reference=True, dtype="fp32", device=self.device)
            with torch.no_grad():
                self._expected = {key: feature_outputs(reference(self.image(batch, size)))}
        return self._expected[key]

    def op_case(self, config: str, size: int, batch: int, dtype: torch.dtype, op: str, site: int):
        key = (config, size, batch, dtype)
        if key not in self._op_cases:
            self._op_cases = {key: op_cases(config, size, batch, dtype, self.device)}
        return [case for case in self._op_cases[key] if case.op == op][site]


@pytest.fixture(scope="session")
def workbench() -> Workbench:
    return Workbench(DEVICE)


@pytest.fixture(scope="session")
def device() -> torch.device:
    return DEVICE


@pytest.fixture(scope="session")
def rounds() -> int:
    return ROUNDS
