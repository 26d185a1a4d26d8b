"""``python -m moco_dali.train`` (and ``torchrun -m moco_dali.train``): the same as ``moco-train``."""

import sys

from .cli import main

sys.exit(main())
