"""The op specs (sam2_fast.ops.specs) and what is derived from them: every op has a spec, each spec's fake agrees
with its op, the schemas of the derived custom ops and triton_ops are the ones compiled and exported artifacts
name, and every extension op has a spec with its argument names. The triton_ops are also built here under a
throwaway namespace with the torch references as launchers, so that their definitions run on every machine, not
only where a GPU and triton are present. opcheck of the custom ops: test_ops_torch.py (driven by the same specs)."""

import math

import pytest
import torch

from sam2_fast import ops
from sam2_fast.backends import extension as _extension
from sam2_fast.backends import torch_ops
from sam2_fast.ops import registry, specs
from sam2_fast.ops.spec import KernelSpec, OpSpec

ALL_SPECS = {spec.name: spec for spec in (*specs.OP_SPECS, *specs.KERNEL_SPECS)}
EXTENSION_LOADED = _extension.load_error() is None

# The schemas as compiled graphs and exported programs name them: changing one breaks those artifacts.
CUSTOM_OP_SCHEMAS = {
    "window_attention": "(Tensor qkv, Tensor? qkv_bias, SymInt num_heads, SymInt window_size, bool q_pool, "
    "bool add_bias, str backend) -> Tensor",
    "global_attention": "(Tensor qkv, SymInt num_heads, bool q_pool, str backend) -> Tensor",
    "maxpool2x2": "(Tensor x, str backend) -> Tensor",
    "fpn_upsample_add": "(Tensor lateral, Tensor prev, str backend) -> Tensor",
}
TRITON_OP_SCHEMAS = {
    "triton_window_attention": "(Tensor qkv, Tensor? qkv_bias, SymInt num_heads, SymInt window_size, bool q_pool, "
    "bool add_bias) -> Tensor",
    "triton_global_attention": "(Tensor qkv, SymInt num_heads, bool q_pool) -> Tensor",
    "triton_maxpool2x2": "(Tensor x) -> Tensor",
    "triton_fpn_upsample_add": "(Tensor lateral, Tensor prev) -> Tensor",
    "triton_attention_backward": "(Tensor grad_out, Tensor qkv, Tensor? qkv_bias, Tensor out, SymInt num_heads, "
    "SymInt window_size, bool q_pool, bool add_bias) -> (Tensor, Tensor)",
    "triton_maxpool2x2_backward": "(Tensor grad_out, Tensor x) -> Tensor",
    "triton_fpn_upsample_add_backward": "(Tensor grad, Tensor prev) -> Tensor",
}


