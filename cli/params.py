"""Click parameters and small parsers the commands share."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from nanoswarm.client.swarm import MAX_SECONDS


def parse_range(value: str | None, what: str) -> tuple[int, int] | None:
    """'4:8' -> (4, 8): half-open, like a Python slice."""
    if value is None:
        return None
    try:
        a, b = (int(x) for x in value.split(":"))
    except ValueError:
        raise click.UsageError(f"{what} {value} must look like START:STOP, e.g. 4:8") from None
    if not 0 <= a < b:
        raise click.UsageError(f"{what} {value} is empty or negative")
    return a, b


class _Positive(click.ParamType):
    """A positive, finite number (a float option would take 0, -1, nan and inf), at most `most`."""

    def __init__(self, what: str, most: float = float("inf")):
        self.what, self.most = what, most
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
        return number


SECONDS = _Positive("number of seconds", MAX_SECONDS)
POSITIVE = _Positive("number")


def peer_list(peers: str | None) -> list[str]:
    """Comma-separated contacts -> a list (empty items dropped)."""
    return [p.strip() for p in (peers or "").split(",") if p.strip()]


def client_keys(key_file: Path | None) -> tuple[bytes, bytes] | None:
    """(CURVE public, secret) of an identity file, for private swarms; None: ephemeral keys."""
    if key_file is None:
        return None
    from nanoswarm.keys.identity import load_identity

    identity = load_identity(key_file)
    return identity.curve_public, identity.curve_secret
