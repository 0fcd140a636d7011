#!/usr/bin/env bash
# Lint and test suite; creates .venv/ first if it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q "$@"
