"""The `nanoswarm` command: parses options and calls the rooms (shards, node, client, keys).

Results go to stdout; logs and progress to stderr. A failure exits non-zero with one line.
"""

from __future__ import annotations

# The package's __init__ has set the OpenMP wait defaults before anything imports torch.
import functools
import json
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import click


def _range(value: str | None, what: str) -> tuple[int, int] | None:
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
    """A positive, finite number (a float option would take 0, -1, nan and inf)."""

    def __init__(self, what: str):
        self.what = what
        self.name = what.split()[-1]

    def convert(self, value, param, ctx) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a {self.what}", param, ctx)
        if not 0 < number < float("inf"):
            self.fail(f"{value!r} must be a positive, finite {self.what}", param, ctx)
        return number


SECONDS = _Positive("number of seconds")
POSITIVE = _Positive("number")


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")


def _fail(message: str, code: int) -> None:
    """Exit with one `error:` line: an exception's text can span lines (torch's do) or be empty
    (MemoryError's), and either way the user gets one line that says something."""
    click.echo(f"error: {' '.join(message.split())}", err=True)
    sys.exit(code)


# click >= 8.2 signals "no arguments: show the help" as a UsageError; that is no failure.
_NO_ARGS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


def _help(e: click.UsageError) -> None:
    """`nanoswarm` or `nanoswarm keys` alone: the help is what was asked for, on stdout."""
    click.echo(e.ctx.get_help() if e.ctx is not None else e.format_message())
    sys.exit(0)


class _CleanErrors(click.Group):
    """Expected failures print one line, not a traceback or a usage block."""

    def make_context(self, info_name, args, parent=None, **extra):
        # The top-level options are parsed here, before invoke(): `nanoswarm --bogus`.
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except _NO_ARGS_HELP as e:
            _help(e)
        except click.ClickException as e:
            _fail(e.format_message(), e.exit_code)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except _NO_ARGS_HELP as e:
            _help(e)
        except click.ClickException as e:  # bad options of a subcommand (exit code 2, as click's), or ours
            _fail(e.format_message(), e.exit_code)
        except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM/SIGHUP (Interrupted): cleaned up on the way
            sys.exit(128 + getattr(e, "signum", signal.SIGINT))  # the shell's convention: 130 for Ctrl-C
        except (click.exceptions.Exit, click.Abort):
            raise
        except Exception as e:  # noqa: BLE001 - the top of the program
            if os.environ.get("NANOSWARM_DEBUG"):
                raise
            _fail(str(e) or type(e).__name__, 1)


@click.group(cls=_CleanErrors)
@click.option("-v", "--verbose", count=True, help="More logging on stderr (-v info, -vv debug).")
def main(verbose: int) -> None:
    """nanoswarm: run a GPT across peers that each hold a slice of it."""
    _setup_logging(verbose)
    # `kill`, `timeout`, a service manager or a closed terminal end a command as Ctrl-C does, so
    # its cleanup runs: nodes stopped, key files and temporary models removed, sessions closed
    # on the nodes. (A node installs its own handlers: it leaves the swarm gracefully.)
    if threading.current_thread() is threading.main_thread():  # (click's test runner may call us elsewhere)
        for signum in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, _interrupt)


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the program is, like Ctrl-C's KeyboardInterrupt."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _interrupt(signum: int, frame: object) -> None:
    raise Interrupted(signum)


