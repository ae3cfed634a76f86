"""Load runs (`nanoswarm load`): many concurrent client sessions against a swarm for a fixed time.

Each session is one client thread with its own sockets (a Swarm of its own). It opens a session
on every stage of the route, prefills a fixed prompt, then runs decode steps feeding fixed token
ids (so the input, and therefore the right logits, is known), computes the logits of every step
as a real client would, and closes. Refusals at the door (`busy`, `too_large`, `leaving`) are
counted by reason and the session is retried after a short pause; a step that an overloaded node
refuses (`busy`, the session untouched) is counted too and sent again after a pause. Anything
else (a timeout, a disconnect, `internal`, a bad reply) is a failure. Before the load, every distinct input runs once
alone ("solo"); every served step's logits are compared to the solo run's.

The report (client/load_report.py): requests served, refused by reason, failed by reason, request and step latency
(p50/p99), sessions completed, logits checked and the largest difference from solo, and each
node's peak memory: on a GPU node its device memory from the `info` reply, else resident
memory, VmHWM from /proc for nodes this run started, the `info` reply otherwise.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

import torch

from nanoswarm.keys.contact import split_contact
from nanoswarm.shards.manifest import read_manifest
from nanoswarm.shards.tokenizer import N_VOCAB
from nanoswarm.shards.weights import load_embeddings, load_head

from .generate import ClientModel
from .head_group import AllReduceFailed
from .load_nodes import node_reports
from .load_report import LoadReport
from .peer_errors import PeerError
from .route import RouteError
from .session import CANNOT_TAKE
from .stages import RemoteLayerStage, Stage
from .swarm import Swarm, SwarmOptions

log = logging.getLogger(__name__)
_T = TypeVar("_T")
PEERS_ONLY_HINT = " (load uses only the --peers given)"  # (it has no --bootstrap: review185)
REFUSALS = (*CANNOT_TAKE, "leaving")  # clean refusals: the client may retry or go elsewhere
SOLO_ATTEMPTS = 3  # a solo run refused (busy) or cut by a node that died (then routed around) is run again


class LoadOptionsError(ValueError):
    """Options of a load run that cannot hold together: the command line's usage errors (exit 2)."""


@dataclass
class LoadOptions:
    model_dir: Path
    peers: list[str] = field(default_factory=list)      # node contacts; empty: start a local swarm
    nodes: int = 2                                       # layer spans of the local swarm
    head_groups: int = 1                                 # nodes that split each span's heads; 1: whole
    node_args: list[str] = field(default_factory=list)   # further `nanoswarm node` options (limits)
    node_threads: int = 1                                # torch threads per started node
    sessions: int = 16                                   # concurrent client sessions
    duration: float = 10.0                               # seconds
    prompt_tokens: int = 8
    new_tokens: int = 16                                 # decode steps per session
    max_length: int | None = None                        # KV cache each session reserves; default: what it uses
    inputs: int = 8                                      # distinct inputs; session i uses i % inputs
    timeout: float = 30.0                                # seconds per request
    wire: str = "float32"
    verify: bool = True
    tolerance: float | None = None  # largest |logit - solo logit| / max(1, |solo logits|); None: by node dtype
    client_keys: tuple[bytes, bytes] | None = field(default=None, repr=False)  # CURVE identity (private swarms)
    insecure: bool = False                               # allow nodes that run without a key

    def swarm_options(self) -> SwarmOptions:
        return SwarmOptions(timeout=self.timeout, wire=self.wire, client_keys=self.client_keys,
                            insecure=self.insecure)


# ----- the run ------------------------------------------------------------------------------
def input_ids(k: int, n: int) -> list[int]:
    return torch.randint(0, N_VOCAB, (n,), generator=torch.Generator().manual_seed(1000 + k)).tolist()


