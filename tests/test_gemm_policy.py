"""The GEMM policy (sam2_fast.gemm.policy): its decision table row by row, the facts it reads from real calls, and
what the table promises end to end (training numerics independent of the inference library; the torch backend is
plain PyTorch, GEMMs included)."""
import dataclasses
import re

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import sam2_fast
from sam2_fast.gemm import cpu_gemm, policy
from sam2_fast.gemm.policy import GemmFacts, GemmPath, choose

from helpers import seeded_state

# Eager fp32 CPU inference on a CPU with every unit, oneDNN the fp32 library: each case changes what its row needs.
BASE = GemmFacts(
    device_type="cpu", compute_dtype=torch.float32, autocast=False, operands_fp32=True, needs_grad=False,
    traced=False, plain_tensors=True, backend="auto", native_low_precision=True, onednn=True, versioned_weight=True,
    brgemm_kernels=True, fp32_library="onednn",
)
BF16_AUTOCAST = dict(compute_dtype=torch.bfloat16, autocast=True)

# (row of the table, facts changed from BASE, expected path)
CASES = [
    (1, dict(device_type="cuda"), GemmPath.ATEN),
    (1, dict(device_type="cuda", needs_grad=True), GemmPath.ATEN),
    (2, dict(backend="torch"), GemmPath.ATEN),
    (2, dict(backend="torch", needs_grad=True), GemmPath.ATEN),
    (2, dict(backend="torch", native_low_precision=False, **BF16_AUTOCAST), GemmPath.ATEN),
    (3, dict(native_low_precision=False, **BF16_AUTOCAST), GemmPath.EMULATED),
    (3, dict(native_low_precision=False, compute_dtype=torch.float16, operands_fp32=False), GemmPath.EMULATED),
    (3, dict(native_low_precision=False, traced=True, **BF16_AUTOCAST), GemmPath.EMULATED),
    (3, dict(native_low_precision=False, needs_grad=True, backend="extension", **BF16_AUTOCAST), GemmPath.EMULATED),
    (4, dict(traced=True), GemmPath.ATEN),
    (4, dict(traced=True, needs_grad=True), GemmPath.ATEN),
    (4, dict(plain_tensors=False), GemmPath.ATEN),
    (4, dict(traced=True, **BF16_AUTOCAST), GemmPath.ATEN),
    (5, dict(**BF16_AUTOCAST), GemmPath.PACKED_BF16),
    (5, dict(compute_dtype=torch.bfloat16, operands_fp32=False), GemmPath.PACKED_BF16),
    (6, dict(needs_grad=True), GemmPath.TRAINING_KERNELS),
    (6, dict(needs_grad=True, fp32_library="blas"), GemmPath.TRAINING_KERNELS),
    (6, dict(needs_grad=True, onednn=False, fp32_library="blas"), GemmPath.TRAINING_KERNELS),
    (7, dict(), GemmPath.ONEDNN_FP32),
    (7, dict(backend="extension"), GemmPath.ONEDNN_FP32),
    (8, dict(fp32_library="blas"), GemmPath.ATEN),
    (8, dict(needs_grad=True, brgemm_kernels=False), GemmPath.ATEN),
    (8, dict(needs_grad=True, **BF16_AUTOCAST), GemmPath.ATEN),
    (8, dict(onednn=False, **BF16_AUTOCAST), GemmPath.ATEN),
    (8, dict(versioned_weight=False, **BF16_AUTOCAST), GemmPath.ATEN),
    (8, dict(compute_dtype=torch.float16, operands_fp32=False), GemmPath.ATEN),
    (8, dict(autocast=True), GemmPath.ATEN),  # fp32 autocast of fp32 operands: not row 7's plain fp32
]


@pytest.mark.parametrize("row, changes, expected", CASES, ids=[f"row{r}-{i}" for i, (r, _, _) in enumerate(CASES)])
def test_decision_table_row(row, changes, expected):
    assert choose(dataclasses.replace(BASE, **changes)) is expected


def test_every_row_of_the_documented_table_is_walked():
    documented = {int(n) for n in re.findall(r"^(\d+)\s{2,}", policy.__doc__, flags=re.MULTILINE)}
    assert documented == set(range(1, 9)), documented
    assert {row for row, _, _ in CASES} == documented
    # Each row's cases end on the path the table names for that row.
    lines = policy.__doc__.splitlines()
    path_column = next(line for line in lines if line.startswith("row ")).index("path")
    table_paths = {line.split()[0]: re.match(r"``(\w+)``", line[path_column:]).group(1)
                   for line in lines if re.match(r"^\d+\s{2,}", line)}
    for row, _, expected in CASES:
        assert expected.value == table_paths[str(row)], (row, expected)


def test_facts_from_real_calls(library):
    library("onednn")
    x, weight = torch.randn(4, 8), torch.randn(16, 8)
    facts = policy.facts(x, weight)
    assert (facts.device_type, facts.compute_dtype, facts.autocast, facts.needs_grad) == ("cpu", torch.float32, False,
                                                                                         False)
    assert facts.operands_fp32 and facts.plain_tensors and not facts.traced and facts.backend == sam2_fast.get_backend()
    assert policy.facts(x, weight.requires_grad_()).needs_grad
    with torch.no_grad():
        assert not policy.facts(x, weight).needs_grad
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (policy.facts(x, weight).compute_dtype, policy.facts(x, weight).autocast) == (torch.bfloat16, True)
    with sam2_fast.use_backend("torch"):
        assert policy.facts(x, weight).backend == "torch"
    with torch.inference_mode():
        assert not policy.facts(x, torch.randn(16, 8)).versioned_weight
    library("blas")
    assert policy.facts(x, weight.detach()).fp32_library == "blas"


def test_traced_facts_do_not_ask_the_extension(monkeypatch):
    # In a trace rows 5-7 cannot be reached, and asking the extension there would break the graph.
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    monkeypatch.setattr(cpu_gemm, "brgemm_kernels", lambda: pytest.fail("asked the extension in a trace"))
    facts = policy.facts(torch.randn(4, 8), torch.randn(16, 8))
    assert facts.traced and not facts.brgemm_kernels and facts.fp32_library == "blas"
    assert choose(facts) is GemmPath.ATEN


def _encoder_gradients(model, image):
    model.zero_grad(set_to_none=True)
    out = model(image)
    sum((f.square().mean() for f in [out["vision_features"], *out["backbone_fpn"]])).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.fixture(scope="module")
def tiny():
    model = sam2_fast.build_image_encoder("sam2.1_hiera_tiny")
    model.load_state_dict(seeded_state("sam2.1_hiera_tiny"))
    return model.train()


def _image():
    return torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))


@pytest.mark.skipif(not cpu_gemm.brgemm_kernels(), reason="needs the extension and ATen's fp32 brgemm")
def test_training_numerics_do_not_depend_on_the_inference_library(tiny, library):
    grads = {}
    for name in ("onednn", "blas"):
        library(name)
        grads[name] = _encoder_gradients(tiny, _image())
    for name, grad in grads["onednn"].items():
        assert torch.equal(grad, grads["blas"][name]), name


class _OpNames(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def test_the_torch_backend_runs_plain_pytorch_gemms_included(tiny, library):
    library("onednn")
    with sam2_fast.use_backend("torch"), _OpNames() as recorded:
        _encoder_gradients(tiny, _image())
    theirs = sorted(n for n in recorded.names if n.split(".")[0] in ("sam2_fast_ext", "mkldnn", "sam2_fast"))
    assert not theirs, theirs
    assert {"aten.addmm", "aten.mm"} & recorded.names  # the GEMMs ran, on ATen
