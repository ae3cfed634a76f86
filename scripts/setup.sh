#!/usr/bin/env bash
# Sets up .venv with nanoswarm and its dependencies. Safe to run again: it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv" >&2
    "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)

# torch 2.10 or later (pyproject.toml says why); an older one in .venv is replaced here, by the
# same rules, rather than by pip's resolver (which would take a CUDA build from the index).
if ! .venv/bin/python -c "import sys, torch; from torch.torch_version import Version; \
sys.exit(Version(torch.__version__) < Version('2.10'))" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        echo "setup: GPU found, installing torch with CUDA" >&2
        "${PIP[@]}" install "torch>=2.10"
    else
        # No GPU: take the CPU build. On our machines torch==2.13.0 resolves to the CPU wheel on
        # local disk; elsewhere point TORCH_INDEX_URL at a CPU wheel index.
        echo "setup: no GPU, installing torch's CPU build" >&2
        if [ -n "${TORCH_INDEX_URL:-}" ]; then
            "${PIP[@]}" install "torch>=2.10" --index-url "$TORCH_INDEX_URL"
        else
            "${PIP[@]}" install "torch==2.13.0"
        fi
    fi
fi
echo "setup: installing nanoswarm and its dependencies" >&2
"${PIP[@]}" install -e '.[dev]'
