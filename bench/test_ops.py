"""Per-op benchmarks: each op against the `sam2` package's own sequence for that step, per backend."""

import math

from bench.measure import EXTRA_WARMUP_CALLS, dtype_label, timed_with_cuda_events, warm_up
from bench.workloads import op_callable, op_expected, relative_error, short_name


def test_op(benchmark, workbench, device, rounds, op_case):
    config, size, batch, dtype, op, site, impl = op_case
    case = workbench.op_case(config, size, batch, dtype, op, site)
    fn = op_callable(case, impl, device)
    first_call_s, output = warm_up(fn, device, EXTRA_WARMUP_CALLS[device.type])
    error = relative_error(output, op_expected(case))
    del output
    assert math.isfinite(error), f"{impl.name} {op} produced non-finite values"

    benchmark.group = f"{op} {case.site} ({case.shape}) {dtype_label(dtype)}, {short_name(config)} {size}px"
    benchmark.extra_info.update(
        config=short_name(config), image_size=size, batch=batch, dtype=dtype_label(dtype), op=op, site=case.site,
        impl=impl.name, first_call_s=first_call_s, rel_error=error, flops=case.flops, bytes_moved=case.bytes_moved,
        device=str(device),
    )
    run, event_seconds = timed_with_cuda_events(fn, device)
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=0)
    if event_seconds:
        benchmark.extra_info["cuda_event_s"] = event_seconds
