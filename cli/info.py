"""`nanoswarm info CONTACT`: one node's own `info` (what it serves, its load and limits, its
gossip's counters), which docs/discovery.md points operators to (review191: no command showed it)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .params import SECONDS, client_keys, peer_list


@click.command()
@click.argument("contact")
@click.option("--key-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Use this identity's CURVE key (private swarms).")
@click.option("--timeout", type=SECONDS, default=5.0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the reply as one JSON object.")
def info(contact: str, key_file: Path | None, timeout: float, as_json: bool) -> None:
    """Print what the node at CONTACT (ADDRESS#KEY) says of itself: its model and span, load,
    sessions, limits and gossip counters (`overtaken`, `rejected`, `clock_offset`)."""
    from nanoswarm.client.transport import PeerConnection

    contacts = peer_list(contact, "CONTACT")
    if len(contacts) != 1:
        raise click.UsageError("CONTACT: give one node's contact")
    conn = PeerConnection(contacts[0], timeout, client_keys=client_keys(key_file))
    try:
        fields = conn.request("info").fields
    finally:
        conn.close()
    if as_json:
        click.echo(json.dumps(fields, sort_keys=True))
        return
    for name in sorted(fields):  # one `name: value` a line; nested values as compact JSON
        value = fields[name]
        shown = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        click.echo(f"{name}: {shown}")
