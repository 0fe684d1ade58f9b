"""Benchmarks of sam2_fast against the reference `sam2` image encoder.

- ``matrix.py``: what a run covers (configs, image sizes, batches, dtypes, implementations) and the defaults per
  device; the pytest suite and the report share it.
- ``workloads.py``: the encoders and per-op workloads with seeded weights and inputs, and one callable per
  implementation (reference eager/compiled, sam2_fast per backend, eager/compiled).
- ``measure.py``: timing (CUDA events on GPU), statistics, peak memory, device description and rooflines.
- ``report.py``: ``python -m bench.report``, one process, interleaved rounds, a table, JSON and a plot.
- ``memory_probe.py``: one forward in a fresh process, for CPU peak-memory numbers.
- ``test_*.py`` + ``conftest.py``: the pytest-benchmark suite, ``pytest bench/``.
"""
