"""``python -m lens_kernels.train`` is ``lens-train``."""
import sys

from .cli import train_main

sys.exit(train_main())