class _Worker:
    """One client session after another, on sockets of its own, until the deadline."""

    def __init__(self, index: int, opts: LoadOptions, infos: dict[str, dict], client: ClientModel,
                 meta: tuple[str, int, int], solo: dict[int, torch.Tensor], deadline: float):
        self.index, self.opts, self.client, self.solo, self.deadline = index, opts, client, solo, deadline
        self.swarm = Swarm(*meta, opts.swarm_options())
        self.swarm.peers_only_hint = PEERS_ONLY_HINT
        for address, info in infos.items():  # asked once for all workers; each connects on its own
            self.swarm.add_info(address, info, curve_key=split_contact(address)[1])
        self.out = LoadReport(opts.sessions, opts.duration)
        self.rng = random.Random(index)
        self.backoff = 0.0  # seconds slept on `busy` steps: not part of a step's latency

    def run(self) -> None:
        try:
            n = 0
            while time.monotonic() < self.deadline:
                self._session((self.index + n * self.opts.sessions) % self.opts.inputs)
                n += 1
        except Exception as e:  # a bug here must show up as a failure, not vanish with the thread
            log.exception("load worker %d", self.index)
            self._fail("client_error", f"{type(e).__name__}: {e}")
        finally:
            self.swarm.close()

    def _fail(self, code: str, message: str) -> None:
        self.out.failed[code] += 1
        self.out.failure_samples.append(f"{code}: {message}"[:200])

    def _timed(self, fn: Callable[[], _T]) -> _T:
        t0 = time.perf_counter()
        result = fn()
        self.out.request_latency.append(time.perf_counter() - t0)
        self.out.served += 1
        return result

    def _session(self, k: int) -> None:
        opts = self.opts
        ids = input_ids(k, opts.prompt_tokens + opts.new_tokens)
        stages: list[Stage] = []
        failed = False
        try:
            # Not planned by max_length: the nodes are asked, and their refusals counted (too_large).
            for plan in self.swarm.plan():
                stage = self.swarm.make_stage(plan)
                stages.append(stage)  # before it opens: a head group's members that opened are closed below
                self._timed(lambda s=stage: s.open(opts.max_length or len(ids)))
            pos, chunk = 0, ids[:opts.prompt_tokens]
            for step in range(opts.new_tokens + 1):
                if time.monotonic() >= self.deadline:
                    return
                t0, slept = time.perf_counter(), self.backoff
                hidden = self.client.embed(chunk, pos)
                for stage in stages:
                    hidden = self._step(stage, hidden, pos)
                # The prompt's step apart: a 1,000-position prefill is not a token's latency.
                latency = self.out.step_latency if step else self.out.prefill_latency
                latency.append(time.perf_counter() - t0 - (self.backoff - slept))
                self._check(k, step, self.client.logits(hidden))
                pos += len(chunk)
                if step < opts.new_tokens:
                    chunk = [ids[pos]]
            self.out.sessions_completed += 1
        except AllReduceFailed:
            # A head group's all-reduce failed with no member at fault (client/head_group.py): no ban
            # (review130: the member that answered first, a healthy one, was banned for a frozen
            # one); the swarm meets those members by fan-out for a while, so a new session goes on.
            self.out.refused["all_reduce"] += 1
            time.sleep(self.rng.uniform(0.05, 0.25))
        except PeerError as e:
            # `not_served` or `wrong_model` from a node whose `info` now names another span or
            # model (restarted with others) is a refusal, as a client's open takes it (PeerTable.moved).
            if e.code in REFUSALS or self.swarm.moved(e):
                self.out.refused[e.code] += 1
                time.sleep(self.rng.uniform(0.05, 0.25))  # back off, then try a new session
            else:
                self._fail(e.code, str(e))
                # Routed around from now on, as a client's failover does: new sessions went
                # straight back to a killed node, ~600 failures a second (a review).
                self.swarm.ban(e.address, f"{e.code}: {e.message}", e.code)
                failed = True
        except RouteError as e:  # the peers stopped covering the model (one died, or moved)
            self._fail("no_route", str(e))
            failed = True
        finally:
            for stage in stages:  # tell the nodes; after a failure, then start on fresh sockets
                stage.close()
            if failed:
                self._reset()
                time.sleep(self.rng.uniform(0.05, 0.25))  # and a new session a little later

    def _step(self, stage: Stage, hidden: torch.Tensor, pos: int) -> torch.Tensor:
        """One stage's step; an overloaded node refuses it (`busy`) untouched, so wait and retry.
        A stage's step may be several node requests (a prompt in pieces the node takes): a layer
        stage's retry drops what the first ones stored (rewind), as a session's does; a head group
        asks its busy member again itself (retries_busy), and its `busy` ends the session as a
        refusal. (Those inner requests and retries are not counted here: `served` and `refused`
        count stage steps.)"""
        retry = False
        while True:
            try:
                rewind = retry and isinstance(stage, RemoteLayerStage)
                return self._timed(lambda r=rewind: stage.step(hidden, pos, rewind=r))
            except PeerError as e:
                if e.code != "busy" or time.monotonic() >= self.deadline or stage.retries_busy:
                    raise
                retry = True
                self.out.refused[e.code] += 1
                pause = self.rng.uniform(0.05, 0.25)
                time.sleep(pause)
                self.backoff += pause

    def _reset(self) -> None:
        """After a failure, fresh sockets (made again on first use): no late replies."""
        self.swarm.close_links()

    def _check(self, k: int, step: int, logits: torch.Tensor) -> None:
        if not self.opts.verify:
            return
        solo = self.solo[k][step]
        diff = (logits - solo).abs().max().item()
        relative = diff / max(1.0, solo.abs().max().item())  # rounding grows with the logits' size
        self.out.steps_checked += 1
        self.out.max_logit_diff = max(self.out.max_logit_diff, diff)
        self.out.max_relative_diff = max(self.out.max_relative_diff, relative)
        if not relative <= self.opts.tolerance:  # NaN counts as a mismatch
            self.out.mismatches += 1


