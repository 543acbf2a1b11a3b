"""``python -m avalanche_drcpsd``: the main job, DR-CPSD then Naive and ER200 on the embedded data with one
table of the three (or, with ``--config``/``--strategy``, one run; see :mod:`avalanche_drcpsd.experiments.run`)."""
import sys

from .experiments.run import main

sys.exit(main())
