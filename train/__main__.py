"""``python -m train`` (and ``torchrun -m train``): the same as ``moco-train``."""

import sys

from train.cli import main

sys.exit(main())
