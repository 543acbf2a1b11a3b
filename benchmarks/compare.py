"""The comparison benchmark (see :mod:`avalanche_drcpsd.experiments.compare`; also the ``drcpsd-compare`` command).

    python benchmarks/compare.py --benchmarks split_mnist,split_fmnist --strategies all --seeds 42,69,1714
"""

import sys

from avalanche_drcpsd.experiments.compare import main

if __name__ == "__main__":
    sys.exit(main())
