"""What tests and benchmarks share: the reference sam2 encoder built from the same config (``reference``)."""
