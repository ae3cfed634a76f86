"""`nanoswarm bench`: one process measures the local reference and swarms of real node processes
on loopback, with the same torch thread settings, and returns one JSON-able dict.

Local and swarm rounds alternate (local, swarm, local, swarm, ...) so that a swarm's ratio is
taken against local rounds measured at the same time: other load on the machine then shifts
both sides alike instead of skewing the ratio.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import platform
import random
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from nanoswarm.client.generate import ClientModel
from nanoswarm.client.session import InferenceSession
from nanoswarm.client.stages import LocalStage
from nanoswarm.client.swarm import Swarm, SwarmOptions
from nanoswarm.node.affinity import BINDING_VARS, bind_openmp
from nanoswarm.node.cluster import LocalCluster
from nanoswarm.shards.manifest import Manifest, ShardIntegrityError, read_manifest
from nanoswarm.shards.model import onednn_linear
from nanoswarm.shards.weights import load_blocks, load_embeddings, load_head

from .measure import (
    RoundResult,
    median,
    node_stats,
    percentile,
    run_concurrent,
    run_lockstep,
    run_round,
    settle_threads,
)
from .models import SHAPES, make_random_model_dir
from .options import BenchOptions, Group, check_lengths, check_options, concurrent_prompts, run_groups
from .report import targets

log = logging.getLogger(__name__)


def machine_info(threads: int) -> dict:
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"platform": platform.platform(), "cpu": model, "cores": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__, "threads": threads,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
            "gomp_spincount": os.environ.get("GOMP_SPINCOUNT", ""), "loadavg_start": os.getloadavg()[0],
            "linear": "oneDNN" if onednn_linear() is not None else "F.linear",  # shards/model.py
            "node_binding": node_binding(threads)}


def node_binding(threads: int) -> str:
    """How the harness binds the nodes' OpenMP threads (node/affinity.py): the first node's
    places, the user's own binding, or none."""
    env = dict(os.environ)
    user = [f"{k}={env[k]}" for k in BINDING_VARS if k in env]
    if user:
        return "user's " + " ".join(user)
    places = bind_openmp(env, 0, threads).get("OMP_PLACES")
    return f"OMP_PLACES={places} (first node)" if places else "none"


def _busy_cpu_seconds() -> float | None:
    """CPU time all processes on the machine have used (Linux /proc/stat), in seconds."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    ticks = [int(x) for x in fields]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


def _own_cpu_seconds() -> float:
    t = os.times()  # this process and its reaped children (the nodes, once stopped)
    return t.user + t.system + t.children_user + t.children_system


def bench_ids(n: int, vocab_size: int, seed: int = 0) -> list[int]:
    """n token ids of English text (the bundled tinyshakespeare), so that a trained model's hidden
    states look like real use (they set the lossy wire formats' errors); random ids without it."""
    import nanoswarm.shards as shards
    from nanoswarm.shards.tokenizer import get_encoding

    try:
        text = (Path(shards.__file__).parent / "data" / "tinyshakespeare.txt").read_text()
        ids = get_encoding().encode(text[1000 * seed:1000 * seed + 8 * n])
        if len(ids) >= n and max(ids) < vocab_size:
            return ids[:n]
    except (OSError, ValueError) as e:
        log.info("no text for token ids (%s); using random ids", e)
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (n,), generator=gen).tolist()


