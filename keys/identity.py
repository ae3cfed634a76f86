"""Node identities: an Ed25519 signing key plus a ZeroMQ CURVE key pair, kept in one key file.

The Ed25519 key is the node's long-term name (its peer id is derived from it and it signs the
node's announcements); the CURVE pair encrypts and authenticates ZeroMQ connections.  Keeping both
in one file means one thing to back up and one thing to protect.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import json
import logging
import os
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from zmq.utils import z85

from nanoswarm.files import open_regular_file

log = logging.getLogger(__name__)

KEY_FILE_VERSION = 1
PEER_ID_PREFIX = "ns-"
SIGN_PUBLIC_LEN = 32
Z85_KEY_LEN = 40
# A key file is a few hundred bytes; reading more than this means it is not ours.
_MAX_KEY_FILE_BYTES = 64 * 1024
_Z85_ALPHABET = frozenset(z85.Z85CHARS.decode("ascii"))


class KeyFileError(Exception):
    """A key file (or allowed-keys file) is missing, unsafe or corrupt; the message is one line."""


def peer_id_for(sign_public: bytes) -> str:
    """Derive the peer id from a raw 32-byte Ed25519 public key.

    80 bits of sha256 is plenty to tell peers apart and short enough to read in logs; verifiers
    recompute it so a record cannot claim someone else's id.
    """
    if not isinstance(sign_public, bytes) or len(sign_public) != SIGN_PUBLIC_LEN:
        raise ValueError("an Ed25519 public key is 32 raw bytes")
    digest = hashlib.sha256(sign_public).digest()[:10]
    # 10 bytes is a multiple of 5, so base32 has no padding to strip.
    return PEER_ID_PREFIX + base64.b32encode(digest).decode("ascii").lower()


def is_z85_key(value: object) -> bool:
    """True for a 40-character z85 CURVE key (bytes) that actually decodes to 32 bytes."""
    if not isinstance(value, bytes) or len(value) != Z85_KEY_LEN:
        return False
    if not set(value.decode("latin-1")) <= _Z85_ALPHABET:
        return False
    try:
        # Some in-alphabet strings overflow a 32-bit group; decoding is the only full check.
        return len(z85.decode(value)) == 32
    except Exception:  # z85.decode raises struct.error or KeyError on junk
        return False


def _raw_public(private: Ed25519PrivateKey) -> bytes:
    return private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _raw_private(private: Ed25519PrivateKey) -> bytes:
    return private.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


@dataclass(frozen=True)
class Identity:
    """A node's keys.  Secrets are left out of repr so an identity can be logged safely."""

    signing_key: Ed25519PrivateKey = field(repr=False)
    curve_secret: bytes = field(repr=False)
    curve_public: bytes

    def __post_init__(self) -> None:
        # A mismatched CURVE pair would only fail later at handshake time, far from the cause.
        if not is_z85_key(self.curve_secret) or not is_z85_key(self.curve_public):
            raise ValueError("CURVE keys must be 40-character z85 bytes")
        if zmq.curve_public(self.curve_secret) != self.curve_public:
            raise ValueError("CURVE public key does not match the secret key")

    # Cached: derived from the key, and read for every record of every gossip round.
    @functools.cached_property
    def sign_public(self) -> bytes:
        """Raw 32-byte Ed25519 public key."""
        return _raw_public(self.signing_key)

    @functools.cached_property
    def peer_id(self) -> str:
        return peer_id_for(self.sign_public)

    def sign(self, data: bytes) -> bytes:
        """Ed25519 signature (64 bytes) over data."""
        return self.signing_key.sign(data)

    def __str__(self) -> str:
        return self.peer_id


def generate_identity() -> Identity:
    public, secret = zmq.curve_keypair()
    return Identity(Ed25519PrivateKey.generate(), secret, public)


def curve_key_hex(curve_key: bytes) -> str:
    """A z85 CURVE public key in the form contacts (ADDRESS#KEY), `keys show` and --allow-keys
    use: hex is safe to paste into a shell."""
    return z85.decode(curve_key).hex()


