"""Allowed-keys files (`node --allow-keys`): the CURVE public keys of the peers a private node
lets connect, one per line, in any form the CLI prints a key (z85, hex or a whole contact)."""

from __future__ import annotations

import binascii
import os
from pathlib import Path

from zmq.utils import z85

from nanoswarm.files import read_regular_file

from .contact import split_contact
from .identity import KeyFileError, is_z85_key

_HEX_KEY_LEN = 64
_ALLOWED_FORMATS = "40 z85 characters, 64 hex digits or a contact tcp://HOST:PORT#KEY"


def _allowed_key(token: str) -> bytes | None:
    """The z85 CURVE key a token of an allowed-keys file names, or None if it names none."""
    key = token.encode("utf-8")
    if is_z85_key(key):
        return key
    if len(token) == _HEX_KEY_LEN and "://" not in token:  # the form nodes print after the '#' of their contacts
        try:
            return z85.encode(binascii.unhexlify(token))
        except ValueError:  # binascii.Error, or non-ASCII text
            return None
    if "://" in token and "#" in token:  # a whole contact, as a node prints it (64 characters long too)
        try:
            return split_contact(token)[1]
        except ValueError:
            return None
    return None


def _parse_allowed_line(path: Path, lineno: int, line: str) -> bytes | None:
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    # '#' is a z85 character, so only whole-line comments are possible; anything after the key
    # (separated by whitespace, which z85 never uses) is a free-form label, as in authorized_keys.
    token = text.split(None, 1)[0]
    key = _allowed_key(token)
    if key is None and text.startswith("{"):  # JSON: a key file (or `keys show --json`), not a list
        raise KeyFileError(f"{path}:{lineno}: JSON, not a list of keys: give each node's curve public key, "
                           "which `nanoswarm keys show KEY_FILE` prints after 'curve public'")
    if key is None:
        shown = token if len(token) <= 48 else token[:45] + "..."
        raise KeyFileError(f"{path}:{lineno}: not a CURVE public key (expected {_ALLOWED_FORMATS}, first on "
                           f"the line; `nanoswarm keys show FILE` prints it after 'curve public'): {shown!r}")
    return key


def read_allowed_keys(path: str | os.PathLike[str]) -> set[bytes]:
    """Read CURVE public keys, one per line: z85, hex or a node's contact (tcp://HOST:PORT#KEY).

    Blank lines and whole-line # comments are skipped; text after the key is a label.
    """
    path = Path(path)
    try:
        text = read_regular_file(path).decode("utf-8-sig")  # (a byte-order mark, as Windows editors write)
    except FileNotFoundError:
        raise KeyFileError(f"allowed-keys file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise KeyFileError(f"cannot read allowed-keys file {path}: {e}") from None
    keys: set[bytes] = set()
    for lineno, line in enumerate(text.splitlines(), start=1):
        key = _parse_allowed_line(path, lineno, line)
        if key is not None:
            keys.add(key)
    return keys
