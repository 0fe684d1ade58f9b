"""``python -m sam2_fast ARGS``: the ``sam2-fast`` command (:mod:`sam2_fast.apps.cli`)."""

import sys

from .apps.cli import main

sys.exit(main())
