"""``python -m avalanche_drcpsd``: the main job (see :mod:`avalanche_drcpsd.run`)."""
import sys

from .run import main

sys.exit(main())
