"""Whole-encoder benchmarks: the reference `sam2` encoder and sam2_fast per backend, eager and compiled."""

import math

from bench.measure import EXTRA_WARMUP_CALLS, timed_with_cuda_events, warm_up
from bench.workloads import feature_outputs, short_name, worst_relative_error


def test_encoder(benchmark, workbench, device, rounds, encoder_case):
    config, size, batch, dtype, impl = encoder_case
    encoders = workbench.encoders(config, dtype)
    image = encoders.input_for(workbench.image(batch, size))
    forward = encoders.callable(impl)
    first_call_s, output = warm_up(lambda: forward(image), device, EXTRA_WARMUP_CALLS[device.type])
    error, error_output = worst_relative_error(feature_outputs(output), workbench.expected(config, size, batch))
    del output
    assert math.isfinite(error), f"{impl.name} produced non-finite {error_output}"

    benchmark.group = f"encoder {short_name(config)} {size}px batch {batch} {dtype}"
    benchmark.extra_info.update(
        config=short_name(config), image_size=size, batch=batch, dtype=dtype, impl=impl.name,
        first_call_s=first_call_s, rel_error=error, rel_error_output=error_output, device=str(device),
    )
    run, event_seconds = timed_with_cuda_events(lambda: forward(image), device)
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=0)
    if event_seconds:
        benchmark.extra_info["cuda_event_s"] = event_seconds
