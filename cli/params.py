"""Click parameters and small parsers the commands share, and how a serving command prints
what it reports once it serves."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import click

from nanoswarm.protocol.bounds import MAX_SECONDS, MIN_GOSSIP_INTERVAL


def parse_range(value: str | None, what: str) -> tuple[int, int] | None:
    """'4:8' -> (4, 8): half-open, like a Python slice."""
    if value is None:
        return None
    try:
        a, b = (int(x) for x in value.split(":"))
    except ValueError:
        raise click.UsageError(f"{what} {value} must look like START:STOP, e.g. 4:8") from None
    if not 0 <= a < b:
        raise click.UsageError(f"{what} {value} is empty or negative (START:STOP, half-open like a Python slice: "
                               "0 <= START < STOP)")
    return a, b


class _Positive(click.ParamType):
    """A positive, finite number (a float option would take 0, -1, nan and inf), from `least` to
    `most`."""

    def __init__(self, what: str, most: float = float("inf"), least: float = 0.0):
        self.what, self.most, self.least = what, most, least
        self.name = what.split()[-1]

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a {self.what}", param, ctx)
        if not 0 < number < float("inf"):
            self.fail(f"{value!r} must be a positive, finite {self.what}", param, ctx)
        if number > self.most:
            self.fail(f"{value!r} is too large: at most {self.most:.0f}", param, ctx)
        if number < self.least:
            self.fail(f"{value!r} is too small: at least {self.least:g}", param, ctx)
        return number


class _NewFilePath(click.Path):
    """A file that may not exist yet: `dir/` is refused (Path drops the slash, and the file
    `dir` was written where the directory was meant), as is an empty path; `~` is the home
    directory (`--key-file=~/x` reaches us unexpanded)."""

    def __init__(self) -> None:
        super().__init__(dir_okay=False, path_type=Path)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str):
            if not value:
                self.fail("an empty path names no file", param, ctx)
            if value == "-":  # stdout, by the usual convention: a file named "-" was written (a review)
                self.fail("'-' is not stdout here: give a file's path (./- for a file named -)", param, ctx)
            if value.endswith(("/", os.sep)):
                self.fail(f"{value!r} names a directory, not a file", param, ctx)
            value = os.path.expanduser(value)
        return super().convert(value, param, ctx)


NEW_FILE = _NewFilePath()
SECONDS = _Positive("number of seconds", MAX_SECONDS)
# A timer's period: 1e-9 s kept a node's loop busy.
INTERVAL = _Positive("number of seconds", MAX_SECONDS, least=MIN_GOSSIP_INTERVAL)
# Asked for a million threads, libgomp crashed (SIGSEGV, not a word said); 5,000 ran.
THREADS = click.IntRange(1, 1024)
# A limit: an unbounded one failed after the model loaded with "Python int too large to convert
# to C long" (a review).
COUNT = click.IntRange(1, 2**31 - 1)
POSITIVE = _Positive("number")
# AdamW's: above 1 a run only diverges, and above float32's range it failed inside torch's
# optimizer, in its words, after the first checkpoint was written (a review).
LEARNING_RATE = _Positive("learning rate", most=1.0)


def echo_or_serve_on(text: str, what: str) -> None:
    """Print what a serving command (node, cluster) reports once it serves; a stdout whose
    reader has gone (`| head -1`) is pointed at /dev/null with a warning, and the command serves
    on rather than end the swarm over it."""
    try:
        click.echo(text)
        sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        logging.getLogger(__name__).warning("stdout is closed: the line%s with %s went nowhere",
                                            "s" if "\n" in text else "", what)


def peer_list(peers: str | None, option: str | None = None) -> list[str]:
    """Comma-separated contacts -> a list (empty items dropped). With `option`, a contact that is
    not tcp://HOST:PORT[#KEY] is that option's error, before anything loads (a typo in a key had
    been found only after the model loaded, as "no peer serves layers ...")."""
    contacts = [p.strip() for p in (peers or "").split(",") if p.strip()]
    if option is not None:
        from nanoswarm.keys.contact import endpoint_of, split_contact
        from nanoswarm.keys.records import check_endpoint

        for contact in contacts:
            try:
                check_endpoint(endpoint_of(contact))
                split_contact(contact)
            except ValueError as e:
                raise click.BadParameter(str(e), param_hint=f"'{option}'") from None
    return contacts


def client_keys(key_file: Path | None) -> tuple[bytes, bytes] | None:
    """(CURVE public, secret) of an identity file, for private swarms; None: ephemeral keys."""
    if key_file is None:
        return None
    from nanoswarm.keys.identity import load_identity

    identity = load_identity(key_file)
    return identity.curve_public, identity.curve_secret
