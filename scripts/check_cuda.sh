#!/usr/bin/env bash
# Where a CUDA GPU is lent (one short run): the CUDA tests (tests/test_cuda.py), the
# sorted path's combine three ways (moge/tools/combine_probe.py), then the layer benchmark
# on the device (scripts/bench_cuda.py). Logs and JSON go to $OUT (or
# ./cuda-check). Runs from the repository root with the machine's own python3 and torch.
set -u -o pipefail
out=${OUT:-cuda-check}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.cuda.get_device_name())"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader
timeout 150 python3 -m pytest -q -p no:cacheprovider -rfE tests/test_cuda.py 2>&1 | tee "$out/test_cuda.txt" | tail -25
timeout 60 python3 -m moge.tools.combine_probe --device cuda --dtype bf16,fp32 2>&1 | tee "$out/combine_probe.txt"
timeout "${BENCH_TIMEOUT:-270}" python3 scripts/bench_cuda.py \
    --shapes "${SHAPES:-default,d2048-e64,pangu-72b,large,default-64k}" \
    --fp32-shapes default,d2048-e64,default-64k --peer-shapes default,d2048-e64 \
    --rounds 8 --calls 4 --warmup 1 --budget-s "${BENCH_BUDGET:-180}" --profile default,d2048-e64 \
    --out "$out/bench_cuda.json" 2>&1 | tee "$out/bench_cuda.txt" | tail -40