def _randn(*shape, seed: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _attention_backward_args():
    qkv, bias = _randn(1, 5, 7, 3 * 2 * 3, seed=3), _randn(3 * 2 * 3, seed=4)
    out = torch_ops.window_attention(qkv, bias, 2, 4, True)
    return _randn(*out.shape, seed=5), qkv, bias, out, 2, 4, True, False


# Arguments of each spec's op on odd shapes (mixed dtypes where the op promotes).
SAMPLES = {
    "window_attention": lambda: (_randn(1, 5, 7, 3 * 2 * 3, seed=0), _randn(3 * 2 * 3, seed=1), 2, 4, True, True),
    "global_attention": lambda: (_randn(2, 5, 3, 3 * 2 * 4, seed=2), 2, True),
    "maxpool2x2": lambda: (_randn(2, 5, 7, 3, seed=6, dtype=torch.bfloat16),),
    "fpn_upsample_add": lambda: (_randn(1, 3, 6, 4, seed=7, dtype=torch.bfloat16), _randn(1, 3, 3, 2, seed=8)),
    "bias_gelu_": lambda: (_randn(2, 3, 5, seed=9), _randn(5, seed=10)),
    "sine_position_encoding": lambda: (5, 7, 4, 10000.0, True, 2 * math.pi, torch.device("cpu")),
    "attention_backward": _attention_backward_args,
    "maxpool2x2_backward": lambda: (_randn(2, 2, 3, 3, seed=11), _randn(2, 5, 7, 3, seed=12)),
    "fpn_upsample_add_backward": lambda: (_randn(1, 3, 6, 4, seed=13), _randn(1, 3, 3, 2, seed=14,
                                                                            dtype=torch.bfloat16)),
    "linear": lambda: (_randn(5, 7, seed=15), _randn(3, 7, seed=16), _randn(3, seed=17)),
    "linear_weight_grad": lambda: (_randn(5, 3, seed=18), _randn(5, 7, seed=19), True),
}


def _fpn_upsample_add_backward(grad, prev):
    """prev's part of the FPN fusion's exact gradient, as the spec's formula gives it."""
    return specs.FPN_UPSAMPLE_ADD.backward.formula(grad, (grad, prev), None)[1]


def _truth(spec: KernelSpec):
    """What computes ``spec``'s op here: an op's reference; a kernel's extension op; the FPN backward's formula."""
    if isinstance(spec, OpSpec):
        return spec.reference
    if spec.name == "fpn_upsample_add_backward":
        return _fpn_upsample_add_backward
    if spec.extension and EXTENSION_LOADED:
        return getattr(torch.ops.sam2_fast_ext, spec.name)
    pytest.skip(f"nothing computes {spec.name} here: {_extension.load_error()}")


def test_every_op_has_a_spec_and_a_sample():
    assert ops.OPS == tuple(spec.name for spec in specs.OP_SPECS)
    assert len(ALL_SPECS) == len(specs.OP_SPECS) + len(specs.KERNEL_SPECS), "two specs share a name"
    assert set(SAMPLES) == set(ALL_SPECS)
    for spec in specs.OP_SPECS:
        assert callable(getattr(ops, spec.name)), f"no entry point ops.{spec.name}"
        if spec.backward is not None and spec.backward.kernel is not None:
            assert spec.backward.kernel in specs.KERNEL_SPECS, f"{spec.name}'s backward kernel is not in KERNEL_SPECS"


@pytest.mark.parametrize("name", list(SAMPLES))
def test_fake_agrees_with_the_op(name):
    spec = ALL_SPECS[name]
    truth = _truth(spec)
    args = SAMPLES[name]()
    fake = spec.fake(*args)
    if spec.returns == "()":
        assert fake is None
        return
    expected = truth(*args)
    fakes, expecteds = (fake, expected) if isinstance(expected, tuple) else ((fake,), (expected,))
    assert len(fakes) == len(expecteds)
    for index, (f, e) in enumerate(zip(fakes, expecteds)):
        assert (f.shape, f.dtype, f.device) == (e.shape, e.dtype, e.device), f"{name} output {index}"


@pytest.mark.skipif(not EXTENSION_LOADED, reason=_extension.load_error() or "")
def test_every_extension_op_has_a_spec_with_its_arguments():
    extension_ops = {name.split("::")[1] for name in torch._C._dispatch_get_all_op_names()
                     if name.startswith("sam2_fast_ext::")}
    assert extension_ops == {name for name, spec in ALL_SPECS.items() if spec.extension}
    for name in extension_ops:
        schema = getattr(torch.ops.sam2_fast_ext, name).default._schema
        assert tuple(argument.name for argument in schema.arguments) == ALL_SPECS[name].arg_names, name


def test_custom_op_schemas_are_unchanged():
    assert set(registry._CUSTOM_OPS) == set(CUSTOM_OP_SCHEMAS)
    for name, schema in CUSTOM_OP_SCHEMAS.items():
        assert str(getattr(torch.ops.sam2_fast, name).default._schema) == f"sam2_fast::{name}{schema}"


def test_sam2_fast_triton_op_schemas_are_unchanged():
    if not registry._TRITON_OPS:
        pytest.skip("no sam2_fast triton_ops here (triton missing or interpreted): see the throwaway namespace's test")
    assert {f"triton_{name}" for name in registry._TRITON_OPS} == set(TRITON_OP_SCHEMAS)
    for name, schema in TRITON_OP_SCHEMAS.items():
        assert str(getattr(torch.ops.sam2_fast, name).default._schema) == f"sam2_fast::{name}{schema}"


THROWAWAY = "sam2_fast_spec_test"


def _stand_in_launchers():
    """A launcher per Triton spec that computes what the kernel does in plain torch ops (or the extension)."""
    launchers = {spec.name: spec.reference for spec in specs.OP_SPECS if spec.triton}
    launchers["fpn_upsample_add_backward"] = _fpn_upsample_add_backward
    if EXTENSION_LOADED:
        launchers["attention_backward"] = torch.ops.sam2_fast_ext.attention_backward
        launchers["maxpool2x2_backward"] = torch.ops.sam2_fast_ext.maxpool2x2_backward
    return launchers


@pytest.fixture(scope="module")
def throwaway_triton_ops():
    # Defined once per process: a namespace cannot take the same op twice.
    return registry.define_triton_ops(THROWAWAY, _stand_in_launchers())


def test_triton_ops_are_defined_with_their_schemas_anywhere(throwaway_triton_ops):
    assert {f"triton_{name}" for name in throwaway_triton_ops} == set(TRITON_OP_SCHEMAS)
    namespace = getattr(torch.ops, THROWAWAY)
    for name, schema in TRITON_OP_SCHEMAS.items():
        assert str(getattr(namespace, name).default._schema) == f"{THROWAWAY}::{name}{schema}"


@pytest.mark.parametrize("name", [name.removeprefix("triton_") for name in TRITON_OP_SCHEMAS])
@pytest.mark.filterwarnings("ignore:sam2_fast. the triton backend has no backward")
def test_triton_ops_run_and_pass_opcheck_with_stand_in_launchers(throwaway_triton_ops, name, monkeypatch):
    # Triton does not run on CPU here, so their gradient is the recompute fallback, which warns once per op.
    monkeypatch.setattr(registry, "_warned_recomputes", set())
    launchers = _stand_in_launchers()
    if name not in launchers:
        pytest.skip(f"no stand-in for the {name} kernel here: {_extension.load_error()}")
    spec = ALL_SPECS[name]
    args = SAMPLES[name]()
    if isinstance(spec, OpSpec):
        args = tuple(arg.requires_grad_(True) if i in spec.differentiable_positions and arg.is_floating_point()
                     else arg for i, arg in enumerate(args))
    op = getattr(getattr(torch.ops, THROWAWAY), f"triton_{name}").default
    # The autograd formula is tested on the real ops (test_backward_ops.py, the Triton backward tests); here the
    # registration, the schema and the fake (the launcher run on fake tensors, as triton_op derives it).
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_a_schema_torch_would_not_infer_fails_at_definition(monkeypatch):
    spec = KernelSpec(name="bad", schema="(Tensor x, int n) -> Tensor", fake=lambda x, n: x)
    with pytest.raises(ValueError, match=r"bad: no Python annotation gives the schema types \['int'\]"):
        registry.typed(spec, lambda x, n: x)
    # Should a torch release infer another schema from the same annotations, the definition says so.
    spec = KernelSpec(name="drifted", schema="(Tensor x, SymInt n) -> Tensor", fake=lambda x, n: x)
    monkeypatch.setattr(torch.library, "infer_schema", lambda fn, mutates_args: "(Tensor x, int n) -> Tensor")
    with pytest.raises(RuntimeError, match=r"drifted: torch infers the schema \(Tensor x, int n\) -> Tensor"):
        registry.typed(spec, lambda x, n: x)
