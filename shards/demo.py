"""The demo model shipped with nanoswarm: trained by the project on tiny Shakespeare
(docs/demo-model.md says how), stored as a sharded model directory in float16."""

from __future__ import annotations

from pathlib import Path

DEMO_DIR = Path(__file__).parent / "demo"


def demo_model_dir() -> Path:
    if not (DEMO_DIR / "manifest.json").exists():
        raise FileNotFoundError(f"the demo model is missing from {DEMO_DIR}; see docs/demo-model.md")
    return DEMO_DIR
