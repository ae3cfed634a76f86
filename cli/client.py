"""`nanoswarm generate` and `nanoswarm peers`: a client of the swarm."""

from __future__ import annotations

import contextlib
import json
import logging
import logging.handlers
import queue
import re
import select
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import click

from .params import SECONDS, client_keys, peer_list

if TYPE_CHECKING:  # (imported when used: torch is slow to import for --help)
    from nanoswarm.client.api import GenerationResult, SwarmModel
    from nanoswarm.client.generate import SamplingParams


@click.command()
@click.argument("prompt", required=False)
@click.option("--prompts-file", type=click.File("r", encoding="utf-8"), default=None,
              help="Generate for every line of this file (`-`: stdin; empty lines skipped) at once, in step, "
                   "instead of PROMPT; each result printed in the file's order as soon as it and those "
                   "before it are done.")
@click.option("--at-once", type=click.IntRange(min=1), default=16, show_default=True,
              help="With --prompts-file: at most this many generations at a time.")
@click.option("--model", "model_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--peers", default=None, help="Comma-separated node contacts (ADDRESS#KEY, as nodes print them); "
              "with --bootstrap, used beside the peers its table names.")
@click.option("--bootstrap", multiple=True, help="Contact of any swarm node: the route comes from its table.")
@click.option("--key-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Use this identity's CURVE key, the one a private swarm's --allow-keys lists (every run: "
                   "$NANOSWARM_KEY_FILE is for nodes); default: a fresh key per link.")
@click.option("--insecure", is_flag=True, help="Allow unencrypted links to nodes that run without a key.")
@click.option("--max-new-tokens", type=click.IntRange(min=0), default=50, show_default=True)
@click.option("--temperature", type=float, default=1.0, show_default=True, help="0 is greedy.")
@click.option("--top-k", type=click.IntRange(min=0), default=None,
              help="Sample among the K likeliest tokens only; 0: among all.")
@click.option("--top-p", type=float, default=None,
              help="Sample among the likeliest tokens that together hold this share of probability (0 to 1].")
@click.option("--seed", type=int, default=None, help="Seed the sampling: the same seed gives the same text.")
@click.option("--timeout", type=SECONDS, default=30.0, show_default=True,
              help="Seconds per peer answer; a peer that stops answering heartbeats for a third of it "
                   "(at least 5 s) counts as gone sooner.")
@click.option("--wire", type=click.Choice(["float32", "float16", "bfloat16", "q80"]), default="float32",
              show_default=True, help="Format of hidden states on the wire (float32 is exact).")
@click.option("--relay/--no-relay", default=True, show_default=True,
              help="Nodes pass steps (prompts too) on to the next stage themselves (one link per stage "
                   "boundary), and a head group's members exchange their partial sums themselves (all-reduce).")
@click.option("--device", default="cpu", show_default=True,
              help="Where this client runs the model's head: cpu, cuda or cuda:N (nodes choose their own).")
@click.option("--verify", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Share of steps after which one stage's work is redone here with --model's blocks; a peer "
                   "that computed wrong is banned and its work redone.")
@click.option("--local", is_flag=True,
              help="Run every block in this process, no swarm: the reference a swarm's output must match.")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object at the end instead (with --prompts-file, one a line).")
