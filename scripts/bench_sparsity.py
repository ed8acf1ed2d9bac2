"""What sparsity buys: validation loss of MoE configs and the dense model of equal activated
width, at equal steps or at equal wall time, trained side by side by `moge train`'s step.

    python scripts/bench_sparsity.py --threads 1 --steps 600       # tiny-moge, tiny-moe, dense
    python scripts/bench_sparsity.py --threads 1 --seconds 150     # about 150 s of training each

Options: --help. The work is in moge/tools/bench_sparsity.py.
"""

import sys

from moge.tools.bench_sparsity import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
