"""``python -m scorekit ...`` (and ``torchrun --nproc_per_node N -m scorekit train ...``)."""

import sys

from scorekit.cli import main

sys.exit(main())
