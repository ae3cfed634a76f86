"""Opening the files a user or a stranger hands us (manifests, configs, allow lists, key files,
shard files): only regular files, and small ones read only up to a size. A FIFO must not hang a
command waiting for a writer, and a link to /dev/zero must not be read until memory runs out
(docs/reliability.md)."""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path
from typing import BinaryIO

SMALL_FILE_BYTES = 16 << 20  # far above any manifest, config or allow list we write or expect


def open_regular_file(path: str | os.PathLike[str]) -> tuple[BinaryIO, os.stat_result]:
    """`path` open for reading, with its stat; OSError unless it is a regular file. Checked on the
    open descriptor (O_NONBLOCK: opening a FIFO does not wait for a writer)."""
    # O_BINARY: on Windows os.open defaults to text mode (CRLF turned to LF, 0x1A read as the end).
    fd = os.open(Path(path), os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError("not a regular file")
        raw = io.FileIO(fd, "rb")  # owns the descriptor from here on
    except BaseException:
        os.close(fd)
        raise
    try:
        return io.BufferedReader(raw), st
    except BaseException:
        raw.close()
        raise


def read_regular_file(path: str | os.PathLike[str], limit: int = SMALL_FILE_BYTES) -> bytes:
    """The bytes of `path`; OSError if it is not a regular file or holds more than `limit` bytes."""
    f, _ = open_regular_file(path)
    with f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise OSError(f"more than {limit} bytes: not a file of this kind")
    return data


def write_beside(path: str | os.PathLike[str], data: bytes | memoryview, what: str = "") -> Path:
    """`data` written to the hidden temporary file beside `path` (`.NAME.tmp`), for the caller
    to move into place (os.replace) once it may: readers never see a half-written file. On any
    failure (a full disk, Ctrl-C) the temporary file is removed, and an OSError names `path`
    (Python's OSError of a write names no file): "cannot write WHAT PATH: REASON"."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_bytes(data)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise OSError(f"cannot write {what + ' ' if what else ''}{path}: {e.strerror or e}") from e
        raise
    return tmp
