"""Deployment paths over a built model: CUDA graph capture (``capture``), ``torch.export`` (``export``), and
``optimize`` for sam2's own models (``drop_in``)."""