# Batched decode takes other blocking paths than a session alone (docs/reliability.md): the
# logits differ by rounding, ~1e-6 in float32 on a CPU, more on a GPU and in half precision.
TOLERANCE = {("cpu", "float32"): 1e-5, ("cuda", "float32"): 1e-4, "float16": 2e-2, "bfloat16": 1e-1}


def default_tolerance(infos: Iterable[dict]) -> float:
    """The largest logit difference from a solo run, over the largest solo logit (at least 1),
    that counts as the same result, for the loosest node of the route (by its device and dtype,
    from `info`)."""
    worst = 1e-5
    for info in infos:
        device, dtype = str(info.get("device", "cpu")).split(":")[0], str(info.get("dtype", "float32"))
        worst = max(worst, TOLERANCE.get(dtype) or TOLERANCE.get((device, dtype), 1e-4))
    return worst


# A contact that gave one of these at the start did not answer (down, restarting, frozen), or went
# after its handshake (client/link_drops.py _why_dropped): the load runs without it if the others
# cover the model (review131 saw a run during churn stop for one). Not a drop in the handshake:
# that may be a refused key or a wrong contact, for the user to mend.
UNANSWERED = ("timeout: ", "unreachable: ", "disconnected: connection closed by the peer",
              "disconnected: connection lost: ")


def _peer_infos(opts: LoadOptions, meta: tuple[str, int, int]) -> tuple[dict[str, dict], dict[str, str]]:
    """Every peer's `info`, asked once for all workers, and the contacts that did not answer (why,
    by contact), left out of the run. A peer that cannot be used (a bad contact, no key, another
    model), or peers that do not cover the model without those left out, stop the run before the
    load."""
    wait, options = min(opts.timeout, 10.0), opts.swarm_options()
    # A frozen peer's kernel takes the connection, and nothing answers the handshake: with the
    # heartbeat (the handshake's limit too) under the wait, it read as a drop in the handshake,
    # which stops the run, not as a contact that did not answer (review136: --timeout 12).
    probe = Swarm(*meta, replace(options, heartbeat=max(options.silence, wait + 1.0)))
    probe.peers_only_hint = PEERS_ONLY_HINT
    try:
        probe.add_addresses(opts.peers, wait)
        skipped = {a: why for a, why in probe.rejected.items() if why.startswith(UNANSWERED)}
        if bad := {a: why for a, why in probe.rejected.items() if a not in skipped}:
            raise ValueError("; ".join(f"{a}: {why}" for a, why in bad.items()))
        probe.plan()  # the peers must cover the model: one clear error, not one per session
        for address, why in skipped.items():
            log.warning("peer %s did not answer at the start; the load runs without it (%s)", address, why)
        return {address: p.extra for address, p in probe.peers.items()}, skipped
    except RouteError as e:
        raise ValueError(str(e)) from None
    finally:
        probe.close()


def _solo_logits(opts: LoadOptions, infos: dict[str, dict], client: ClientModel,
                 meta: tuple[str, int, int]) -> dict[int, torch.Tensor]:
    """Every distinct input through the swarm alone, before the load: [steps, vocab] each."""
    worker = _Worker(0, opts, infos, client, meta, {}, float("inf"))
    captured: list[torch.Tensor] = []
    worker._check = lambda k, step, logits: captured.append(logits)  # type: ignore[method-assign]
    solo = {}
    try:
        for k in range(opts.inputs):
            for attempt in range(SOLO_ATTEMPTS):
                captured.clear()
                worker.out = LoadReport(opts.sessions, opts.duration)
                worker._session(k)  # a node that failed is routed around from then on
                if not worker.out.failed and len(captured) == opts.new_tokens + 1:
                    break
                why = "; ".join(worker.out.failure_samples) or "refused " + ", ".join(worker.out.refused)
                if attempt + 1 == SOLO_ATTEMPTS:
                    raise RuntimeError(f"the solo run of input {k} (its reference logits, before the load) "
                                       f"failed {SOLO_ATTEMPTS} times, the last: {why}")
                log.warning("the solo run of input %d failed (%s); again", k, why)
            solo[k] = torch.stack(captured)
    finally:
        worker.swarm.close()
    return solo


