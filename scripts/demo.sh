#!/usr/bin/env bash
# Tiny Llama 3.1 pretraining on this CPU through the real 405B recipe code:
# prints loss per step and writes a checkpoint under runs/.
# Creates .venv/ first if it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
run_dir=runs/demo-$(date +%Y%m%d-%H%M%S)
.venv/bin/python recipes/llama31_405b.py --cpu --size debug --max-steps 30 --dir "$run_dir" "$@"
echo "checkpoints: $(ls -d "$run_dir"/*/checkpoints/*/ 2>/dev/null | tr '\n' ' ')"
