#!/usr/bin/env bash
# Every GPU check in one call, for a rented or lent GPU machine (budget: 8 minutes on an H100):
#   1. bench/gpu.py: the card's bf16 matmul peak; gpt2 + AdamW and llama + Muon at 12x512 and
#      32x1024 (tokens/s, MFU against the data sheet and the measured peak, peak memory); a
#      200-step loss-curve check per recipe, compiled vs plain; configs/gpt100m_4gb.toml's peak
#      memory; decoding speed at 1, 8 and 32 rows, eager and compiled;
#   2. bench/optim.py: the optimizer step alone at the gpt100m_modern shape (aten ops, host
#      time, step time against torch.optim.Muon and fused AdamW);
#   3. the `gpu`-marked tests (bf16 + compile, fp16 loss scaling), when pytest is installed.
# Rows go to docs/results.md. Real corpus tokens are used when out/az/data + out/az/tokenizer
# exist (`make corpus-data`, then carry those two folders along), else random tokens. Extra
# arguments go to bench/gpu.py, e.g. `bash bench/gpu.sh --compile reduce-overhead`.
#
#   bash bench/gpu.sh --cpu     # the same paths at tiny shapes on a CPU (CI: a minute or two);
#                               # results go to a temporary file, not docs/results.md
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python}"
if [ "${1:-}" = "--cpu" ]; then
  shift
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  "$PY" bench/gpu.py --smoke --shapes 2x32 --steps 4 --loss-steps 4 --gen-tokens 8 \
    --compile off --results "$tmp/RESULTS.md" "$@"
  "$PY" bench/optim.py --steps 1 --meta-config configs/tiny.toml --real-config configs/tiny.toml
  echo "gpu.sh --cpu: every path ran"
  exit 0
fi
args=()
if [ -f out/az/data/manifest.json ] && [ -f out/az/tokenizer/tokenizer.json ]; then
  args=(--data out/az/data --tokenizer out/az/tokenizer)
fi
"$PY" bench/gpu.py "${args[@]}" "$@"
"$PY" bench/optim.py --device cuda --real-config configs/gpt100m_modern.toml --append
if "$PY" -c "import pytest" 2>/dev/null; then
  "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py
fi