class Bench:
    def __init__(self, opts: BenchOptions, model_dir: Path):
        self.opts = opts
        self.model_dir = model_dir
        self.manifest: Manifest = read_manifest(model_dir)
        self.config = self.manifest.config
        self.max_length = opts.prompt_len + opts.tokens
        check_lengths(opts, self.config)
        self.client = ClientModel(load_embeddings(model_dir, self.manifest), load_head(model_dir, self.manifest))
        self.local_stage = LocalStage(load_blocks(model_dir, 0, self.config.n_layer, manifest=self.manifest))
        self.ids = bench_ids(self.max_length, self.config.vocab_size, opts.seed)
        self.local_rounds: list[RoundResult] = []
        self.reference: RoundResult | None = None

    # ----- sides ------------------------------------------------------------------------------
    def local_round(self, keep_logits: bool = False, steps: int | None = None) -> RoundResult:
        gc.collect()  # before the session opens (run_round)
        self.local_stage.open(self.max_length)
        session = InferenceSession([self.local_stage], self.max_length)
        return run_round(self.client, session, self.ids, self.opts.prompt_len,
                         self.opts.tokens if steps is None else steps, keep_logits)

    def swarm(self, addresses: list[str], wire: str, links: str = "relay") -> Swarm:
        swarm = Swarm(self.manifest.model_id, self.config.n_layer, self.config.n_head,
                      # "relay": nodes pass steps on, and a head group's members all-reduce
                      SwarmOptions(timeout=60.0, wire=wire, relay=links == "relay", all_reduce=links == "relay"))
        swarm.add_addresses(addresses, timeout=30.0)
        return swarm

    @property
    def warm_up_steps(self) -> int:
        return min(2, self.opts.tokens)  # a round has room for --tokens decode steps, no more

    def swarm_round(self, swarm: Swarm, keep_logits: bool = False, steps: int | None = None) -> RoundResult:
        gc.collect()  # before the session opens (run_round)
        session = InferenceSession.open(swarm, self.max_length)
        try:
            return run_round(self.client, session, self.ids, self.opts.prompt_len,
                             self.opts.tokens if steps is None else steps, keep_logits)
        finally:
            session.close()

    def _progress(self, line: str) -> None:
        log.info("%s", line)
        if self.opts.progress is not None:
            self.opts.progress(line)

    # ----- runs -------------------------------------------------------------------------------
    def run(self) -> dict:
        opts = self.opts
        groups = run_groups(opts, self.config.n_layer, self.config.n_head)  # bad --stages: before any round
        self.local_round(steps=self.warm_up_steps)  # warm-up
        self.reference = self.local_round(keep_logits=True)
        runs = []
        for group in groups:
            self._progress(f"{group}: starting {len(group.specs)} node{'s' * (len(group.specs) > 1)}")
            with LocalCluster(self.model_dir, group.specs, threads=group.node_threads(opts.threads),
                              args=list(opts.node_args)) as cluster:
                runs += self._measure(group, cluster)
        local_steps = [t for r in self.local_rounds for t in r.step_seconds]
        local_prefill = [r.prefill_seconds for r in self.local_rounds]
        return {
            "local": {"decode_tps": 1 / median(local_steps), "decode_ms": 1000 * median(local_steps),
                      "prefill_tps": opts.prompt_len / median(local_prefill),
                      "prefill_ms": 1000 * median(local_prefill), "rounds": len(self.local_rounds)},
            "runs": runs,
        }

    def _measure(self, group: Group, cluster: LocalCluster) -> list[dict]:
        """Every variant (wire, links) of `group` on its cluster. The variants take turns within
        each repeat, in a new (seeded) order each repeat, each swarm round next to a local round:
        measured one after another, whichever ran first on a fresh cluster tended to lose a few
        percent (docs/performance.md), which favoured the later ones."""
        opts = self.opts
        swarms: list[Swarm] = []
        try:
            for wire, links in group.variants:
                swarms.append(self.swarm(cluster.addresses, wire, links))
            for swarm in swarms:
                self.swarm_round(swarm, steps=self.warm_up_steps)  # first steps allocate on the nodes
            local: list[list[RoundResult]] = [[] for _ in swarms]
            remote: list[list[RoundResult]] = [[] for _ in swarms]
            order, rng = list(range(len(swarms))), random.Random(opts.seed)
            for i in range(opts.repeats):
                rng.shuffle(order)
                for v in order:
                    local[v].append(self.local_round())
                    remote[v].append(self.swarm_round(swarms[v], keep_logits=i == 0))
            results = []
            for v, (wire, links) in enumerate(group.variants):
                self.local_rounds += local[v]
                result = self._summary(group, wire, links, local[v], remote[v])
                self._progress(f"{group}, {wire}, {result['links']}: decode ratio {result['decode_ratio']:.3f}, "
                               f"prefill ratio {result['prefill_ratio']:.3f}")
                results.append(result)
            # Concurrent sessions on the first variant (the default links, exact wire).
            self._progress(f"{group}: concurrent sessions {','.join(map(str, opts.sessions))}")
            results[0]["sessions"] = self._sessions(swarms[0])
            stats = [node_stats(swarms[0].connection(a)) for a in cluster.addresses]
            results[0]["node_max_batch"] = max((s.get("max_batch", 0) for s in stats), default=0)
            results[0]["node_batched_steps"] = sum(s.get("batched_steps", 0) for s in stats)
            return results
        finally:
            for swarm in swarms:
                swarm.close()

    def _summary(self, group: Group, wire: str, links: str, local: list[RoundResult],
                 remote: list[RoundResult]) -> dict:
        opts = self.opts
        l_step = median([t for r in local for t in r.step_seconds])
        s_step = median([t for r in remote for t in r.step_seconds])
        l_pre = median([r.prefill_seconds for r in local])
        s_pre = median([r.prefill_seconds for r in remote])
        pooled = [t for r in remote for t in r.overheads()]
        assert self.reference is not None
        err = max(float((a - b).abs().max()) for a, b in zip(remote[0].logits, self.reference.logits))
        steps = sum(len(r.step_seconds) for r in remote)
        return {
            "route": group.route, "stages": group.stages, "nodes": len(group.specs), "wire": wire,
            # relay: consecutive layer stages pass each step on (client/relay.py); star: every
            # stage answers the client. The same with one stage. A head group's members all-reduce
            # (with relay) or are met by the client (fan-out).
            "links": (links if group.stages > 1 else "star") if group.route == "layers"
            else "all-reduce" if links == "relay" else "fan-out",
            "decode_tps": 1 / s_step, "decode_ms": 1000 * s_step, "local_decode_tps": 1 / l_step,
            "decode_ratio": l_step / s_step,
            "prefill_tps": opts.prompt_len / s_pre, "prefill_ms": 1000 * s_pre,
            "local_prefill_tps": opts.prompt_len / l_pre, "prefill_ratio": l_pre / s_pre,
            "overhead_ms_median": 1000 * median(pooled), "overhead_ms_p99": 1000 * percentile(pooled, 99),
            "node_ms_per_step": 1000 * median([b for r in remote for b in r.route_busy]),
            "bytes_per_token": sum(r.decode_bytes for r in remote) / steps,
            "bytes_per_prefill_token": sum(r.prefill_bytes for r in remote) / (len(remote) * opts.prompt_len),
            "max_logit_error": err,
        }

    @staticmethod
    def _node_stats(swarm: Swarm) -> list[dict]:
        return [node_stats(swarm.connection(address)) for address in swarm.peers]

    def _sessions(self, swarm: Swarm) -> list[dict]:
        """Aggregate decode speed of n sessions at once, two ways: `independent` clients (a thread,
        socket and unbatched lm_head pass of their own each, so their steps reach a node whenever they come),
        and `one_client` driving them in step (its steps arrive together; one batched lm_head)."""
        out = []
        for mode in ("independent", "one_client"):
            for n in self.opts.sessions:
                out.append({"mode": mode, **self._concurrent(swarm, n, mode)})
        for r in out:
            single = next((x["aggregate_tps"] for x in out if x["sessions"] == 1 and x["mode"] == r["mode"]), None)
            r["speedup"] = r["aggregate_tps"] / single if single else None
        return out

    def _concurrent(self, swarm: Swarm, n: int, mode: str) -> dict:
        sessions, swarms = [], []
        prompts = concurrent_prompts(bench_ids(n + 12, self.config.vocab_size, self.opts.seed + 1), n)
        settle_threads([swarm.connection(address) for address in swarm.peers])
        try:
            for prompt in prompts:
                own = Swarm(swarm.model_id, swarm.n_layer, swarm.n_head, swarm.options)
                own.peers.update(swarm.peers)  # the same route, but a socket of its own
                swarms.append(own)
                sessions.append(InferenceSession.open(own, len(prompt) + self.opts.session_tokens))
            torch.set_num_threads(self.opts.session_threads or self.opts.threads)
            before: list[dict] = []
            run = run_concurrent if mode == "independent" else run_lockstep
            result = run(self.client, sessions, prompts, self.opts.session_tokens,
                         lambda b=before: b.extend(self._node_stats(swarm)))
            after = self._node_stats(swarm)
            passes = sum(a.get("steps", 0) - b.get("steps", 0) for a, b in zip(after, before))
            rows = sum(a.get("tokens", 0) - b.get("tokens", 0) for a, b in zip(after, before))
            result["node_mean_batch"] = rows / passes if passes else None  # sessions per forward pass
            return result
        finally:
            torch.set_num_threads(self.opts.threads)
            for s in sessions:
                s.close()
            for s in swarms:
                s.close()


