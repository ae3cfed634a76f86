#!/usr/bin/env bash
# Sets everything up, then runs the whole test suite (real node processes on 127.0.0.1).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# Three pytest workers (pytest-xdist): most tests wait on node processes, sockets and timeouts;
# two at once still left the 2 cores idle more than half the time (the suite on the slower VM of
# the seventieth session: 8:48 in two, 7:19 in three, ~12 min alone). Tests are handed out one
# at a time (worksteal); each worker makes its own session fixtures.
# NANOSWARM_TEST_WORKERS=0 runs them in this one process (for --pdb or -s), as -p no:xdist does.
workers=(-n "${NANOSWARM_TEST_WORKERS:-3}" --dist worksteal)
for arg in "$@"; do
    if [ "$arg" = "no:xdist" ] || [ "$arg" = "-pno:xdist" ]; then workers=(); fi
done
exec .venv/bin/python -m pytest -q "${workers[@]}" "$@"