def describe_identity(identity: Identity) -> dict[str, str]:
    """The public parts only, for `nanoswarm keys show` and for handing to other operators."""
    return {
        "peer_id": identity.peer_id,
        "ed25519_public": identity.sign_public.hex(),
        "curve_public": identity.curve_public.decode("ascii"),
        # The form contacts (ADDRESS#KEY) and --allow-keys use: hex is safe to paste into a shell.
        "curve_public_hex": curve_key_hex(identity.curve_public),
    }


# ---------------------------------------------------------------------------------------------
# Key file


def _encode_key_file(identity: Identity) -> bytes:
    doc = {
        "version": KEY_FILE_VERSION,
        "peer_id": identity.peer_id,  # for people (keys show computes it); checked on load
        "ed25519_private": base64.b64encode(_raw_private(identity.signing_key)).decode("ascii"),
        "curve_secret": identity.curve_secret.decode("ascii"),
        "curve_public": identity.curve_public.decode("ascii"),
        # The form contacts (ADDRESS#KEY) and --allow-keys use: hex is safe to paste into a shell.
        "curve_public_hex": curve_key_hex(identity.curve_public),
    }
    return (json.dumps(doc, indent=2) + "\n").encode("ascii")


def _write_new(path: Path, data: bytes, flags: int) -> None:
    # Mode 0600 is given to open() so the secret is never readable by others, not even briefly.
    fd = os.open(path, flags | os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def key_file_in_use(path: str | os.PathLike[str]) -> bool:
    """Whether a running node holds `path` (its lock, node/daemon.py hold_key_file)."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): nodes there hold no lock either
        return False
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:  # none there, or unreadable: nothing of ours holds it
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:  # a file system without locks: nothing can tell
        return False
    finally:
        os.close(fd)  # and with it the lock, if we got it
    return False


def save_identity(identity: Identity, path: str | os.PathLike[str], overwrite: bool = False) -> Path:
    """Write identity to path with mode 0600.  Refuses to replace an existing file unless overwrite,
    and one a running node holds even then: that node's lock would stay on the old file, so a
    second node could take the path, and the old secret (its peer id) would be gone."""
    path = Path(path)
    data = _encode_key_file(identity)
    _refuse_non_file(path)
    if overwrite and key_file_in_use(path):
        raise KeyFileError(f"key file {path} is in use by a running node: stop it before replacing its identity")
    try:
        return _save(path, data, overwrite)
    except OSError as e:  # a read-only or full file system, a file where a directory should be
        raise KeyFileError(f"cannot write key file {path}: {e.strerror or e}") from None


def create_key_dir(path: Path) -> None:
    """The directory a new key file goes in, made 0700 (KeyFileError when it cannot be)."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:  # FileExistsError: a file where the directory should be
        why = "a file is in the way" if isinstance(e, FileExistsError) else e.strerror or e
        raise KeyFileError(f"cannot create the directory of key file {path}: {why}") from None


def _save(path: Path, data: bytes, overwrite: bool) -> Path:
    # A fresh 0600 file written in full beside the target, then put in place: a reader never sees
    # a half-written key (processes starting together on a new key file read the winner's; a
    # loser read it empty before, "corrupt key file"), and the old file's mode is not inherited.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    _write_new(tmp, data, os.O_EXCL)
    try:
        if overwrite:
            os.replace(tmp, path)
        else:
            _link_new(tmp, path, data)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _link_new(tmp: Path, path: Path, data: bytes) -> None:
    """`tmp` at `path` as well, unless `path` exists: a hard link appears whole, and fails if taken."""
    try:
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise
        except OSError:  # a file system without hard links: create it in place, still exclusively
            _write_new(path, data, os.O_EXCL)
    except FileExistsError:
        _refuse_dangling_link(path)
        raise KeyFileError(f"key file {path} already exists; refusing to overwrite it (--force replaces it)") from None


_PUBLIC_LISTING = "holds only public keys (as `keys show` prints them), not a key file"


def _is_public_listing(data: bytes) -> bool:
    """`keys show --json` saved to a file: public parts, no private key."""
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):  # (60,000 '[' fit in 64 KiB)
        return False
    return isinstance(doc, dict) and "peer_id" in doc and "ed25519_private" not in doc