def run_bench(opts: BenchOptions) -> dict:
    """Measure everything `opts` asks for; the dict `--json` prints."""
    check_options(opts)  # before any model is made or measured
    torch.set_num_threads(opts.threads)
    started = time.time()
    busy0, own0 = _busy_cpu_seconds(), _own_cpu_seconds()
    with contextlib.ExitStack() as stack:
        model_dir = opts.model_dir
        if model_dir is None:
            if opts.shape not in SHAPES:
                raise ValueError(f"unknown shape {opts.shape!r}; known: {', '.join(SHAPES)}")
            root = opts.work_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="nanoswarm-bench-")))
            model_dir = make_random_model_dir(Path(root) / opts.shape, SHAPES[opts.shape], seed=opts.seed)
        machine = machine_info(opts.threads)
        try:
            bench = Bench(opts, Path(model_dir))
        except (ShardIntegrityError, OSError) as e:  # a file of a kept random model damaged: write it again
            if opts.model_dir is not None or opts.work_dir is None:
                raise
            log.warning("rewriting the random model in %s: %s", model_dir, e)
            model_dir = make_random_model_dir(model_dir, SHAPES[opts.shape], seed=opts.seed, reuse=False)
            bench = Bench(opts, Path(model_dir))
        result = bench.run()
    machine["loadavg_end"] = os.getloadavg()[0]
    busy1, own1, wall = _busy_cpu_seconds(), _own_cpu_seconds(), time.time() - started
    # Cores' worth of CPU that other processes used while the benchmark ran: the noise in it.
    machine["other_load"] = (None if busy0 is None or busy1 is None
                             else max(0.0, (busy1 - busy0) - (own1 - own0)) / wall)
    options = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items() if k != "progress"}
    out = {"model": str(opts.model_dir) if opts.model_dir else None,
           "shape": None if opts.model_dir else opts.shape, "config": bench.config.to_dict(),
           "options": options, "machine": machine, "seconds": time.time() - started, **result}
    out["targets"] = targets(out)  # the targets this run has figures for, met or not
    return out
