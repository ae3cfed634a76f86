#!/usr/bin/env bash
# Sets everything up, then runs the main job: a local 3-node swarm generating Shakespeare.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/nanoswarm demo "$@"