# ----- shards ------------------------------------------------------------------------------
@main.command()
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--layers-per-shard", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--head-groups", type=int, default=None, help="Also write head-sliced files, G groups.")
@click.option("--heads", "heads_spec", default=None, help="Explicit head split, e.g. 0:6,6:12.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32",
              show_default=True, help="Storage dtype of the shard files.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def shard(source: Path, out_dir: Path, layers_per_shard: int, head_groups: int | None,
          heads_spec: str | None, dtype: str, as_json: bool) -> None:
    """Cut a checkpoint (nanoGPT ckpt.pt or Hugging Face GPT-2 dir) into a model directory."""
    import torch

    from nanoswarm.shards.loaders import check_tokenizer_vocab, load_checkpoint
    from nanoswarm.shards.manifest import parse_head_splits, write_model_dir

    shards_log = logging.getLogger("nanoswarm.shards")  # its progress lines, -v or not
    shards_log.setLevel(min(shards_log.getEffectiveLevel(), logging.INFO))
    config, state = load_checkpoint(source)
    check_tokenizer_vocab(config, str(source))
    splits = parse_head_splits(heads_spec, head_groups, config.n_head)
    manifest = write_model_dir(config, state, out_dir, layers_per_shard, splits, getattr(torch, dtype))
    if as_json:
        click.echo(json.dumps({"model_id": manifest.model_id, **json.loads(manifest.to_json())}))
    else:
        click.echo(f"{out_dir}: model {manifest.model_id[:16]}, {len(manifest.files)} files")


@main.command()
@click.option("--out", "out_path", type=click.Path(path_type=Path), default=Path("out/ckpt.pt"), show_default=True,
              help="Where to write the nanoGPT-style checkpoint (the best by validation loss).")
@click.option("--text", "text_path", type=click.Path(exists=True, path_type=Path), default=None,
              help="Training text (default: tiny Shakespeare shipped with nanoswarm).")
@click.option("--n-layer", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--n-head", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--n-embd", type=click.IntRange(min=1), default=192, show_default=True)
@click.option("--block-size", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--max-iters", type=click.IntRange(min=0), default=700, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--lr", type=POSITIVE, default=2e-3, show_default=True)
@click.option("--seed", type=click.IntRange(0, 2**64 - 1), default=1337, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--overwrite", is_flag=True,
              help="Replace an existing --out (the run writes its first checkpoint within seconds).")
@click.option("--resume", is_flag=True,
              help="Continue the interrupted run that wrote --out (the same settings), from its best eval point.")
@click.option("--json", "as_json", is_flag=True, help="Print the run's summary as one JSON object.")
def train(out_path: Path, text_path: Path | None, n_layer: int, n_head: int, n_embd: int, block_size: int,
          max_iters: int, batch_size: int, lr: float, seed: int, threads: int, overwrite: bool,
          resume: bool, as_json: bool) -> None:
    """Train a small GPT-2-architecture model on a text file, on the CPU (progress on stderr)."""
    from nanoswarm.shards import train as training
    from nanoswarm.shards.model import ModelConfig

    if out_path.is_dir():
        raise click.ClickException(f"--out {out_path} is a directory; give the checkpoint file, e.g. "
                                   f"{out_path / 'ckpt.pt'}")
    if resume and overwrite:
        raise click.UsageError("--resume continues --out; --overwrite replaces it: give one")
    if resume and not out_path.is_file():
        raise click.ClickException(f"--resume: no checkpoint at {out_path}")
    if out_path.exists() and not (overwrite or resume):
        raise click.ClickException(f"{out_path} exists: pass --resume to continue it or --overwrite to replace it")

    config = ModelConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, gelu="exact")
    summary = training.train(text_path or training.DEFAULT_TEXT, out_path, config, max_iters=max_iters,
                             batch_size=batch_size, lr=lr, seed=seed, threads=threads, resume=resume)
    if as_json:
        click.echo(json.dumps({k: v for k, v in summary.items() if k != "history"}))
    else:
        click.echo(f"{summary['out_path']}: {summary['n_params']:,} parameters, validation loss "
                   f"{summary['val_loss']:.4f} (unigram {summary['unigram_val_loss']:.4f})")


