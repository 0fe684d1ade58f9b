"""Applications: the ``sam2-fast`` command line (``cli``) and many images to embedding files (``embed``)."""