def generate(prompt: str | None, prompts_file: TextIO | None, at_once: int, model_dir: Path, peers: str | None,
             bootstrap: tuple[str, ...], key_file: Path | None, insecure: bool, max_new_tokens: int,
             temperature: float, top_k: int | None, top_p: float | None, seed: int | None, timeout: float,
             wire: str, relay: bool, device: str, verify: float, local: bool, as_json: bool) -> None:
    """Generate text from PROMPT through the swarm, streaming it to stdout (or, with
    --prompts-file, from every line of a file at once: SwarmModel.generate_batch)."""
    from nanoswarm.client.api import PromptError, SwarmModel, check_prompts, new_tokens, prompt_ids
    from nanoswarm.client.swarm import SwarmOptions
    from nanoswarm.shards.device import resolve_device
    from nanoswarm.shards.manifest import read_manifest

    addresses, bootstraps = peer_list(peers, "--peers"), peer_list(",".join(bootstrap), "--bootstrap")
    if local and (addresses or bootstraps):
        raise click.UsageError("--local runs without a swarm: give it no --peers or --bootstrap")
    ctx = click.get_current_context()
    swarm_only = [f"--{name.replace('_', '-')}" + ("/--no-relay" if name == "relay" else "")
                  for name in ("verify", "key_file", "wire", "timeout", "insecure", "relay")
                  if ctx.get_parameter_source(name) != click.core.ParameterSource.DEFAULT]
    if local and swarm_only:
        raise click.UsageError(f"--local runs without a swarm: {', '.join(swarm_only)} "
                               f"{'does' if len(swarm_only) == 1 else 'do'} not apply")
    if not 0 <= verify <= 1:  # nan passes click's range
        raise click.UsageError(f"--verify must be a share of steps from 0 to 1, got {verify}")
    if not addresses and not bootstraps and not local:
        raise click.UsageError("give --bootstrap or --peers (or --local)")
    sampling = sampling_params(temperature, top_k or None, top_p, seed)  # bad values fail before connecting
    if (prompt is None) == (prompts_file is None):
        raise click.UsageError("give a PROMPT or --prompts-file, one of them")
    if prompts_file is None and ctx.get_parameter_source("at_once") != click.core.ParameterSource.DEFAULT:
        raise click.UsageError("--at-once goes with --prompts-file")
    prompts, lines = None, []  # the prompts, and the line of the file each is
    if prompts_file is not None:
        numbered = read_prompts(prompts_file)
        prompts, lines = [p for _, p in numbered], [n for n, _ in numbered]
        if not prompts:
            raise click.UsageError("--prompts-file holds no prompt (empty lines are skipped)")
    # The prompts checked against the model before a swarm is asked (a dead bootstrap was reported
    # before a prompt too long, and a good swarm connected for nothing).
    config = read_manifest(model_dir).config
    try:
        if prompts is not None:
            check_prompts(config, prompts, max_new_tokens)
        else:
            new_tokens(config, prompt_ids(prompt), max_new_tokens, warn=False)
    except PromptError as e:
        raise click.ClickException(f"--prompts-file line {lines[e.index]}: {e.why}") from None
    head_device = resolve_device(device)
    if local:
        model = SwarmModel.local(model_dir, device=head_device)
    else:
        options = SwarmOptions(timeout=timeout, wire=wire, client_keys=client_keys(key_file), insecure=insecure,
                               relay=relay, all_reduce=relay, verify=verify)
        model = SwarmModel.connect(model_dir, peers=addresses, bootstrap=bootstraps, options=options,
                                   device=head_device)
    try:
        if prompts is not None:
            run_batch(model, prompts, max_new_tokens, sampling, at_once, as_json)
        else:
            run_generation(model, prompt, max_new_tokens, sampling, as_json)
    finally:
        model.close()


class _WrittenByTheMainThread(logging.handlers.QueueHandler):
    """Other threads' log records wait in a queue for the main thread to write them
    (`write_waiting`); the main thread's own are written at once, after those waiting (its
    writes are the ones a signal cuts)."""

    def __init__(self, handlers: list[logging.Handler]):
        super().__init__(queue.SimpleQueue())
        self.handlers = handlers

    def handle(self, record: logging.LogRecord) -> bool:
        if threading.current_thread() is not threading.main_thread() or not self._room():
            # queued, formatted (QueueHandler.prepare); the main thread's too where a stream is
            # full: a batch stopping after a signal would block in the write (review184)
            return bool(super().handle(record))
        self.write_waiting()
        self._pass_on(record)
        return True

    def _room(self) -> bool:
        """Whether every handler's stream takes a write now (a full pipe does not)."""
        for handler in self.handlers:
            try:
                fd = handler.stream.fileno()  # type: ignore[attr-defined]
            except Exception:  # noqa: BLE001 - not a file (pytest's capture, a StringIO): it takes it
                continue
            poll = select.poll()
            poll.register(fd, select.POLLOUT)
            if not poll.poll(0):
                return False
        return True

    def write_waiting(self) -> None:
        while True:
            try:
                record = self.queue.get_nowait()
            except queue.Empty:
                return
            self._pass_on(record)

    def _pass_on(self, record: logging.LogRecord) -> None:
        for handler in self.handlers:
            if record.levelno >= handler.level:
                handler.handle(record)


@contextlib.contextmanager
def logs_written_here() -> Iterator[Callable[[], None]]:
    """Meanwhile the log records of other threads wait in a queue, and the function given
    writes those waiting on the calling (main) thread, as it does once more at the end but
    after a signal (stderr may be what is full: they are dropped); the main thread's own are
    written at once but where a stream is full (review183: the warning of a second Ctrl-C
    waited, unseen; review184: written into a full pipe, it blocked). A batch thread
    logging (a failover's warning) into a full stderr pipe blocked in the write holding the
    stream's lock, and the command then outlived every signal but SIGKILL (review182)."""
    root = logging.getLogger()
    handlers = root.handlers[:]
    held = _WrittenByTheMainThread(handlers)
    stopped = False
    try:
        root.handlers = [held]  # (in the try: a signal just after it puts them back, review183)
        yield held.write_waiting
    except KeyboardInterrupt:  # Ctrl-C, SIGTERM, SIGHUP: the command is asked to end
        stopped = True
        raise
    finally:
        root.handlers = handlers
        if not stopped:
            held.write_waiting()


