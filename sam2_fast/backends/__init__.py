"""What the ops run on, below the op layer: plain PyTorch (``torch_ops``, the reference every backend matches), the
C++ extension's loader and flags (``extension``), the CPU's bf16/fp16 units (``precision``), and
the shape rules every backend and fake shares (``shapes``). The Triton kernels are ``sam2_fast.kernels`` (sources in
the repository's top-level ``kernels/``)."""
