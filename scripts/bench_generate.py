"""Decoding tokens/s: `moge generate` against transformers' generate on the same weights.

    python scripts/bench_generate.py                           # tiny-moge, batch 1 and 16, fp32
    python scripts/bench_generate.py configs/small-moge.yaml --threads 1 --dtype fp32,bf16

The moge model is saved in the qwen3_moe layout and loaded by transformers'
Qwen3MoeForCausalLM (needs `pip install 'moge[bench]'`). Options: --help. The work is in
moge/tools/bench_generate.py.
"""

import sys

from moge.tools.bench_generate import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