# ----- node --------------------------------------------------------------------------------
@main.command()
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
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch threads (default: torch's choice).")
# Limits (node/sessions.py NodeLimits; the shown defaults are its own, tests/test_cli.py checks).
@click.option("--max-sessions", type=click.IntRange(min=1), default=None, show_default="128")
@click.option("--kv-budget-mb", type=click.IntRange(min=1), default=None, show_default="2048",
              help="Total KV-cache memory for sessions.")
@click.option("--max-session-length", type=click.IntRange(min=1), default=None,
              show_default="4096, at most the context", help="Positions one session may hold.")
@click.option("--max-tokens-per-step", type=click.IntRange(min=1), default=None, show_default="1024")
@click.option("--max-message-mb", type=click.IntRange(min=1), default=None, show_default="64")
@click.option("--max-inflight", type=click.IntRange(min=1), default=None, show_default="16",
              help="Requests in flight per peer.")
@click.option("--idle-timeout", type=SECONDS, default=None, show_default="300",
              help="Seconds before an idle session is reclaimed.")
@click.option("--max-batch-seconds", type=SECONDS, default=None, show_default="5",
              help="Compute per batch before its remaining requests are refused busy.")
@click.option("--key-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Node identity (default: one in the user config dir, created on first run).")
@click.option("--bootstrap", multiple=True, help="Contact (ADDRESS#KEY) of a swarm node; repeat or comma-separate.")
@click.option("--allow-keys", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Private swarm: accept only these CURVE public keys (one a line).")
@click.option("--insecure", is_flag=True, help="No encryption on this node's socket (ZeroMQ CURVE off).")
@click.option("--num-blocks", type=click.IntRange(min=1), default=None,
              help="Without --layers: serve this many blocks.")
@click.option("--memory-budget-mb", type=click.IntRange(min=1), default=None,
              help="Without --layers: memory for weights (default: a quarter of available RAM; on a GPU, "
                   "45% of its free memory less the KV budget).")
@click.option("--ttl", type=SECONDS, default=60.0, show_default=True, help="Lifetime of the node's signed record.")
@click.option("--gossip-interval", type=SECONDS, default=1.0, show_default=True, help="Seconds between gossip rounds.")
@click.option("--rebalance-interval", type=SECONDS, default=30.0, show_default=True,
              help="Without --layers: seconds between checks whether to serve other blocks.")
@click.option("--json", "as_json", is_flag=True,
              help="Once serving, print one JSON object (listening, peer_id, model_id, layers, heads) "
                   "instead of `listening CONTACT`.")
def node(model_dir: Path, layers: str | None, heads: str | None, listen: str, advertise: str | None, device: str,
         dtype: str, threads: int | None, max_sessions, kv_budget_mb, max_session_length,
         max_tokens_per_step, max_message_mb, max_inflight, idle_timeout, max_batch_seconds, key_file: Path | None,
         bootstrap: tuple[str, ...], allow_keys: Path | None, insecure: bool, num_blocks: int | None,
         memory_budget_mb: int | None, ttl: float, gossip_interval: float, rebalance_interval: float,
         as_json: bool) -> None:
    """Serve blocks of MODEL_DIR to the swarm until SIGTERM or Ctrl-C."""
    import dataclasses

    from nanoswarm.node.daemon import NodeOptions, run_node
    from nanoswarm.node.sessions import NodeLimits

    overrides = {k: v for k, v in {
        "max_sessions": max_sessions,
        "kv_budget_bytes": kv_budget_mb * 2**20 if kv_budget_mb is not None else None,
        "max_session_length": max_session_length, "max_tokens_per_step": max_tokens_per_step,
        "max_message_bytes": max_message_mb * 2**20 if max_message_mb is not None else None,
        "max_inflight_per_peer": max_inflight, "idle_timeout": idle_timeout,
        "max_batch_seconds": max_batch_seconds}.items() if v is not None}
    limits = dataclasses.replace(NodeLimits(), **overrides)
    logging.getLogger("nanoswarm").setLevel(min(logging.getLogger().level, logging.INFO))
    run_node(NodeOptions(model_dir, _range(layers, "--layers"), _range(heads, "--heads"), listen,
                         device, dtype, threads, limits, key_file=key_file,
                         bootstrap=_peer_list(",".join(bootstrap)), allow_keys=allow_keys, insecure=insecure,
                         ttl=ttl, gossip_interval=gossip_interval, num_blocks=num_blocks,
                         memory_budget_mb=memory_budget_mb, rebalance_interval=rebalance_interval,
                         advertise=advertise), functools.partial(_print_ready, as_json))


def _print_ready(as_json: bool, ready: dict) -> None:
    """The node's one line on stdout once it serves: what the harness and scripts read."""
    if as_json:
        ready = {"listening": ready["contact"], **{k: v for k, v in ready.items() if k != "contact"}}
        click.echo(json.dumps(ready))
    else:
        click.echo(f"listening {ready['contact']}")
    sys.stdout.flush()


# ----- client ------------------------------------------------------------------------------
def _peer_list(peers: str | None) -> list[str]:
    return [p.strip() for p in (peers or "").split(",") if p.strip()]


@main.command()
@click.argument("prompt")
@click.option("--model", "model_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--peers", default=None, help="Comma-separated node contacts (ADDRESS#KEY, as nodes print them).")
@click.option("--bootstrap", multiple=True, help="Contact of any swarm node: the route comes from its table.")
@click.option("--key-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Use this identity's CURVE key (private swarms); default: a fresh key per run.")
@click.option("--insecure", is_flag=True, help="Allow unencrypted links to nodes that run without a key.")
@click.option("--max-new-tokens", type=click.IntRange(min=0), default=50, show_default=True)
@click.option("--temperature", type=float, default=1.0, show_default=True, help="0 is greedy.")
@click.option("--top-k", type=int, default=None)
@click.option("--top-p", type=float, default=None)
@click.option("--seed", type=int, default=None)
@click.option("--timeout", type=SECONDS, default=30.0, show_default=True, help="Seconds per peer answer.")
@click.option("--wire", type=click.Choice(["float32", "float16", "bfloat16", "q80"]), default="float32",
              show_default=True, help="Format of hidden states on the wire (float32 is exact).")
@click.option("--relay/--no-relay", default=True, show_default=True,
              help="Nodes pass steps (prompts too) on to the next stage themselves (one link per stage boundary).")
@click.option("--device", default="cpu", show_default=True,
              help="Where this client runs the model's head: cpu, cuda or cuda:N (nodes choose their own).")
@click.option("--verify", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Share of steps after which one stage's work is redone here with --model's blocks; a peer "
                   "that computed wrong is banned and its work redone.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object at the end instead.")
def generate(prompt: str, model_dir: Path, peers: str | None, bootstrap: tuple[str, ...], key_file: Path | None,
             insecure: bool, max_new_tokens: int, temperature: float,
             top_k: int | None, top_p: float | None, seed: int | None, timeout: float, wire: str,
             relay: bool, device: str, verify: float, as_json: bool) -> None:
    """Generate text from PROMPT through the swarm, streaming it to stdout."""
    from nanoswarm.client.api import SwarmModel
    from nanoswarm.client.generate import SamplingParams
    from nanoswarm.client.swarm import SwarmOptions
    from nanoswarm.node.daemon import resolve_device

    addresses, bootstraps = _peer_list(peers), _peer_list(",".join(bootstrap))
    if not addresses and not bootstraps:
        raise click.UsageError("give --bootstrap or --peers")
    sampling = SamplingParams(temperature, top_k, top_p, seed)  # bad values fail before connecting
    head_device = resolve_device(device)
    options = SwarmOptions(timeout=timeout, wire=wire, client_keys=_client_keys(key_file), insecure=insecure,
                           relay=relay, verify=verify)
    model = SwarmModel.connect(model_dir, peers=addresses, bootstrap=bootstraps, options=options, device=head_device)
    try:
        _run_generation(model, prompt, max_new_tokens, sampling, as_json)
    finally:
        model.close()


def _client_keys(key_file: Path | None) -> tuple[bytes, bytes] | None:
    """(CURVE public, secret) of an identity file, for private swarms; None: ephemeral keys."""
    if key_file is None:
        return None
    from nanoswarm.keys.identity import load_identity

    identity = load_identity(key_file)
    return identity.curve_public, identity.curve_secret


def _run_generation(model, prompt: str, max_new_tokens: int, sampling, as_json: bool) -> None:
    from nanoswarm.client.api import GenerationResult

    result = GenerationResult(prompt)
    notices = lambda line: click.echo(line, err=True)  # noqa: E731
    stream = model.stream(prompt, max_new_tokens, sampling, result, on_failover=notices)
    if as_json:
        for _ in stream:
            pass
        click.echo(json.dumps(result.to_json()))
    else:
        first = True
        for piece in stream:
            if first:
                click.echo(_route_line(result.route), err=True)
                click.echo(prompt, nl=False)
                first = False
            click.echo(piece, nl=False)
            sys.stdout.flush()
        if first:  # no new text (--max-new-tokens 0): the output is still prompt + new text
            click.echo(prompt, nl=False)
        click.echo()
        s = result.stats
        checks = (f", {result.spot_checks} spot checks, {result.wrong_results} found wrong"
                  if result.spot_checks else "")
        click.echo(f"[{s.new_tokens} tokens, first after {s.time_to_first_token * 1000:.0f} ms, "
                   f"{s.tokens_per_second:.1f} tokens/s{checks}]", err=True)


def _route_line(route: list[dict]) -> str:
    from nanoswarm.keys.contact import endpoint_of

    parts = []
    for stage in route:  # endpoints only: the keys are in --json
        a, b = stage["layers"]
        heads = f" heads {stage['heads']}" if stage.get("heads") else ""
        parts.append(f"{a}:{b} @ {','.join(endpoint_of(p) for p in stage['peers'])}{heads}")
    return "route: " + " -> ".join(parts)


# ----- discovery and identities -----------------------------------------------------------
@main.command()
@click.option("--bootstrap", multiple=True, required=True, help="Contact (ADDRESS#KEY) of any swarm node.")
@click.option("--model", "model_dir", default=None, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Only this model's peers; its block count shows gaps at the end too.")
@click.option("--key-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Use this identity's CURVE key (private swarms).")
@click.option("--timeout", type=SECONDS, default=5.0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
def peers(bootstrap: tuple[str, ...], model_dir: Path | None, key_file: Path | None, timeout: float,
          as_json: bool) -> None:
    """Print the swarm as a bootstrap node sees it: peers, coverage per block, gaps."""
    from nanoswarm.client.discovery import fetch_table
    from nanoswarm.client.peers_report import format_report, swarm_report

    fetched = fetch_table(_peer_list(",".join(bootstrap)), timeout, _client_keys(key_file))
    if not fetched.answered:
        raise click.ClickException("no bootstrap node answered: " + "; ".join(fetched.errors.values()))
    fetched.warn_unanswered()
    n_layers, n_heads, model_id = None, None, None
    if model_dir is not None:
        from nanoswarm.shards.manifest import read_manifest

        manifest = read_manifest(model_dir)
        model_id, n_layers = manifest.model_id, {manifest.model_id: manifest.config.n_layer}
        n_heads = {manifest.model_id: manifest.config.n_head}
    report = swarm_report(fetched.table, n_layers, model_id, n_heads=n_heads)
    if as_json:
        click.echo(json.dumps({"models": report, "rejected": dict(fetched.table.rejected),
                               "bootstrap": fetched.answered}))
    else:
        click.echo(format_report(report))
        if fetched.table.rejected:
            click.echo(f"rejected records: {dict(fetched.table.rejected)}")


@main.group()
def keys() -> None:
    """Node identities: an Ed25519 signing key and a CURVE key pair in one 0600 file."""


@keys.command("generate")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Key file to write (default: the node's default key file).")
@click.option("--force", is_flag=True, help="Replace an existing file.")
@click.option("--json", "as_json", is_flag=True, help="Print the public parts and the file as JSON.")
def keys_generate(out: Path | None, force: bool, as_json: bool) -> None:
    """Create a new identity and print its public parts."""
    from nanoswarm.keys.identity import default_key_path, describe_identity, generate_identity, save_identity

    path = out or default_key_path()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    identity = generate_identity()
    save_identity(identity, path, overwrite=force)
    info = describe_identity(identity)
    if as_json:
        click.echo(json.dumps({**info, "key_file": str(path)}))
    else:
        click.echo(f"peer id     {info['peer_id']}\ncurve key   {info['curve_public_hex']} (z85 "
                   f"{info['curve_public']})\nkey file    {path}")


@keys.command("show")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True)
def keys_show(file: Path, as_json: bool) -> None:
    """Print the public parts of a key file (peer id, Ed25519 and CURVE public keys)."""
    from nanoswarm.keys.identity import describe_identity, load_identity

    info = describe_identity(load_identity(file))
    if as_json:
        click.echo(json.dumps(info))
    else:
        click.echo(f"peer id         {info['peer_id']}\ned25519 public  {info['ed25519_public']}\n"
                   f"curve public    {info['curve_public_hex']} (z85 {info['curve_public']})")


# ----- the local harness -------------------------------------------------------------------
@main.command()
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--nodes", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True, help="torch threads per node.")
@click.option("--json", "as_json", is_flag=True,
              help="Once every node serves, print one JSON object (nodes: contact, layers, pid), not lines.")
def cluster(model_dir: Path, nodes: int, threads: int, as_json: bool) -> None:
    """Start NODES local node processes with an even split of the blocks; Ctrl-C stops them."""
    from nanoswarm.node.cluster import LocalCluster, NodeSpec, even_split
    from nanoswarm.shards.manifest import read_manifest

    n_layer = read_manifest(model_dir).config.n_layer
    harness = LocalCluster(model_dir, [NodeSpec(r) for r in even_split(n_layer, nodes)], threads)
    ready = False
    try:
        harness.start()
        if as_json:
            click.echo(json.dumps({"nodes": [{"contact": n.address, "layers": list(n.spec.layers), "pid": n.pid}
                                             for n in harness.nodes]}))
        else:
            for n in harness.nodes:
                click.echo(f"{n.address} layers {n.spec.layers[0]}:{n.spec.layers[1]} pid {n.pid}")
            click.echo("ready")
        sys.stdout.flush()
        ready = True
        while True:  # until Ctrl-C (or SIGTERM): the normal way to stop a cluster, exit code 0
            dead = next((n for n in harness.nodes if n.proc.poll() is not None), None)
            if dead is not None:
                raise click.ClickException(f"node layers {dead.spec.layers[0]}:{dead.spec.layers[1]} (pid "
                                           f"{dead.pid}) exited with code {dead.proc.returncode}; stopping the cluster")
            time.sleep(0.5)
    except KeyboardInterrupt:
        if not ready:  # interrupted while starting: not a cluster that ran
            raise
    finally:
        harness.stop()


@main.command()
@click.argument("prompt", default="ROMEO:")
@click.option("--model", "model_dir", default=None, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Model directory (default: the demo model shipped with nanoswarm).")
@click.option("--nodes", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(min=0), default=120, show_default=True)
@click.option("--temperature", type=float, default=0.8, show_default=True)
@click.option("--top-k", type=int, default=40, show_default=True)
@click.option("--seed", type=int, default=None)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object at the end instead.")
def demo(prompt: str, model_dir: Path | None, nodes: int, max_new_tokens: int, temperature: float,
         top_k: int, seed: int | None, as_json: bool) -> None:
    """Start a local swarm of NODES nodes on the demo model and generate from PROMPT."""
    from nanoswarm.client.api import SwarmModel
    from nanoswarm.client.generate import SamplingParams
    from nanoswarm.keys.contact import endpoint_of
    from nanoswarm.node.cluster import LocalCluster, NodeSpec, even_split
    from nanoswarm.shards.demo import demo_model_dir
    from nanoswarm.shards.manifest import read_manifest

    sampling = SamplingParams(temperature, top_k, None, seed)  # bad values fail before any node starts
    model_dir = model_dir or demo_model_dir()
    n_layer = read_manifest(model_dir).config.n_layer
    # The nodes' own logs would drown the text on the terminal: they go to a file unless -v.
    verbose = logging.getLogger().level < logging.WARNING
    specs = [NodeSpec(r) for r in even_split(n_layer, nodes)]  # a bad --nodes fails before the log exists
    log_file = None if verbose else tempfile.NamedTemporaryFile("w", prefix="nanoswarm-demo-", suffix=".log",
                                                                delete=False)
    harness = LocalCluster(model_dir, specs, threads=1, stderr=log_file)
    click.echo(f"starting {nodes} local nodes for {model_dir}"
               + (f" (node logs: {log_file.name})" if log_file else "") + " ...", err=True)
    done = False
    try:
        with harness:
            for n in harness.nodes:
                click.echo(f"  node {endpoint_of(n.address)} layers {n.spec.layers[0]}:{n.spec.layers[1]}", err=True)
            model = SwarmModel.connect(model_dir, peers=harness.addresses)
            try:
                _run_generation(model, prompt, max_new_tokens, sampling, as_json)
            finally:
                model.close()
        done = True
    except KeyboardInterrupt:
        done = True  # the user stopped it: nothing went wrong that the nodes' logs would show
        raise
    finally:
        if log_file is not None:  # the nodes' logs matter only when something went wrong
            log_file.close()
            if done:
                os.unlink(log_file.name)
            else:
                click.echo(f"node logs kept in {log_file.name}", err=True)


# ----- benchmark ---------------------------------------------------------------------------
@main.command()
@click.option("--model", "model_dir", default=None, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Benchmark this model directory instead of random weights of --shape.")
@click.option("--shape", type=click.Choice(["gpt2-small", "tiny"]), default="gpt2-small", show_default=True)
@click.option("--stages", default=None, show_default="1,2,4, as many as the model has blocks for",
              help="Layer stages (nodes) to try.")
@click.option("--sessions", default="1,8", show_default=True, help="Concurrent sessions to try.")
@click.option("--head-groups", type=click.IntRange(min=0), default=2, show_default=True,
              help="Head-shard nodes in a group; 0 skips.")
@click.option("--wires", default="float16,bfloat16,q80", show_default=True,
              help="Wire formats tried besides float32, on the largest route.")
@click.option("--links", default="relay,star", show_default=True,
              help="relay (nodes pass steps on) or star (every stage answers the client): the first on "
                   "every route, the others on the largest too.")
@click.option("--tokens", type=click.IntRange(min=1), default=32, show_default=True,
              help="Decode steps per round.")
@click.option("--prompt-len", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True,
              help="Rounds per side and route.")
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True,
              help="torch threads, here and per node.")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Keep random-weight model dirs here (reused next time) instead of a temp dir.")
@click.option("--quick", is_flag=True, help="A smoke test, not a measurement: --tokens 4 --prompt-len 16 "
              "--repeats 1 unless given.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
def bench(model_dir: Path | None, shape: str, stages: str | None, sessions: str, head_groups: int, wires: str,
          links: str, tokens: int, prompt_len: int, repeats: int, threads: int, work_dir: Path | None, quick: bool,
          as_json: bool) -> None:
    """Local vs swarm speed on loopback: decode, prefill, per-stage overhead, bytes, batching."""
    from nanoswarm.bench import BenchOptions, format_report, parse_ints, parse_names, run_bench

    if quick:  # smaller defaults; what the user gave stays
        given = click.get_current_context().get_parameter_source
        default = click.core.ParameterSource.DEFAULT
        tokens = 4 if given("tokens") == default else tokens
        prompt_len = 16 if given("prompt_len") == default else prompt_len
        repeats = 1 if given("repeats") == default else repeats
    try:
        patterns, wire_names = parse_names(links, "--links"), parse_names(wires, "--wires")
        counts = (None if stages is None else parse_ints(stages, "--stages")), parse_ints(sessions, "--sessions")
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    opts = BenchOptions(model_dir, shape, *counts, head_groups,
                        wire_names, patterns, tokens, prompt_len, repeats, session_tokens=4 if quick else 16,
                        threads=threads, work_dir=work_dir, progress=lambda line: click.echo(line, err=True))
    result = run_bench(opts)
    click.echo(json.dumps(result) if as_json else format_report(result))


# ----- load --------------------------------------------------------------------------------
@main.command()
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--peers", default=None, help="Comma-separated node contacts; default: start a local swarm.")
@click.option("--nodes", type=click.IntRange(min=1), default=2, show_default=True, help="Size of the local swarm.")
@click.option("--node-args", default="", help="Options for the started nodes, e.g. '--max-sessions 32'.")
@click.option("--sessions", type=click.IntRange(min=1), default=16, show_default=True,
              help="Concurrent client sessions.")
@click.option("--duration", type=SECONDS, default=10.0, show_default=True, help="Seconds.")
@click.option("--prompt-tokens", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--new-tokens", type=click.IntRange(min=0), default=16, show_default=True,
              help="Decode steps per session.")
@click.option("--max-length", type=click.IntRange(min=1), default=None,
              help="KV cache each session reserves (default: the positions it uses).")
@click.option("--timeout", type=SECONDS, default=30.0, show_default=True, help="Seconds per request.")
@click.option("--no-verify", is_flag=True, help="Skip comparing every step's logits to a solo run.")
@click.option("--tolerance", type=POSITIVE, default=None,
              help="Largest logit difference from a solo run that counts as equal (default: by the nodes' "
                   "device and dtype, 1e-5 for float32 on a CPU).")
@click.option("--key-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Use this identity's CURVE key (private swarms); default: fresh keys.")
@click.option("--insecure", is_flag=True, help="Allow unencrypted links to nodes that run without a key.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the summary.")
def load(model_dir: Path, peers: str | None, nodes: int, node_args: str, sessions: int, duration: float,
         prompt_tokens: int, new_tokens: int, max_length: int | None, timeout: float, no_verify: bool,
         tolerance: float | None, key_file: Path | None, insecure: bool, as_json: bool) -> None:
    """Concurrent sessions against a swarm: served, refused, failed, latency, node memory.
    Exits 1 unless nothing failed, no node crashed, memory stayed bounded and logits matched."""
    import shlex

    from nanoswarm.client.load import LoadOptions, run_load
    from nanoswarm.client.load_report import format_report
    from nanoswarm.node.daemon import raise_fd_limit

    raise_fd_limit()  # every session holds a link (and its monitor) to each node of its route
    report = run_load(LoadOptions(model_dir, _peer_list(peers), nodes, shlex.split(node_args),
                                  sessions=sessions, duration=duration, prompt_tokens=prompt_tokens,
                                  new_tokens=new_tokens, max_length=max_length, timeout=timeout,
                                  verify=not no_verify, tolerance=tolerance, client_keys=_client_keys(key_file),
                                  insecure=insecure))
    click.echo(json.dumps(report.to_json()) if as_json else format_report(report))
    if not report.ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
