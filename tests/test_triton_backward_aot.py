"""Ahead-of-time compile of the backward kernels (attention, max-pool, FPN fusion) the eight configs use, for sm_80
and sm_90, without a GPU: Triton compiles to cubin on CPU (it ships ptxas), which rejects what only a real compile
rejects (``tl.dot`` operands under 16, shared memory over the limit, ptxas errors). Compiles run in parallel worker
processes; Triton's cache makes reruns fast.

The attention backward has 138 variants (window shape x head dim x dtype x two kernels), 17 minutes of compiling on
two cores. Variants that differ only in the window size or in a head dim padded to the same block (constants of the
index arithmetic and masks), or only in fp16 against bf16 (the same tile shapes, bytes and tensor-core instruction
shapes), compile alike; so by default one variant per (kernel, fp32 or 16-bit, head-dim block, q-pooling, global) is
compiled, the one with the largest tiles (5 minutes cold with fp16 too, less without);
``SAM2_FAST_AOT_EVERY_VARIANT=1`` compiles all of them.
"""

import importlib
import os

import pytest

if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("the interpreter replaces @triton.jit kernels, which then cannot be compiled", allow_module_level=True)
triton = pytest.importorskip("triton", reason="triton is not installed: nothing to compile")
from triton_aot import MAX_SHARED_BYTES, assert_fits_shared_memory, compile_in_workers, compile_kernel  # noqa: E402

KERNEL_MODULES = (
    "sam2_fast.kernels.attention_backward", "sam2_fast.kernels.maxpool2x2_backward",
    "sam2_fast.kernels.fpn_upsample_add_backward",
)
def _compile_variant(module_name: str, variant_name: str, capability: int) -> int:
    variants = {name: rest for name, *rest in importlib.import_module(module_name).aot_variants()}
    return compile_kernel(variant_name, *variants[variant_name], capability)


EVERY_VARIANT = os.environ.get("SAM2_FAST_AOT_EVERY_VARIANT") == "1"


def _all_variants():
    for module_name in KERNEL_MODULES:
        names = [name for name, *_ in importlib.import_module(module_name).aot_variants()]
        assert len(names) == len(set(names)), f"{module_name}.aot_variants() yields duplicate names: {names}"
        yield from ((module_name, name) for name in names)


def _variants_to_compile():
    """Every variant, or one per compile class (see the module docstring): the largest tiles of each."""
    if EVERY_VARIANT:
        return list(_all_variants())
    chosen = {}
    for module_name in KERNEL_MODULES:
        for name, kernel, signature, constexprs, options in importlib.import_module(module_name).aot_variants():
            shape_constants = ("WINDOW", "HEAD_DIM")
            key = (kernel.__name__, tuple(signature.values()),
                   tuple(sorted((k, v) for k, v in constexprs.items() if k not in shape_constants)))
            if "BLOCK_M" in constexprs:  # attention: the class is the kernel, dtype width, head-dim block and kind
                key = (kernel.__name__, constexprs["DOT_IN_FP32"], constexprs["BLOCK_D"], constexprs["Q_POOL"],
                       constexprs["GLOBAL"])
            # The largest tiles; among 16-bit twins the bf16 one (the training dtype).
            size = (constexprs.get("BLOCK_M", 1) * constexprs.get("BLOCK_N", 1), name.endswith("_bf16"))
            if key not in chosen or size > chosen[key][0]:
                chosen[key] = (size, (module_name, name))
    return [variant for _, variant in chosen.values()]


def test_aot_variants_cover_the_configs():
    names = {name for _, name in _all_variants()}
    for dtype in ("fp16", "bf16", "fp32"):
        for part in ("dq", "dkdv"):
            for shape in ("w8_hd96", "w4_qpool_hd96", "w14_hd56", "w7_hd56", "w16_qpool_hd72", "w8_qpool_hd72",
                          "global_hd96", "global_hd56", "global_hd72"):
                assert f"attention_backward_{part}_{shape}_{dtype}" in names
        assert any(name.startswith(f"maxpool2x2_backward_{dtype}_") for name in names)
        assert f"fpn_upsample_add_backward_{dtype}_grad_contiguous" in names


def test_aot_compile_fits_shared_memory():
    jobs = [(module, name, capability) for module, name in _variants_to_compile()
            for capability in sorted(MAX_SHARED_BYTES)]
    shared = compile_in_workers(_compile_variant, jobs)
    assert_fits_shared_memory([name for _, name, _ in jobs], [cap for *_, cap in jobs], shared)
