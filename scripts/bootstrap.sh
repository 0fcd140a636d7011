#!/usr/bin/env bash
# Creates .venv/ at the repository root with the pinned stack, once.
# Reinstalls when requirements/constraints.txt or pyproject.toml change.
set -euo pipefail
cd "$(dirname "$0")/.."
stamp=.venv/.coom-installed
want=$(cat requirements/constraints.txt pyproject.toml | sha256sum | cut -c1-16)
if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then
  exit 0
fi
echo "[bootstrap] creating .venv (about 2 minutes on a fresh machine)" >&2
[[ -x .venv/bin/python ]] || python3 -m venv .venv
# One resolver run for everything (split runs broke protobuf/packaging).
# torch==2.13.0 is the CPU wheel on local disk; GPU nodes bring their own.
.venv/bin/python -m pip install -q --disable-pip-version-check \
  -c requirements/constraints.txt "torch==2.13.0" -e ".[dev]" 2>&1 | grep -v "is ignored: it is neither" >&2 || true
# NeMo's own base requirements pull packages nothing here imports.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps \
  -c requirements/constraints.txt nemo_toolkit==2.7.3 2>&1 | grep -v "is ignored: it is neither" >&2 || true
.venv/bin/python -c "import nemo, megatron.core, coom_nemo" 2>/dev/null \
  || { echo "[bootstrap] install failed: see pip output above" >&2; exit 1; }
echo "$want" > "$stamp"
