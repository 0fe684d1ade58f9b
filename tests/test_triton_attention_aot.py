"""Ahead-of-time compile of every attention kernel variant the eight configs use, for sm_80 and sm_90.

Needs no GPU: Triton compiles to cubin on CPU (it ships ptxas), so this catches what only a real compile rejects
(``tl.dot`` operands under 16, too much shared memory, ptxas errors) on machines without a GPU. Compiles run in
parallel worker processes, one per core; Triton's cache makes reruns fast.
"""

import importlib

import pytest

triton = pytest.importorskip("triton", reason="triton is not installed: nothing to compile")
from triton_aot import MAX_SHARED_BYTES, assert_fits_shared_memory, compile_in_workers, compile_kernel  # noqa: E402

KERNEL_MODULES = ("sam2_fast.kernels.window_attention", "sam2_fast.kernels.global_attention")
def _compile_variant(module_name: str, variant_name: str, capability: int) -> int:
    variants = {name: rest for name, *rest in importlib.import_module(module_name).aot_variants()}
    return compile_kernel(variant_name, *variants[variant_name], capability)


def _all_variants():
    for module_name in KERNEL_MODULES:
        names = [name for name, *_ in importlib.import_module(module_name).aot_variants()]
        assert len(names) == len(set(names)), f"{module_name}.aot_variants() yields duplicate names: {names}"
        yield from ((module_name, name) for name in names)


def test_aot_variants_cover_the_configs():
    names = [name for _, name in _all_variants()]
    for dtype in ("fp16", "bf16", "fp32"):
        for window_variant in ("w8_hd96", "w4_qpool_hd96", "w14_hd56", "w7_hd56", "w16_qpool_hd72", "w8_qpool_hd72"):
            assert f"window_attention_{window_variant}_{dtype}" in names
        for head_dim in (96, 56, 72):
            assert f"global_attention_hd{head_dim}_{dtype}" in names


def test_aot_compile_fits_shared_memory():
    jobs = [(module, name, capability) for module, name in _all_variants() for capability in sorted(MAX_SHARED_BYTES)]
    shared = compile_in_workers(_compile_variant, jobs)
    assert_fits_shared_memory([name for _, name, _ in jobs], [cap for *_, cap in jobs], shared)
