#!/usr/bin/env bash
# The demonstration of the main job: train, kill, resume bit-identically, inspect, validate.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
bash "$here/scripts/setup-env.sh"
exec "$here/.venv/bin/portable-ckpt" demo "$@"