def _holds_private_key(data: bytes) -> bool:
    """Whether `data` reads as a key file at all: a JSON object with a private key in it."""
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return False
    return isinstance(doc, dict) and "ed25519_private" in doc


def _read_private_file(path: Path) -> bytes:
    """Read a key file, refusing one that others could read or write (checked on the open fd)."""
    try:
        f, st = open_regular_file(path)  # symlinks are followed; FIFOs and devices refused
    except FileNotFoundError:
        raise KeyFileError(f"key file {path} does not exist") from None
    except OSError as e:
        if e.strerror is None:  # ours: not a regular file
            raise KeyFileError(f"key file {path} is {e}") from None
        raise KeyFileError(f"cannot open key file {path}: {e.strerror}") from None
    with f:
        mode = stat.S_IMODE(st.st_mode)
        if os.name == "posix" and mode & 0o077:
            data = f.read(_MAX_KEY_FILE_BYTES + 1)
            if _is_public_listing(data):  # nothing secret to protect: say what it is
                raise KeyFileError(f"key file {path} {_PUBLIC_LISTING}")
            if not _holds_private_key(data):  # (review191: an --allow-keys list was told to chmod 600)
                raise KeyFileError(f"corrupt key file {path}: not a key file (no private key in it)")
            raise KeyFileError(
                f"UNPROTECTED PRIVATE KEY FILE: permissions {mode:04o} for '{path}' are too open; "
                f"it must not be accessible by group or others (run: chmod 600 '{path}')"
            )
        return f.read(_MAX_KEY_FILE_BYTES + 1)


def _field(doc: dict[str, Any], name: str) -> str:
    value = doc.get(name)
    if not isinstance(value, str):
        raise ValueError(f"field {name!r} is missing or not a string")
    return value


def _parse_key_file(data: bytes) -> Identity:
    """Parse key file contents; every problem is a ValueError with a short reason."""
    if len(data) > _MAX_KEY_FILE_BYTES:
        raise ValueError("file is too large to be a key file")
    if not data.strip():
        raise ValueError("the file is empty")
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"not valid JSON ({e.__class__.__name__})") from None
    except RecursionError:  # arrays nested deeper than Python's stack: no key file is
        raise ValueError("not a key file (JSON nested too deep)") from None
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    if _is_public_listing(data):
        raise ValueError(_PUBLIC_LISTING)
    if type(doc.get("version")) is not int or doc["version"] != KEY_FILE_VERSION:  # (True == 1)
        raise ValueError(f"unsupported version {doc.get('version')!r} (expected {KEY_FILE_VERSION})")
    try:
        raw = base64.b64decode(_field(doc, "ed25519_private"), validate=True)
    except binascii.Error:
        raise ValueError("ed25519_private is not valid base64") from None
    if len(raw) != 32:
        raise ValueError(f"ed25519_private is {len(raw)} bytes, expected 32")
    secret = _field(doc, "curve_secret").encode("utf-8")
    public = _field(doc, "curve_public").encode("utf-8")
    identity = Identity(Ed25519PrivateKey.from_private_bytes(raw), secret, public)  # checks the CURVE pair
    # What the file states of its public parts must be what its secrets give: an altered secret
    # otherwise made a node serve as a peer id other than the one its file (and its operator) named.
    for name, derived in (("peer_id", identity.peer_id), ("curve_public_hex", curve_key_hex(identity.curve_public))):
        if name in doc and doc[name] != derived:
            raise ValueError(f"its {name} {str(doc[name])[:80]!r} is not the one its private keys give ({derived})")
    return identity


