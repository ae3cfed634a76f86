"""The local harness: `nanoswarm cluster`, `demo`, `bench` and `load` start swarms on this machine."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import click

from .client import run_generation, sampling_params
from .params import POSITIVE, SECONDS, THREADS, client_keys, echo_or_serve_on, peer_list


@click.command()
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--nodes", type=click.IntRange(min=1), default=3, show_default=True,
              help="Layer spans: an even split of the blocks, each served by one node (or a head group).")
@click.option("--head-groups", type=click.IntRange(min=1), default=1, show_default=True,
              help="Nodes that split each span's attention heads and MLP (a head group); 1: whole blocks.")
@click.option("--threads", type=THREADS, default=1, show_default=True, help="torch threads per node.")
@click.option("--json", "as_json", is_flag=True,
              help="Once every node serves, print one JSON object (nodes: contact, layers, heads, pid), not lines.")
def cluster(model_dir: Path, nodes: int, head_groups: int, threads: int, as_json: bool) -> None:
    """Start local node processes for --nodes even spans of the blocks (--head-groups nodes each);
    Ctrl-C stops them."""
    from nanoswarm.node.cluster import LocalCluster, span_of

    harness = LocalCluster(model_dir, _specs(model_dir, nodes, head_groups), threads)
    ready = False
    try:
        harness.start()
        if as_json:
            report = json.dumps({"nodes": [{"contact": n.address, "layers": list(n.spec.layers),
                                            "heads": list(n.spec.heads) if n.spec.heads else None, "pid": n.pid}
                                           for n in harness.nodes]})
        else:
            report = "\n".join([*(f"{n.address} {span_of(n.spec)} pid {n.pid}" for n in harness.nodes), "ready"])
        echo_or_serve_on(report, "the nodes' contacts")  # `| head -1` does not stop the swarm
        ready = True
        while True:  # until Ctrl-C (or SIGTERM): the normal way to stop a cluster, exit code 0
            dead = next((n for n in harness.nodes if n.proc.poll() is not None), None)
            if dead is not None:
                how = _ended(dead.proc.returncode)
                raise click.ClickException(f"node {span_of(dead.spec)} (pid {dead.pid}) {how}; stopping the cluster")
            time.sleep(0.5)
    except KeyboardInterrupt:
        if not ready:  # interrupted while starting: not a cluster that ran
            raise
    finally:
        harness.stop()


def _ended(code: int) -> str:
    """How a process ended, from its return code (negative: the signal that killed it)."""
    if code >= 0:
        return f"exited with code {code}"
    try:
        return f"was killed by {signal.Signals(-code).name}"
    except ValueError:  # a real-time signal has no name
        return f"was killed by signal {-code}"


def _specs(model_dir: Path, nodes: int, head_groups: int) -> list:
    """The nodes of a local swarm of `nodes` spans (node/cluster.py swarm_specs); bad counts are
    usage errors."""
    from nanoswarm.node.cluster import swarm_specs
    from nanoswarm.shards.manifest import read_manifest

    config = read_manifest(model_dir).config
    try:
        return swarm_specs(config.n_layer, config.n_head, nodes, head_groups)
    except ValueError as e:
        raise click.UsageError(str(e)) from None


@click.command()
@click.argument("prompt", default="ROMEO:")
@click.option("--model", "model_dir", default=None, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Model directory (default: the demo model shipped with nanoswarm).")
@click.option("--nodes", type=click.IntRange(min=1), default=3, show_default=True,
              help="Layer spans: an even split of the blocks, each served by one node (or a head group).")
@click.option("--head-groups", type=click.IntRange(min=1), default=1, show_default=True,
              help="Nodes that split each span's attention heads and MLP (a head group); 1: whole blocks.")
@click.option("--max-new-tokens", type=click.IntRange(min=0), default=120, show_default=True)
@click.option("--temperature", type=float, default=0.8, show_default=True)
@click.option("--top-k", type=click.IntRange(min=0), default=40, show_default=True,
              help="Sample among the K likeliest tokens only; 0: among all.")
@click.option("--top-p", type=float, default=None,
              help="Sample among the likeliest tokens that together hold this share of probability (0 to 1].")
@click.option("--seed", type=int, default=None, help="Seed the sampling: the same seed gives the same text.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object at the end instead.")
def demo(prompt: str, model_dir: Path | None, nodes: int, head_groups: int, max_new_tokens: int, temperature: float,
         top_k: int, top_p: float | None, seed: int | None, as_json: bool) -> None:
    """Start a local swarm on the demo model (--nodes layer spans, each served by one node, or by
    --head-groups nodes that split its heads) and generate from PROMPT (default "ROMEO:")."""
    from nanoswarm.client.api import SwarmModel, check_prompt_length, prompt_ids
    from nanoswarm.keys.contact import endpoint_of
    from nanoswarm.node.cluster import LocalCluster, span_of
    from nanoswarm.shards.demo import demo_model_dir
    from nanoswarm.shards.manifest import read_manifest

    sampling = sampling_params(temperature, top_k or None, top_p, seed)  # bad values fail before any node starts
    model_dir = model_dir or demo_model_dir()
    try:  # a prompt past the context too (it was found with the swarm up, and the nodes' log kept)
        check_prompt_length(prompt_ids(prompt), read_manifest(model_dir).config.block_size)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    # The nodes' own logs would drown the text on the terminal: they go to a file unless -v.
    verbose = logging.getLogger().level < logging.WARNING
    specs = _specs(model_dir, nodes, head_groups)  # a bad --nodes or --head-groups fails before the log exists
    log_file = None if verbose else tempfile.NamedTemporaryFile("w", prefix="nanoswarm-demo-", suffix=".log",
                                                                delete=False)
    harness = LocalCluster(model_dir, specs, threads=1, stderr=log_file)
    click.echo(f"starting {len(specs)} local node{'s' * (len(specs) > 1)} for {model_dir}"
               + (f" (node logs: {log_file.name}, kept if it fails)" if log_file else "") + " ...", err=True)
    done = False
    try:
        with harness:
            for n in harness.nodes:
                click.echo(f"  node {endpoint_of(n.address)} {span_of(n.spec)}", err=True)
            model = SwarmModel.connect(model_dir, peers=harness.addresses)
            try:
                run_generation(model, prompt, max_new_tokens, sampling, as_json)
            finally:
                model.close()
        done = True
    except (KeyboardInterrupt, BrokenPipeError):
        # The user stopped it, or stopped reading (`demo | head -1`; the CLI says so in one line):
        # nothing went wrong that the nodes' logs would show
        done = True
        raise
    finally:
        if log_file is not None:  # the nodes' logs matter only when something went wrong
            log_file.close()
            if done:
                os.unlink(log_file.name)
            else:
                said = _last_error(log_file.name)  # (a node that failed to start says why only there: review207)
                click.echo(f"node logs kept in {log_file.name}" + (f" (the last error there: {said})" if said else ""),
                           err=True)


def _last_error(log_path: str) -> str | None:
    """The last `error: ...` line a node wrote to the demo's log (a failed node's one line)."""
    try:
        with open(log_path, errors="replace") as f:
            lines = [line.strip() for line in f if line.startswith("error: ")]
    except OSError:
        return None
    return lines[-1][len("error: "):][:300] if lines else None


@click.command()
@click.option("--model", "model_dir", default=None, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Benchmark this model directory instead of random weights of --shape.")
@click.option("--shape", type=click.Choice(["gpt2-small", "tiny"]), default="gpt2-small", show_default=True,
              help="Random weights of this shape: gpt2-small (12 blocks, 768 wide) or tiny (4 blocks, 128 wide).")
@click.option("--stages", default=None, show_default="1,2,4, as many as the model has blocks for",
              help="Layer stages (nodes) to try.")
@click.option("--sessions", default="1,8", show_default=True,
              help="Concurrent sessions to try (at most 128, a node's default limit).")
@click.option("--head-groups", type=click.IntRange(min=0), default=2, show_default=True,
              help="Head-shard nodes in a group; 0 skips.")
@click.option("--wires", default="float16,bfloat16,q80", show_default=True,
              help="Wire formats tried besides float32, on the largest route.")
@click.option("--links", default="relay,star", show_default=True,
              help="relay (nodes pass steps on) or star (every stage answers the client): the first on "
                   "every route, the others on the largest too.")
@click.option("--tokens", type=click.IntRange(min=1), default=32, show_default=True,
              help="Decode steps per round.")
@click.option("--prompt-len", type=click.IntRange(min=1), default=128, show_default=True,
              help="Prompt tokens each round prefills.")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True,
              help="Rounds per side and route.")
@click.option("--threads", type=THREADS, default=2, show_default=True,
              help="torch threads, here and per node.")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Keep random-weight model dirs here (reused next time) instead of a temp dir.")
@click.option("--quick", is_flag=True, help="A smoke test, not a measurement: --tokens 4 --prompt-len 16 "
              "--repeats 1 unless given, and 4 tokens per concurrent session (16 otherwise).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
def bench(model_dir: Path | None, shape: str, stages: str | None, sessions: str, head_groups: int, wires: str,
          links: str, tokens: int, prompt_len: int, repeats: int, threads: int, work_dir: Path | None, quick: bool,
          as_json: bool) -> None:
    """Local vs swarm speed on loopback: decode, prefill, per-stage overhead, bytes, batching."""
    from nanoswarm.bench import BenchOptions, check_options, format_report, parse_ints, parse_names, run_bench
    from nanoswarm.shards.manifest import ManifestError

    given = click.get_current_context().get_parameter_source
    default = click.core.ParameterSource.DEFAULT
    if model_dir is not None and given("shape") != default:
        raise click.UsageError("--shape is for random weights; --model benchmarks that model's shape")
    if quick:  # smaller defaults; what the user gave stays
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
    try:
        check_options(opts)
    except ManifestError as e:  # not a usage error: the same exit status as every command's
        raise click.ClickException(str(e)) from None
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    result = run_bench(opts)
    if quick:  # its figures say nothing about the targets
        result["quick"] = True
        for t in result["targets"]:
            t["met"] = None
    click.echo(json.dumps(result) if as_json else format_report(result))


@click.command()
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--peers", default=None, help="Comma-separated node contacts; default: start a local swarm. "
              "One that does not answer at the start is left out (the run is then NOT OK) if the others cover "
              "the model.")
@click.option("--nodes", type=click.IntRange(min=1), default=2, show_default=True,
              help="Layer spans of the local swarm, each served by one node (or a head group).")
@click.option("--head-groups", type=click.IntRange(min=1), default=1, show_default=True,
              help="Nodes that split each span's attention heads and MLP (a head group); 1: whole blocks.")
@click.option("--node-args", default="", help="Options for the started nodes, e.g. '--max-sessions 32' "
              "(not those load sets: --listen, --layers, --heads, --key-file, --json).")
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
              help="Largest logit difference from a solo run, over the largest solo logit (at least 1), "
                   "that counts as equal; above 0 (default: by the nodes' device and dtype, 1e-5 for float32 "
                   "on a CPU).")
@click.option("--key-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Use this identity's CURVE key (private swarms); default: fresh keys.")
@click.option("--insecure", is_flag=True, help="Allow unencrypted links to nodes that run without a key.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the summary.")
def load(model_dir: Path, peers: str | None, nodes: int, head_groups: int, node_args: str, sessions: int,
         duration: float, prompt_tokens: int, new_tokens: int, max_length: int | None, timeout: float, no_verify: bool,
         tolerance: float | None, key_file: Path | None, insecure: bool, as_json: bool) -> None:
    """Concurrent sessions against a swarm: served, refused, failed, latency, node memory.
    Exits 1 unless a session completed, nothing failed, every node still answers (a crash and a
    leave look the same), memory stayed bounded and logits matched."""
    import shlex

    if peers is None:
        _specs(model_dir, nodes, head_groups)  # a usage error, as cluster's and demo's (review185)
    else:
        if not peer_list(peers, "--peers"):
            raise click.UsageError("--peers: no contact given (leave it out to start a local swarm)")
        if click.get_current_context().get_parameter_source("nodes") != click.core.ParameterSource.DEFAULT:
            raise click.UsageError("--nodes applies to the swarm load starts, not to --peers")

    from nanoswarm.client.load import LoadOptions, LoadOptionsError, run_load
    from nanoswarm.client.load_report import format_report
    try:
        extra = shlex.split(node_args)
    except ValueError as e:  # an unclosed quote
        raise click.UsageError(f"--node-args: {e}") from None
    _check_node_args(model_dir, extra)
    # (Every session holds a link, and its monitor, to each node of its route: the command line
    # raised the open-file limit to the hard one, descriptors.raise_limit.)
    try:
        report = run_load(LoadOptions(model_dir, peer_list(peers), nodes, head_groups, extra,
                                      sessions=sessions, duration=duration, prompt_tokens=prompt_tokens,
                                      new_tokens=new_tokens, max_length=max_length, timeout=timeout,
                                      verify=not no_verify, tolerance=tolerance, client_keys=client_keys(key_file),
                                      insecure=insecure))
    except LoadOptionsError as e:  # (exit 1 before, as a run's failure: review188)
        raise click.UsageError(str(e)) from None
    click.echo(json.dumps(report.to_json()) if as_json else format_report(report))
    if not report.ok:
        sys.exit(1)


def _check_node_args(model_dir: Path, args: list[str]) -> None:
    """--node-args parsed as `nanoswarm node` would, here: a mistake is one line, not one from
    each node as it exits, then the load's (review207)."""
    from .node import node as node_command

    try:  # (no --help there: it would print the node's help)
        node_command.make_context("node", [str(model_dir), *args], help_option_names=[])
    except click.ClickException as e:
        raise click.UsageError(f"--node-args: {e.format_message()}") from None
