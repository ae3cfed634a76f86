#!/usr/bin/env bash
# Sets everything up, then runs the whole test suite (real node processes on 127.0.0.1).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# Two pytest workers (pytest-xdist): most tests wait on node processes, sockets and timeouts, so
# two at once keep a 2-core machine busy (the suite: ~12 min alone, ~7-8 min so). Tests are
# handed out one at a time (worksteal); each worker makes its own session fixtures.
# NANOSWARM_TEST_WORKERS=0 runs them in this one process (for --pdb or -s), as -p no:xdist does.
workers=(-n "${NANOSWARM_TEST_WORKERS:-2}" --dist worksteal)
for arg in "$@"; do
    if [ "$arg" = "no:xdist" ] || [ "$arg" = "-pno:xdist" ]; then workers=(); fi
done
exec .venv/bin/python -m pytest -q "${workers[@]}" "$@"