def load_identity(path: str | os.PathLike[str]) -> Identity:
    """Load a key file, raising KeyFileError (one clear line naming the file) on any problem."""
    path = Path(path)
    data = _read_private_file(path)
    try:
        return _parse_key_file(data)
    except ValueError as e:
        raise KeyFileError(f"corrupt key file {path}: {e}") from None


def default_key_path() -> Path:
    """$NANOSWARM_KEY_FILE, else ${XDG_CONFIG_HOME:-~/.config}/nanoswarm/node.key."""
    explicit = os.environ.get("NANOSWARM_KEY_FILE")
    if explicit:
        if explicit.endswith(("/", os.sep)):  # Path() drops the slash: a file was written there
            raise KeyFileError(f"$NANOSWARM_KEY_FILE {explicit!r} names a directory, not a key file")
        return Path(explicit).expanduser()
    # The XDG spec says a relative XDG_CONFIG_HOME is invalid and must be ignored.
    xdg = os.environ.get("XDG_CONFIG_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".config"
    return base / "nanoswarm" / "node.key"


def makes_key_dir() -> bool:
    """Whether the default key path's directory is ours to make: the XDG one is; one named by
    $NANOSWARM_KEY_FILE must exist, as for any path a user gives (a typo made a new identity
    in a new directory: a review)."""
    return not os.environ.get("NANOSWARM_KEY_FILE")


def check_new_key_path(path: Path, make_dir: bool, overwrite: bool = False) -> None:
    """Where a new key file is to go: its directory made (0700) with `make_dir` (the default
    path's, ~/.config/nanoswarm, is ours to make), else it must exist, as ssh-keygen has it: a
    typo in a directory made a new identity there, a node serving under a peer id no one knew
    (a review). With `overwrite` a link is replaced, never written through. KeyFileError when it
    cannot go there."""
    if not overwrite:
        _refuse_dangling_link(path)
    _refuse_non_file(path)
    if make_dir:
        create_key_dir(path)
    elif not path.parent.is_dir():
        why = "a file is in the way" if path.parent.exists() else f"there is no directory {path.parent}"
        raise KeyFileError(f"cannot write key file {path}: {why}")


def _refuse_non_file(path: Path) -> None:
    """A key file replaces a file or a link, never what else a path can name: `--force` had made
    /dev/null a key file, as root (a review)."""
    try:
        mode = path.lstat().st_mode
    except OSError:  # nothing there (or nothing we can see): the write says what is wrong
        return
    if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
        kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file (a device, FIFO or socket)"
        raise KeyFileError(f"{path} is {kind}: give a key file's path")


def _refuse_dangling_link(path: Path) -> None:
    """A link to nothing: os.link says "exists" of it, and open would write through it."""
    if path.is_symlink() and not path.exists():
        raise KeyFileError(f"key file {path} is a symbolic link to {os.readlink(path)}, which does not exist")


def load_or_create_identity(path: str | os.PathLike[str] | None = None) -> Identity:
    """Load the node's key file, generating and saving a new identity on first use (in the
    directory of an explicit `path` only if it exists: check_new_key_path)."""
    explicit = path is not None
    path = Path(path) if explicit else default_key_path()
    if path.exists():
        return load_identity(path)
    check_new_key_path(path, make_dir=not explicit and makes_key_dir())
    identity = generate_identity()
    try:
        save_identity(identity, path)
    except KeyFileError:
        if not path.exists():  # it could not be written (a read-only file system): say why
            raise
        # Another process created it between our check and our write: use theirs.
        return load_identity(path)
    if explicit:  # a typo in --key-file makes a new peer of an old one: said where it is seen (review191)
        log.warning("no key file at %s: created a new node identity there (peer id %s); if you meant an "
                    "existing one, check the name", path, identity.peer_id)
    else:
        log.info("created new node identity %s in %s", identity.peer_id, path)
    return identity
