"""Time the MoGE layer against the dense SwiGLU limit and the peers on a CUDA device.

    python scripts/bench_cuda.py                                   # default and large, bf16 and fp32
    python scripts/bench_cuda.py --shapes default,pangu-72b --dtype bf16
    python scripts/bench_cuda.py --device cpu --shapes default --tokens 256 --rounds 1   # try it

Options: python scripts/bench_cuda.py --help. The work is in moge/tools/bench_cuda.py;
scripts/check_cuda.sh runs it with the CUDA tests where a GPU is lent.
"""

import sys

from moge.tools.bench_cuda import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
