"""The Triton backend as torch.compile and AOTInductor see it on CUDA, checked on any machine.

The op layer's traced calls on CUDA tensors go through ``torch.library.triton_op`` ops, which decompose into the
kernel launches themselves when traced. Here the ops run on fake CUDA tensors (no GPU needed) under the tracer
inductor uses (functionalization + make_fx), and the test checks that
- the graph holds the Triton kernel launches, not an opaque custom op, for every op with a kernel;
- each launch (kernel, constexprs, launch options, pointer dtypes) is one of the variants the ahead-of-time compile
  tests cover (``aot_variants``), so what the compiler gets is what those tests compiled;
- the launches compile for sm_80 and sm_90 with exactly the arguments the trace recorded.
"""

import importlib
import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("the interpreter replaces @triton.jit kernels, which then cannot be compiled", allow_module_level=True)
triton = pytest.importorskip("triton")

import sam2_fast  # noqa: E402
from sam2_fast import ops  # noqa: E402
from sam2_fast.ops import dispatch, registry  # noqa: E402
from triton_aot import MAX_SHARED_BYTES, assert_fits_shared_memory, compile_in_workers, compile_kernel  # noqa: E402

KERNEL_MODULES = ("window_attention", "global_attention", "maxpool2x2", "fpn_upsample_add")
TRITON_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _traced_launches(fn, *example_args):
    """The kernel launches of ``fn`` on fake CUDA tensors of the (shape, dtype) ``example_args``, traced with the
    Triton backend, as
    (kernel, {argument: value}, {launch option: value}), and the graph's call targets."""
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch._subclasses.functional_tensor import dispatch_functionalize
    from torch.fx.experimental.proxy_tensor import make_fx

    mode = FakeTensorMode()
    with mode:
        args = [torch.empty(shape, dtype=dtype, device="cuda") for shape, dtype in example_args]
        with sam2_fast.use_backend("triton"), torch.no_grad():
            graph = make_fx(dispatch_functionalize(fn))(*args).graph
    launches, targets = [], set()
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        targets.add(str(node.target))
        if "triton_kernel_wrapper" not in str(node.target):
            continue
        # Launch options (num_warps, num_stages) make wrap_triton hold the kernel in a one-config autotuner.
        wrapper = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
        config = wrapper.configs[0]
        arguments = dict(kernel_side_table.get_constant_args(node.kwargs["constant_args_idx"]))
        arguments.update({name: value.meta["val"] if hasattr(value, "meta") else value
                          for name, value in node.kwargs["kwargs"].items()})
        launches.append((wrapper.fn, arguments, {"num_warps": config.num_warps, "num_stages": config.num_stages}))
    return launches, targets


def _signature(kernel, arguments):
    """The AOT signature and constexprs of a launch with these arguments, as the JIT specializes them: tensors are
    typed pointers, integers equal to 1 constants, other integers i32, floats fp32."""
    signature, constexprs = {}, {}
    for index, name in enumerate(kernel.arg_names):
        value = arguments[name]
        if kernel.params[index].is_constexpr or (type(value) is int and value == 1):
            signature[name] = "constexpr"
            constexprs[name] = value
        elif isinstance(value, torch.Tensor):
            signature[name] = f"*{TRITON_DTYPE_NAMES[value.dtype]}"
        elif isinstance(value, int):
            signature[name] = "i32"
        else:
            signature[name] = "fp32"
    return signature, constexprs


def _launch_key(kernel, signature, constexprs, num_warps):
    """What identifies a compiled variant: kernel, constexpr values, warps and pointer dtypes."""
    pointers = tuple(sorted((name, kind) for name, kind in signature.items() if kind.startswith("*")))
    return kernel.__name__, tuple(sorted(constexprs.items())), num_warps, pointers


def _aot_variant_keys():
    keys = set()
    for module_name in KERNEL_MODULES:
        module = importlib.import_module(f"sam2_fast.kernels.{module_name}")
        for _, kernel, signature, constexprs, options in module.aot_variants():
            num_warps = options["num_warps"] if isinstance(options, dict) else options
            keys.add(_launch_key(kernel, signature, constexprs, num_warps))
    return keys


# The blocks of tiny at 1024x1024 (head dim 96) and of base_plus (56): windowed, q-pooled, global, max-pool,
# FPN fusion; each in bf16 and fp32.
def _model_calls(dtype):
    def window(qkv, bias):
        return ops.window_attention(qkv, bias, 4, 14, False)

    def window_q_pool(qkv, bias):
        return ops.window_attention(qkv, bias, 2, 8, True)

    def global_attention(qkv):
        return ops.global_attention(qkv, 8, False)

    def maxpool(x):
        return ops.maxpool2x2(x)

    def fpn(lateral, prev):
        return ops.fpn_upsample_add(lateral, prev)

    return {
        "window_w14_hd96": (window, [((1, 64, 64, 3 * 384), dtype), ((3 * 384,), dtype)]),
        "window_w8_qpool_hd96": (window_q_pool, [((1, 256, 256, 3 * 192), dtype), ((3 * 192,), dtype)]),
        "global_hd56": (global_attention, [((2, 64, 64, 3 * 448), dtype)]),
        "maxpool_c192": (maxpool, [((1, 256, 256, 192), dtype)]),
        "fpn_256": (fpn, [((1, 256, 128, 128), dtype), ((1, 256, 64, 64), dtype)]),
    }


CASES = [(label, dtype) for dtype in (torch.bfloat16, torch.float32) for label in _model_calls(dtype)]


@pytest.fixture(autouse=True)
def triton_on_fake_cuda(monkeypatch):
    if not registry._TRITON_OPS:
        pytest.skip(f"no triton_op forms here: {dispatch._TRITON_REASON or 'triton interpreted'}")
    monkeypatch.setattr(dispatch, "_triton_runs_on", lambda device_type: device_type == "cuda")


@pytest.mark.parametrize("label,dtype", CASES, ids=[f"{label}-{TRITON_DTYPE_NAMES[d]}" for label, d in CASES])
def test_traced_launches_are_the_aot_compiled_variants(label, dtype):
    fn, example_args = _model_calls(dtype)[label]
    launches, targets = _traced_launches(fn, *example_args)
    opaque = {t for t in targets if t.startswith("sam2_fast.")}
    assert not opaque, f"{label}: the graph calls opaque ops {opaque} instead of their kernels"
    assert len(launches) == 1, f"{label}: expected one kernel launch, got {len(launches)} (targets {targets})"
    kernel, arguments, options = launches[0]
    key = _launch_key(kernel, *_signature(kernel, arguments), options["num_warps"])
    assert key in _aot_variant_keys(), f"{label}: traced launch {key} is not among the AOT-compiled variants"


def _compile_traced(label: str, dtype_name: str, capability: int) -> int:
    dispatch._triton_runs_on = lambda device_type: device_type == "cuda"
    dtype = {name: d for d, name in TRITON_DTYPE_NAMES.items()}[dtype_name]
    fn, example_args = _model_calls(dtype)[label]
    ((kernel, arguments, options),) = _traced_launches(fn, *example_args)[0]
    return compile_kernel(label, kernel, *_signature(kernel, arguments), options, capability)


def test_traced_launches_compile_for_sm80_and_sm90():
    jobs = [(label, "bf16", capability) for label in _model_calls(torch.bfloat16) for capability in MAX_SHARED_BYTES]
    shared = compile_in_workers(_compile_traced, jobs)
    assert_fits_shared_memory([label for label, *_ in jobs], [cap for *_, cap in jobs], shared)