def run_load(opts: LoadOptions) -> LoadReport:
    """Start a local swarm unless peers are given, run the load, report."""
    manifest = read_manifest(opts.model_dir)
    config = manifest.config
    used = opts.prompt_tokens + opts.new_tokens
    if max(used, opts.max_length or 0) > config.block_size:
        what = (f"--max-length {opts.max_length}" if (opts.max_length or 0) > config.block_size
                else f"a session's {used} positions (prompt plus new tokens)")
        raise LoadOptionsError(f"{what} is longer than the model's context, {config.block_size} positions")
    if opts.max_length is not None and opts.max_length < used:
        raise LoadOptionsError(f"--max-length {opts.max_length} is shorter than a session's {used} positions "
                               "(prompt plus new tokens)")
    if opts.peers and (opts.node_args or opts.head_groups != 1):
        given = "--node-args applies" if opts.node_args else "--head-groups applies"
        raise LoadOptionsError(f"{given} to the swarm load starts, not to --peers")
    from nanoswarm.node.cluster import HARNESS_OPTIONS, LocalCluster, swarm_specs

    for arg in opts.node_args:
        if arg.partition("=")[0] in HARNESS_OPTIONS:
            raise LoadOptionsError(f"--node-args {arg.partition('=')[0]}: load sets that itself for the nodes "
                                   "it starts")
    cluster = None
    contacts, pids = list(opts.peers), {}
    if not contacts:
        cluster = LocalCluster(opts.model_dir, swarm_specs(config.n_layer, config.n_head, opts.nodes, opts.head_groups),
                               threads=opts.node_threads, args=list(opts.node_args)).start()
        contacts = cluster.addresses
        pids = {n.address: n.pid for n in cluster.nodes}
    try:
        client = ClientModel(load_embeddings(opts.model_dir, manifest), load_head(opts.model_dir, manifest))
        client.head.freeze_for_inference()  # as fast as a client can be: the nodes get the load
        meta = (manifest.model_id, config.n_layer, config.n_head)
        infos, skipped = _peer_infos(replace(opts, peers=contacts), meta)
        if opts.tolerance is None:  # once for the run, from the nodes' device and dtype
            opts = replace(opts, tolerance=default_tolerance(infos.values()))
        solo = _solo_logits(opts, infos, client, meta) if opts.verify else {}
        start = time.monotonic()
        workers = [_Worker(i, opts, infos, client, meta, solo, start + opts.duration) for i in range(opts.sessions)]
        threads = [threading.Thread(target=w.run, name=f"load-{w.index}", daemon=True) for w in workers]
        for t in threads:
            t.start()
        for t in threads:
            t.join(opts.duration + 10 * opts.timeout)
        report = _merge(opts, workers)
        report.elapsed = time.monotonic() - start  # (steps under way at the deadline finish; sessions close)
        report.nodes = node_reports(opts.swarm_options(), opts.timeout, meta, infos, pids, config)
        report.skipped = skipped
        if cluster is not None:
            for node in cluster.nodes:  # a node that died shows in its exit code too
                if node.proc.poll() is not None:
                    for n in report.nodes:
                        n.alive = n.alive and n.address != node.address
        return report
    finally:
        if cluster is not None:
            cluster.stop()


def _merge(opts: LoadOptions, workers: list[_Worker]) -> LoadReport:
    report = LoadReport(opts.sessions, opts.duration)
    report.tolerance = opts.tolerance
    for w in workers:
        o = w.out
        report.served += o.served
        report.refused.update(o.refused)
        report.failed.update(o.failed)
        report.failure_samples += o.failure_samples
        report.request_latency += o.request_latency
        report.step_latency += o.step_latency
        report.prefill_latency += o.prefill_latency
        report.sessions_completed += o.sessions_completed
        report.steps_checked += o.steps_checked
        report.mismatches += o.mismatches
        report.max_logit_diff = max(report.max_logit_diff, o.max_logit_diff)
        report.max_relative_diff = max(report.max_relative_diff, o.max_relative_diff)
    return report