def read_prompts(file: TextIO) -> list[tuple[int, str]]:
    """The non-empty lines of a prompts file, each with its number; a usage error naming the
    file where it is not UTF-8 text (review188: "'utf-8' codec can't decode byte 0xff", no file
    named; the line is not known: the text is decoded a block at a time)."""
    try:
        return [(n, line.rstrip("\r\n")) for n, line in enumerate(file, 1) if line.strip()]
    except UnicodeDecodeError as e:
        raise click.UsageError(f"--prompts-file {file.name}: not UTF-8 text ({e})") from None


def run_batch(model: SwarmModel, prompts: list[str], max_new_tokens: int, sampling: SamplingParams,
              at_once: int, as_json: bool) -> None:
    """The prompts' generations in step; each result printed in the file's order as soon as it
    and those before it are done (a failure of any, or a signal, is the command's: its one line,
    and no result after those printed), a line on stderr as each prompt is done."""
    finished: queue.SimpleQueue = queue.SimpleQueue()  # (k, result) as prompt k is done: from the batch's threads
    ready: dict[int, GenerationResult] = {}
    done, next_up = [0], [0]

    def show() -> None:
        """What `finished` holds, and the log records waiting, written on this (the main) thread:
        a write that blocks (a full pipe) is cut by Ctrl-C here, where one on a batch thread held
        the batch for good (review181)."""
        write_logs()
        while True:
            try:
                k, result = finished.get_nowait()
            except queue.Empty:
                return
            ready[k] = result
            done[0] += 1
            click.echo(f"[{done[0]}/{len(prompts)} prompts done]", err=True)
            while next_up[0] in ready:  # the next in the file's order
                result = ready.pop(next_up[0])
                if as_json:
                    click.echo(json.dumps(result.to_json()))
                else:  # each prompt and its text, an empty line between two
                    click.echo(("\n" if next_up[0] else "") + result.prompt + result.text, color=True)
                next_up[0] += 1
    t0 = time.perf_counter()
    with logs_written_here() as write_logs:
        results = model.generate_batch(prompts, max_new_tokens, sampling, at_once=at_once,
                                       on_done=lambda k, result: finished.put((k, result)), on_wait=show)
        seconds = time.perf_counter() - t0
        show()
    tokens = sum(len(r.ids) for r in results)
    click.echo(f"[{len(results)} prompts, {tokens} tokens in {seconds:.1f} s, "
               f"{tokens / seconds if seconds > 0 else 0:.1f} tokens/s in all]", err=True)


def sampling_params(temperature: float, top_k: int | None, top_p: float | None,
                    seed: int | None) -> SamplingParams:
    """SamplingParams of the command's options; a bad value is a usage error naming the option."""
    from nanoswarm.client.generate import SamplingParams

    try:
        return SamplingParams(temperature, top_k, top_p, seed)
    except ValueError as e:
        raise click.UsageError(re.sub(r"^(temperature|top_k|top_p|seed)\b",
                                      lambda m: "--" + m.group(1).replace("_", "-"), str(e))) from None


