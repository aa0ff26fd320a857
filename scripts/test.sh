#!/usr/bin/env bash
# The project's test command: sets up .venv on first use, then lint, format check, type check and the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh
.venv/bin/ruff check portable_ckpt tests benchmarks format_spec
.venv/bin/ruff format --check portable_ckpt tests benchmarks format_spec
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
