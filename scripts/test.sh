#!/usr/bin/env bash
# Sets everything up, then runs the whole test suite (real node processes on 127.0.0.1).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
