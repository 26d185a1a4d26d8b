"""``python -m moco_dali.train`` (and ``torchrun -m moco_dali.train``): the same as ``moco-train``."""

import sys

from moco_dali.train.cli import main

sys.exit(main())
