"""Time the MoGE layer against the dense SwiGLU limit and MoE peers; print one table.

    python scripts/bench_layer.py                      # d=512 f=256 E=16 M=4 K=4, T=4096
    python scripts/bench_layer.py --shape large        # E=64 M=8 K=8 d=1024 f=512
    python scripts/bench_layer.py --no-peers --sweep-tokens 1024,4096,16384,65536

Options: python scripts/bench_layer.py --help. The work is in moge/tools/bench.py.
"""

import sys

from moge.tools.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
