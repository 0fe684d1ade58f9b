"""Benchmarks of sam2_fast against the reference `sam2` image encoder.

- ``matrix.py``: what a run covers (configs, image sizes, batches, dtypes, implementations) and the defaults per
  device; the pytest suite and the report share it.
- ``workloads.py``: the encoders and per-op workloads with seeded weights and inputs, and one callable per
  implementation (reference eager/compiled, sam2_fast per backend, eager/compiled).
- ``measure.py``: timing (CUDA events on GPU), statistics, peak memory, device description and rooflines.
- ``report.py``: ``python -m bench.report``, one process, interleaved rounds, a table, JSON and a plot.
- ``memory_probe.py``: one forward in a fresh process, for CPU peak-memory numbers.
- ``train_step.py``: ``python -m bench.train_step``, forward + backward against the reference.
- ``cold_start.py``: ``python -m bench.cold_start``, time to a first output in a fresh process, per path.
- ``embed_throughput.py``: ``sam2-fast embed`` end to end against a plain loop.
- ``profile.py``: where a forward's time goes, per operator category, beside the reference.
- ``tune_attention.py``: launch configs of the Triton attention kernels (GPU).
- ``peers.py``: ``python -m bench.peers``, the encoder beside ONNX Runtime and OpenVINO.
- ``transformers_embeddings.py``: transformers' ``Sam2Model.get_image_embeddings`` before and after ``optimize``.
- ``cuda_session.sh``: everything a GPU machine runs, in two calls.
- ``test_*.py`` + ``conftest.py``: the pytest-benchmark suite, ``pytest bench/``.
"""
