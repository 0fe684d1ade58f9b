"""Ahead-of-time compile of every attention kernel variant the eight configs use, for sm_80 and sm_90.

Needs no GPU: Triton compiles to cubin on CPU (it ships ptxas), so this catches what only a real compile rejects
(``tl.dot`` operands under 16, too much shared memory, ptxas errors) on machines without a GPU. Compiles run in
parallel worker processes, one per core; Triton's cache makes reruns fast.
"""

import concurrent.futures
import importlib
import multiprocessing
import os

import pytest

triton = pytest.importorskip("triton", reason="triton is not installed: nothing to compile")

KERNEL_MODULES = ("sam2_fast.kernels.window_attention", "sam2_fast.kernels.global_attention")
# Shared memory per block an SM can give one program (the opt-in maximum), in bytes.
MAX_SHARED_BYTES = {80: 166912, 90: 232448}


def _compile_variant(module_name: str, variant_name: str, capability: int) -> int:
    """Compile one variant for one capability; return its shared memory use in bytes."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    variants = {name: rest for name, *rest in importlib.import_module(module_name).aot_variants()}
    kernel, signature, constexprs, options = variants[variant_name]
    compiled = triton.compile(
        ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
        target=GPUTarget("cuda", capability, 32),
        options=options,
    )
    return compiled.metadata.shared


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
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the default; set to silence triton 3.9's warning
    jobs = [(module, name, capability) for module, name in _all_variants() for capability in sorted(MAX_SHARED_BYTES)]
    context = multiprocessing.get_context("spawn")  # workers must not inherit a CUDA context
    with concurrent.futures.ProcessPoolExecutor(max_workers=os.cpu_count() or 1, mp_context=context) as pool:
        shared = dict(zip(jobs, pool.map(_compile_variant, *zip(*jobs))))
    report = "\n".join(f"  sm_{cap} {name}: {used} bytes" for (_, name, cap), used in shared.items())
    print(f"compiled {len(jobs)} variants:\n{report}")
    too_big = {
        f"{name} on sm_{cap}": f"{used} > {MAX_SHARED_BYTES[cap]}"
        for (_, name, cap), used in shared.items()
        if used > MAX_SHARED_BYTES[cap]
    }
    assert not too_big, f"variants over the shared-memory limit: {too_big}"
