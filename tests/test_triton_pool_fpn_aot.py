"""Ahead-of-time compile of every maxpool2x2 and fpn_upsample_add kernel variant the encoder configs launch, for
sm_80 and sm_90, on any machine (Triton ships ptxas; no GPU needed): catches what only the real compiler rejects
and checks each kernel's shared memory fits the target.
"""

import importlib
import os

import pytest

if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("the interpreter replaces @triton.jit kernels, which then cannot be compiled", allow_module_level=True)
triton = pytest.importorskip("triton")
from triton_aot import MAX_SHARED_BYTES, compile_kernel  # noqa: E402

# By module path: the package re-exports each launcher under its module's name.
KERNEL_MODULES = [importlib.import_module(f"sam2_fast.kernels.{name}") for name in ("maxpool2x2", "fpn_upsample_add")]


def _variants():
    seen = {}
    for module in KERNEL_MODULES:
        for name, kernel, signature, constexprs, num_warps in module.aot_variants():
            key = (kernel.__name__, tuple(signature.items()), tuple(sorted(constexprs.items())), num_warps)
            seen.setdefault(key, (name, kernel, signature, constexprs, num_warps))
    return list(seen.values())


VARIANTS = _variants()


def _divisibility_attrs(signature: dict) -> dict:
    """What the JIT specializes at the model's shapes: torch's allocations are 16-byte aligned, and every size and
    stride there (multiples of 16 channels and of 16 tokens per row) is divisible by 16. Kernels are compiled with
    that knowledge, so this compiles the vectorized code that actually runs."""
    return {
        (index,): [["tt.divisibility", 16]]
        for index, kind in enumerate(signature.values())
        if kind.startswith("*") or kind in ("i32", "i64")
    }


def test_variants_cover_both_kernels():
    names = [variant[0] for variant in VARIANTS]
    assert any(name.startswith("maxpool2x2_") for name in names)
    assert any(name.startswith("fpn_upsample_add_") for name in names)
    assert len(names) == len(set(names)), "two distinct variants share a name"


@pytest.mark.parametrize("capability", sorted(MAX_SHARED_BYTES), ids=lambda capability: f"sm_{capability}")
@pytest.mark.parametrize("variant", VARIANTS, ids=[variant[0] for variant in VARIANTS])
def test_aot_compile(variant, capability):
    name, kernel, signature, constexprs, num_warps = variant
    shared = compile_kernel(name, kernel, signature, constexprs, {"num_warps": num_warps}, capability,
                            attrs=_divisibility_attrs(signature))
    limit = MAX_SHARED_BYTES[capability]
    assert shared <= limit, f"{name}: needs {shared} bytes of shared memory, sm_{capability} has {limit}"
