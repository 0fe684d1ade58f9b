"""The encoder's matrix products: linear / 1x1-convolution layers (``dense``) and where the eager fp32 CPU GEMMs run
(``cpu_gemm``: oneDNN, the BLAS, the extension's training kernels)."""
