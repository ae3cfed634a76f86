"""`nanoswarm node`: serve blocks of a model to the swarm."""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

import click

from .params import COUNT, INTERVAL, NEW_FILE, SECONDS, THREADS, echo_or_serve_on, parse_range, peer_list


@click.command()
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--layers", default=None, help="Blocks to serve, half-open: 4:8 is blocks 4-7.")
@click.option("--heads", default=None, help="Serve only these heads of each block: 0:6 is heads 0-5.")
@click.option("--listen", default="tcp://127.0.0.1:*", show_default=True,
              help="ZeroMQ endpoint; a port of * picks a free one.")
@click.option("--advertise", default=None,
              help="tcp://HOST[:PORT] peers reach this node at, if not --listen's (NAT, port mapping, "
                   "a wildcard --listen); the port defaults to the one bound.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32",
              show_default=True)
@click.option("--threads", type=THREADS, default=None, help="torch threads (default: torch's choice).")
# Limits (node/sessions.py NodeLimits; the shown defaults are its own, tests/test_cli.py checks).
@click.option("--max-sessions", type=COUNT, default=None, show_default="128")
@click.option("--kv-budget-mb", type=COUNT, default=None, show_default="2048",
              help="Total KV-cache memory for sessions.")
@click.option("--max-session-length", type=COUNT, default=None,
              show_default="4096, at most the context", help="Positions one session may hold.")
@click.option("--max-tokens-per-step", type=COUNT, default=None, show_default="1024")
@click.option("--max-message-mb", type=COUNT, default=None, show_default="64")
@click.option("--max-inflight", type=click.IntRange(1, 1 << 20),  # (x4: a socket option, a C int)
              default=None, show_default="16",
              help="Requests in flight per peer.")
@click.option("--idle-timeout", type=SECONDS, default=None, show_default="300",
              help="Seconds before an idle session is reclaimed (stated to clients at open; "
                   "under 1, clients take its reclaims as faults). A client whose connection closes "
                   "loses its sessions at once.")
@click.option("--max-batch-seconds", type=SECONDS, default=None, show_default="5",
              help="Compute per batch before its remaining requests are refused busy.")
@click.option("--key-file", type=NEW_FILE, default=None,
              help="Node identity (default: one in the user config dir, created on first run).")
@click.option("--bootstrap", multiple=True, help="Contact (ADDRESS#KEY) of a swarm node; repeat or comma-separate.")
@click.option("--allow-keys", type=click.Path(exists=True, dir_okay=False, path_type=Path), multiple=True,
              help="Private swarm: accept only the CURVE public keys in this file (one a line: the nodes' "
                   "and the clients'); repeat for several files.")
@click.option("--insecure", is_flag=True, help="No encryption on this node's socket (ZeroMQ CURVE off).")
@click.option("--num-blocks", type=COUNT, default=None,
              help="Without --layers: serve this many blocks.")
@click.option("--memory-budget-mb", type=COUNT, default=None,
              help="Without --layers: memory for weights (default: a quarter of available RAM; on a GPU, "
                   "45% of its free memory less the KV budget).")
@click.option("--ttl", type=SECONDS, default=60.0, show_default=True, help="Lifetime of the node's signed record.")
@click.option("--gossip-interval", type=INTERVAL, default=1.0, show_default=True, help="Seconds between gossip rounds.")
@click.option("--rebalance-interval", type=INTERVAL, default=30.0, show_default=True,
              help="Without --layers: seconds between checks whether to serve other blocks.")
@click.option("--json", "as_json", is_flag=True,
              help="Once serving, print one JSON object (contact, listening, peer_id, model_id, layers, heads) "
                   "instead of `listening CONTACT`.")
def node(model_dir: Path, layers: str | None, heads: str | None, listen: str, advertise: str | None, device: str,
         dtype: str, threads: int | None, max_sessions: int | None, kv_budget_mb: int | None,
         max_session_length: int | None, max_tokens_per_step: int | None, max_message_mb: int | None,
         max_inflight: int | None, idle_timeout: float | None, max_batch_seconds: float | None, key_file: Path | None,
         bootstrap: tuple[str, ...], allow_keys: tuple[Path, ...], insecure: bool, num_blocks: int | None,
         memory_budget_mb: int | None, ttl: float, gossip_interval: float, rebalance_interval: float,
         as_json: bool) -> None:
    """Serve blocks of MODEL_DIR to the swarm until SIGTERM or Ctrl-C."""
    import dataclasses

    from nanoswarm.keys.identity import KeyFileError
    from nanoswarm.node.daemon import run_node
    from nanoswarm.node.gossip import GossipOptions
    from nanoswarm.node.options import NodeOptions, check_contacts, check_span, read_allow_lists
    from nanoswarm.node.sessions import NodeLimits
    from nanoswarm.shards.manifest import ManifestError

    overrides = {k: v for k, v in {
        "max_sessions": max_sessions,
        "kv_budget_bytes": kv_budget_mb * 2**20 if kv_budget_mb is not None else None,
        "max_session_length": max_session_length, "max_tokens_per_step": max_tokens_per_step,
        "max_message_bytes": max_message_mb * 2**20 if max_message_mb is not None else None,
        "max_inflight_per_peer": max_inflight, "idle_timeout": idle_timeout,
        "max_batch_seconds": max_batch_seconds}.items() if v is not None}
    limits = dataclasses.replace(NodeLimits(), **overrides)
    logging.getLogger("nanoswarm").setLevel(min(logging.getLogger().level, logging.INFO))
    opts = NodeOptions(model_dir, parse_range(layers, "--layers"), parse_range(heads, "--heads"), listen,
                       device, dtype, threads, limits, key_file=key_file,
                       bootstrap=peer_list(",".join(bootstrap)), allow_keys=allow_keys, insecure=insecure,
                       ttl=ttl, gossip_interval=gossip_interval, num_blocks=num_blocks,
                       memory_budget_mb=memory_budget_mb, rebalance_interval=rebalance_interval,
                       advertise=advertise)
    # A range beyond the model, an address no peer could use, or options that contradict each
    # other are usage errors (exit code 2), as a malformed range is.
    try:
        check_span(opts)
        GossipOptions(ttl=ttl, interval=gossip_interval).check()  # (exit 1 before: review191)
        read_allow_lists(allow_keys, insecure)  # (one that admits no one, or is not a list, too: review185)
        check_contacts(opts, warn=False)  # (node.daemon checks again, and warns)
    except ManifestError:
        raise
    except (ValueError, KeyFileError) as e:
        raise click.UsageError(str(e)) from None
    run_node(opts, functools.partial(_print_ready, as_json))


def _print_ready(as_json: bool, ready: dict) -> None:
    """The node's one line on stdout once it serves: what the harness and scripts read."""
    if as_json:
        # `contact`, as `cluster --json` names it; `listening` too, as the plain line says it
        ready = {"listening": ready["contact"], **ready}
    # No one may read it any more (a harness stopped by Ctrl-C while this node started): the node
    # serves on. (It ended with "error: [Errno 32] Broken pipe".)
    echo_or_serve_on(json.dumps(ready) if as_json else f"listening {ready['contact']}", "the node's contact")
