"""Reading the small files a user or a stranger hands us (manifests, configs, allow lists): only
regular files, only up to a size. A FIFO must not hang a command waiting for a writer, and a
link to /dev/zero must not be read until memory runs out (docs/reliability.md)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

SMALL_FILE_BYTES = 16 << 20  # far above any manifest, config or allow list we write or expect


def read_regular_file(path: str | os.PathLike[str], limit: int = SMALL_FILE_BYTES) -> bytes:
    """The bytes of `path`; OSError if it is not a regular file or holds more than `limit`.
    Checked on the open descriptor (O_NONBLOCK: opening a FIFO does not wait for a writer)."""
    # O_BINARY: on Windows os.open defaults to text mode.
    fd = os.open(Path(path), os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    with open(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError("not a regular file")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise OSError(f"more than {limit >> 20} MiB: not a file of this kind")
    return data
