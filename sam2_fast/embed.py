"""``python -m sam2_fast.embed ARGS`` (and ``torchrun ... -m sam2_fast.embed ARGS``): ``sam2-fast embed ARGS``. The
code is :mod:`sam2_fast.apps.embed`; this module keeps the documented command working."""

import sys

from .apps.embed import main

if __name__ == "__main__":
    sys.exit(main())
