#!/usr/bin/env bash
# Every GPU check in one call (made for a rented or lent GPU machine; ~5-8 minutes with compiles):
#   1. bench/gpu.py: the card's bf16 matmul peak, configs/gpt100m.toml at 12x512 and 32x1024
#      (tokens/s, MFU, peak memory, step-time spread; a section appended to bench/RESULTS.md),
#      and a 200-step loss-curve check, compiled vs plain;
#   2. the `gpu`-marked tests (bf16 + compile, fp16 loss scaling), when pytest is installed.
# Real corpus tokens are used when out/az/data + out/az/tokenizer exist (`make corpus-data`, then
# carry those two folders to the GPU machine, 16 MB together), else random
# tokens. Extra arguments go to bench/gpu.py, e.g. `bash bench/gpu.sh --compile reduce-overhead`.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
args=()
if [ -f out/az/data/manifest.json ] && [ -f out/az/tokenizer/tokenizer.json ]; then
  args=(--data out/az/data --tokenizer out/az/tokenizer)
fi
python bench/gpu.py "${args[@]}" "$@"
if python -c "import pytest" 2>/dev/null; then
  python -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py
fi
