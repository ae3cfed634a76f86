"""What an installed nanoswarm holds: files the package reads at run time must be package data, or
a wheel leaves them out (review86: `train` without --text failed on an installed copy, and the
bench quietly used random token ids, since tinyshakespeare.txt was not shipped)."""

from __future__ import annotations

import subprocess
import sys
from fnmatch import fnmatch
from importlib import metadata
from pathlib import Path

from conftest import CLI

import nanoswarm
from nanoswarm.shards import tokenizer, train
from nanoswarm.shards.demo import DEMO_DIR

ROOT = Path(__file__).resolve().parent.parent


def _pyproject() -> dict:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # tomllib's origin, or the copy pip carries, on 3.10
        try:
            import tomli as tomllib
        except ImportError:
            from pip._vendor import tomli as tomllib
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _shipped(package: str, relative: str) -> bool:
    globs = _pyproject()["tool"]["setuptools"]["package-data"].get(package, [])
    return any(fnmatch(relative, g) for g in globs)


def test_every_data_file_of_the_package_is_package_data():
    shards = ROOT / "shards"
    files = [p for d in ("data", "demo") for p in (shards / d).rglob("*")
             if p.is_file() and "__pycache__" not in p.parts]
    assert len(files) > 10  # the vocabulary, the text and the demo model's manifest and shards
    relative = [str(p.relative_to(shards)) for p in files]
    assert [r for r in relative if not _shipped("nanoswarm.shards", r)] == []


def test_the_files_the_code_reads_at_run_time_are_shipped():
    for path in (tokenizer.BPE_PATH, train.DEFAULT_TEXT, DEMO_DIR / "manifest.json"):
        assert path.is_file(), path
        assert _shipped("nanoswarm.shards", str(path.relative_to(ROOT / "shards"))), path


def test_version_is_the_packages():
    done = subprocess.run([*CLI, "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"nanoswarm, version {nanoswarm.__version__}\n"
    assert nanoswarm.__version__ == metadata.version("nanoswarm") == _pyproject()["project"]["version"]