def run_generation(model: SwarmModel, prompt: str, max_new_tokens: int, sampling: SamplingParams,
                   as_json: bool) -> None:
    from nanoswarm.cli import forget_signals, raise_swallowed  # (the cli package imports this module)
    from nanoswarm.client.api import GenerationResult

    forget_signals()  # those of an earlier command in this process (one that ran to its end)
    result = GenerationResult(prompt)
    notices = lambda line: click.echo(line, err=True)  # noqa: E731
    stream = model.stream(prompt, max_new_tokens, sampling, result, on_failover=notices)
    if as_json:
        error = None
        try:
            for _ in stream:
                raise_swallowed()
        except Exception as e:
            error = " ".join((str(e) or type(e).__name__).split())  # as the command's error line says it
            raise
        finally:  # stopped (Ctrl-C, SIGTERM) or failed midway too: what came so far, stop_reason ""
            try:
                if result.route or result.stop_reason:  # a generation began (not a bad prompt, no route)
                    click.echo(json.dumps(result.to_json() | ({"error": error} if error else {})))
            finally:
                stream.close()  # its sessions closed now, also when the signal came here (raise_swallowed)
    else:
        first = True
        try:
            for piece in stream:
                if first:
                    click.echo(_route_line(result.route), err=True)
                    click.echo(prompt, nl=False, color=True)
                    first = False
                # color=True: click strips escape sequences when stdout is no terminal, and the
                # output is the prompt and the text exactly, in a file as on a screen.
                click.echo(piece, nl=False, color=True)
                raise_swallowed()
                sys.stdout.flush()
            if first:  # no new text (--max-new-tokens 0): the output is still prompt + new text
                click.echo(prompt, nl=False, color=True)
                first = False
        finally:  # the text's line ends, however the generation did
            try:
                if not first:
                    click.echo()
            finally:
                stream.close()
        s = result.stats
        checks = (f", {result.spot_checks} spot check{'s' * (result.spot_checks != 1)}, "
                  f"{result.wrong_results} found wrong"
                  if result.spot_checks else "")
        # Fewer tokens than asked for: why (--max-new-tokens reached needs no word)
        ended = {"eot": ", the model ended the text", "context": ", the context is full"}.get(result.stop_reason, "")
        click.echo(f"[{s.new_tokens} tokens, first after {s.time_to_first_token * 1000:.0f} ms, "
                   f"{s.tokens_per_second:.1f} tokens/s{checks}{ended}]", err=True)


def _route_line(route: list[dict]) -> str:
    from nanoswarm.keys.contact import endpoint_of

    parts = []
    for stage in route:  # endpoints only: the keys are in --json
        a, b = stage["layers"]
        heads = f" heads {','.join(f'{h}:{k}' for h, k in stage['heads'])}" if stage.get("heads") else ""
        heads += " (all-reduce)" if stage.get("all_reduce") else ""
        parts.append(f"{a}:{b} @ {','.join(endpoint_of(p) for p in stage['peers'])}{heads}")
    return "route: " + " -> ".join(parts)


@click.command()
@click.option("--bootstrap", multiple=True, required=True, help="Contact (ADDRESS#KEY) of any swarm node.")
@click.option("--model", "model_dir", default=None, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Only this model's peers; its block count shows gaps at the end too.")
@click.option("--key-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Use this identity's CURVE key (private swarms).")
@click.option("--timeout", type=SECONDS, default=5.0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
def peers(bootstrap: tuple[str, ...], model_dir: Path | None, key_file: Path | None, timeout: float,
          as_json: bool) -> None:
    """Print the swarm as a bootstrap node sees it: peers, coverage per block, gaps.

    Without --model, each model's block and head counts come from a manifest one of its peers
    sends, checked against the model's id; where none does, they are guessed from the records."""
    from nanoswarm.client.discovery import fetch_table
    from nanoswarm.client.peers_report import format_report, swarm_report

    contacts = peer_list(",".join(bootstrap), "--bootstrap")
    if not contacts:
        raise click.UsageError("--bootstrap: no contact given")
    n_layers, n_heads, model_id = None, None, None
    if model_dir is not None:
        from nanoswarm.shards.manifest import read_manifest

        manifest = read_manifest(model_dir)
        model_id, n_layers = manifest.model_id, {manifest.model_id: manifest.config.n_layer}
        n_heads = {manifest.model_id: manifest.config.n_head}
    # With the model's id a node sends all of that model's records, page by page; without, the
    # sample it gossips (at most 128 records), so a large swarm's list is not whole (a review).
    fetched = fetch_table(contacts, timeout, client_keys(key_file), model_id=model_id)
    if not fetched.answered:
        raise click.ClickException(fetched.no_answer())
    fetched.warn_unanswered()
    if model_dir is None:  # each model's counts from its peers' manifests, checked against its id
        from nanoswarm.client.manifests import manifests_from_peers

        models = {r.model_id for r in fetched.table.records()}
        manifests = manifests_from_peers(fetched.table, models, timeout, client_keys(key_file),
                                         first=fetched.answered)
        n_layers = {mid: m.config.n_layer for mid, m in manifests.items()}
        n_heads = {mid: m.config.n_head for mid, m in manifests.items()}
    report = swarm_report(fetched.table, n_layers, model_id, n_heads=n_heads)
    if as_json:
        click.echo(json.dumps({"models": report, "rejected": dict(fetched.table.rejected),
                               "bootstrap": fetched.answered}))
    else:
        click.echo(format_report(report))
        if fetched.table.rejected:
            click.echo(f"rejected records: {dict(fetched.table.rejected)}")
