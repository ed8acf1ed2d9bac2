"""Training tokens/s: moge against a transformers Qwen3-MoE model of the same shape.

    python scripts/bench_train.py                          # tiny-moge and small-moge, 20 steps each
    python scripts/bench_train.py configs/tiny-moge.yaml --steps 40 --threads 1

Same batches, same optimiser and schedule for every model; the transformers rows
need `pip install 'moge[bench]'`. Options: --help. The work is in moge/tools/bench_train.py.
"""

import sys

from moge.tools.bench_train import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
