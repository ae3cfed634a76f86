"""`nanoswarm keys`: node identities."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .params import NEW_FILE


@click.group()
def keys() -> None:
    """Node identities: an Ed25519 signing key and a CURVE key pair in one 0600 file."""


@keys.command("generate")
@click.option("--out", type=NEW_FILE, default=None,
              help="Key file to write (default: the node's default key file).")
@click.option("--force", is_flag=True, help="Replace an existing file.")
@click.option("--json", "as_json", is_flag=True, help="Print the public parts and the file as JSON.")
def keys_generate(out: Path | None, force: bool, as_json: bool) -> None:
    """Create a new identity and print its public parts."""
    from nanoswarm.keys.identity import (
        check_new_key_path,
        default_key_path,
        describe_identity,
        generate_identity,
        makes_key_dir,
        save_identity,
    )

    path = out or default_key_path()
    check_new_key_path(path, make_dir=out is None and makes_key_dir(), overwrite=force)
    identity = generate_identity()
    save_identity(identity, path, overwrite=force)
    info = describe_identity(identity)
    if as_json:
        click.echo(json.dumps({**info, "key_file": str(path)}))
    else:
        click.echo(f"{_public_lines(info)}\nkey file        {path}")


@keys.command("show")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the public parts as JSON.")
def keys_show(file: Path, as_json: bool) -> None:
    """Print the public parts of a key file (peer id, Ed25519 and CURVE public keys)."""
    from nanoswarm.keys.identity import describe_identity, load_identity

    info = describe_identity(load_identity(file))
    if as_json:
        click.echo(json.dumps(info))
    else:
        click.echo(_public_lines(info))


def _public_lines(info: dict) -> str:
    """The public parts of an identity, as `keys generate` and `keys show` print them."""
    return (f"peer id         {info['peer_id']}\ned25519 public  {info['ed25519_public']}\n"
            f"curve public    {info['curve_public_hex']} (z85 {info['curve_public']})")
