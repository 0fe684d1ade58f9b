"""Ahead-of-time compiles of Triton kernels for the GPUs we target, without a GPU: Triton ships ptxas, so a
compile to cubin on any machine rejects what only the real compiler rejects (``tl.dot`` operands under 16, too
much shared memory, ptxas errors). Shared by the AOT tests of each kernel family."""

import concurrent.futures
import multiprocessing
import os
from typing import Callable, List, Optional, Sequence, Tuple

import triton

# Shared memory per block an SM can give one program (the opt-in maximum), in bytes: A100 (sm_80), H100 (sm_90).
MAX_SHARED_BYTES = {80: 166912, 90: 232448}


def compile_kernel(name: str, kernel, signature: dict, constexprs: dict, options: dict, capability: int,
                   attrs: Optional[dict] = None) -> int:
    """Compiles ``kernel`` for sm_``capability``; returns the shared memory it needs, in bytes."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the default; set to silence triton 3.9's warning
    compiled = triton.compile(
        ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
        target=GPUTarget("cuda", capability, 32), options=options,
    )
    assert compiled.asm.get("cubin"), f"{name}: no cubin for sm_{capability}"
    return compiled.metadata.shared


def compile_in_workers(compile_one: Callable[..., int], jobs: Sequence[Tuple]) -> List[int]:
    """``compile_one(*job)`` for every job in worker processes, one per core; returns the shared memory of each.
    ``compile_one`` must be a module-level function (workers are spawned, so that none inherits a CUDA context)."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=os.cpu_count() or 1, mp_context=context) as pool:
        return list(pool.map(compile_one, *zip(*jobs)))


def assert_fits_shared_memory(labels: Sequence[str], capabilities: Sequence[int], shared: Sequence[int]) -> None:
    """Prints what each compiled variant needs; fails naming those over their target's limit."""
    report = [f"  sm_{cap} {label}: {used} bytes of shared memory"
              for label, cap, used in zip(labels, capabilities, shared)]
    print(f"compiled {len(report)} variants:\n" + "\n".join(report))
    too_big = [line for line, cap, used in zip(report, capabilities, shared) if used > MAX_SHARED_BYTES[cap]]
    assert not too_big, f"variants over the shared-memory limit: {too_big}"
