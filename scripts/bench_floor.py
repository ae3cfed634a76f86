"""The floor for a local pipeline on this machine: the same blocks in bare node processes against
one process, with nothing of nanoswarm's between them, and nanoswarm's own routes in the same run.

    .venv/bin/python scripts/bench_floor.py [--shape gpt2-small|tiny | --model DIR] [--stages 4]
        [--links ring,star] [--nanoswarm relay,star] [--rounds 3] [--tokens 48]

Each bare node holds its blocks and one KV cache, reads raw ZeroMQ frames (a 12-byte header and
the float32 activations: no msgpack, no CURVE, no validation, no sessions), runs its blocks and
sends the output on: to the next node (ring: the last one pushes to the client) or back to the
client (star); to the client, a prompt's last row only, as nanoswarm's nodes answer a step's
`last` (since the fifty-third session; before, every row). The client embeds, runs ln_f + lm_head
and argmax like `nanoswarm bench`, with the same torch threads and OpenMP settings in every
process. nanoswarm's routes (real nodes, CURVE, sessions; relayed or stage by stage) run beside
them, and all routes take turns round by round, so each waits as long between its rounds: what
nanoswarm loses against the bare pipeline is the cost of nanoswarm itself (protocol, checks,
encryption); what the bare pipeline loses against one process is the machine's
(docs/performance.md, "The floor on this machine").
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue
import random
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

import nanoswarm  # noqa: F401  (first: its OpenMP defaults must precede torch's import)

# isort: split
import torch
import zmq

from nanoswarm.bench.models import SHAPES, make_random_model_dir
from nanoswarm.client.session import InferenceSession
from nanoswarm.client.swarm import Swarm, SwarmOptions
from nanoswarm.node.affinity import bind_openmp, float_io_threads
from nanoswarm.node.cluster import LocalCluster, NodeSpec, even_split
from nanoswarm.shards.manifest import read_manifest
from nanoswarm.shards.weights import load_blocks, load_embeddings, load_head

# Positions in this step; the length of a new cache, or 0; the rows the client takes back (0: all).
HEADER = struct.Struct("<iii")
WAIT_MS = 120_000  # the longest the client waits for a node (start-up, a prefill on a slow machine)


def node_main(model_dir: str, start: int, stop: int, threads: int, to: tuple[str, int] | None,
              ready, parent: int) -> None:
    """A bare node: recv, blocks, send. `to`: (socket type, port) to pass the output to, or None
    to answer the sender (star). Puts the port it listens on into the queue `ready`; exits when
    the client process `parent` is gone."""
    torch.set_num_threads(threads)
    blocks = load_blocks(model_dir, start, stop)
    ctx = zmq.Context()
    float_io_threads(ctx)  # as nanoswarm's nodes do
    inbox = ctx.socket(zmq.ROUTER)
    port = inbox.bind_to_random_port("tcp://127.0.0.1")
    out = None
    if to is not None:
        out = ctx.socket(zmq.DEALER if to[0] == "node" else zmq.PUSH)
        out.connect(f"tcp://127.0.0.1:{to[1]}")
    cache = None
    ready.put(port)
    with torch.inference_mode():
        for peer, header, data in bare_requests(inbox, parent):
            n, fresh, keep = HEADER.unpack(header.bytes)
            if fresh:  # a new cache, allocated before the timed steps (like a session's open)
                cache = blocks.new_cache(fresh)
            if n:
                x = torch.frombuffer(data.buffer, dtype=torch.float32).view(1, n, -1)
                y = blocks(x, [cache])
                if keep and (to is None or to[0] == "client"):  # to the client: its rows only, as nanoswarm's `last`
                    y = y[:, -keep:]
                y = memoryview(y.numpy()).cast("B")
            else:
                y = data
            if out is None:
                inbox.send_multipart([peer.bytes, y], copy=False)
            elif to[0] == "node":
                out.send_multipart([header, y], copy=False)
            else:
                out.send(y, copy=False)


def bare_requests(inbox: zmq.Socket, parent: int):
    """A bare node's requests, [peer, header, data] each, until the client's stop message or
    until the client process `parent` is gone (killed: the node must not linger)."""
    while True:
        if not inbox.poll(1000):
            if os.getppid() != parent:
                return
            continue
        frames = inbox.recv_multipart(copy=False)
        if len(frames) != 3:  # the client's stop message
            return
        yield frames


class BareSwarm:
    def __init__(self, model_dir: Path, stages: int, threads: int, links: str):
        n_layer = read_manifest(model_dir).config.n_layer
        self.links, self.procs, self.socks = links, [], []
        self.ctx = zmq.Context()
        self.back = None
        try:
            self._start(model_dir, n_layer, stages, threads, links)
        except BaseException:
            self.close()
            raise

    def _start(self, model_dir: Path, n_layer: int, stages: int, threads: int, links: str) -> None:
        spawn = mp.get_context("spawn")
        to = None
        if links == "ring":  # the last node pushes to the client
            self.back = self._socket(zmq.PULL)
            to = ("client", self.back.bind_to_random_port("tcp://127.0.0.1"))
        ports: list[int] = []
        # Last stage first: in a ring each node connects to the next one's port.
        for a, b in reversed(even_split(n_layer, stages)):
            ready = spawn.Queue()
            p = spawn.Process(target=node_main, args=(str(model_dir), a, b, threads, to, ready, os.getpid()),
                              daemon=True)
            # The same OpenMP binding as nanoswarm's harness gives its nodes: a spawned process
            # starts with this process's environment.
            env = bind_openmp(dict(os.environ), len(self.procs), threads)
            added = {k: env[k] for k in ("OMP_PLACES", "OMP_PROC_BIND") if k in env and k not in os.environ}
            os.environ.update(added)
            try:
                p.start()
            finally:
                for k in added:
                    del os.environ[k]
            self.procs.append(p)
            ports.insert(0, self._port(p, ready))
            if links == "ring":
                to = ("node", ports[0])
        for port in ports:
            s = self._socket(zmq.DEALER)
            s.connect(f"tcp://127.0.0.1:{port}")
            self.socks.append(s)

    def _socket(self, kind: int) -> zmq.Socket:
        s = self.ctx.socket(kind)
        s.setsockopt(zmq.RCVTIMEO, WAIT_MS)  # a node that died raises zmq.Again, not a hang
        s.setsockopt(zmq.LINGER, 0)
        return s

    @staticmethod
    def _port(p: mp.Process, ready) -> int:
        deadline = time.monotonic() + WAIT_MS / 1000
        try:
            while True:
                try:
                    return ready.get(timeout=1)
                except queue.Empty:
                    if not p.is_alive() or time.monotonic() > deadline:
                        raise RuntimeError(f"a bare node did not start (exit code {p.exitcode})") from None
        finally:
            ready.close()

    def open(self, length: int) -> None:
        """A new cache of `length` positions on every node (a step of no positions)."""
        self._pass(HEADER.pack(0, length, 0), b"")

    def step(self, x: torch.Tensor, last: int | None = None) -> torch.Tensor:
        """The last node's output; with `last`, its last `last` rows only (the others stay there)."""
        keep = last if last is not None and last < x.shape[1] else 0
        data = self._pass(HEADER.pack(x.shape[1], 0, keep), memoryview(x.numpy()).cast("B"))
        return torch.frombuffer(data.buffer, dtype=torch.float32).view(1, -1, x.shape[2])

    def _pass(self, header: bytes, payload) -> zmq.Frame:
        """`payload` through every node, in a ring or one node at a time; the last one's output
        (in a star, only the last node is told how many rows to answer)."""
        if self.back is not None:
            self.socks[0].send_multipart([header, payload], copy=False)
            return self.back.recv(copy=False)
        whole = HEADER.pack(*HEADER.unpack(header)[:2], 0)
        for i, s in enumerate(self.socks):
            s.send_multipart([header if i + 1 == len(self.socks) else whole, payload], copy=False)
            payload = s.recv(copy=False)
        return payload

    def close(self) -> None:
        for s in self.socks:
            try:
                s.send(b"stop", zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        for p in self.procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)
        self.ctx.destroy(linger=0)


class LocalRoute:
    """One process: every block, one KV cache."""

    def __init__(self, model_dir: Path):
        self.blocks = load_blocks(model_dir, 0, read_manifest(model_dir).config.n_layer)
        self.cache = None

    def open(self, length: int) -> None:
        self.cache = self.blocks.new_cache(length)

    def step(self, x: torch.Tensor, last: int | None = None) -> torch.Tensor:
        y = self.blocks(x, [self.cache])
        return y if last is None else y[:, -last:]

    def close(self) -> None:
        pass


class BareRoute:
    """A BareSwarm driven like the others."""

    def __init__(self, model_dir: Path, stages: int, threads: int, links: str):
        self.swarm = BareSwarm(model_dir, stages, threads, links)
        self.open, self.step, self.close = self.swarm.open, self.swarm.step, self.swarm.close


class NanoswarmRoute:
    """nanoswarm itself: real node processes (CURVE, checks, sessions) and an InferenceSession,
    relayed or stage by stage, so that its cost above the bare pipeline shows in the same run."""

    def __init__(self, model_dir: Path, stages: int, threads: int, links: str, insecure: bool = False):
        config = read_manifest(model_dir).config
        self.cluster = LocalCluster(model_dir, [NodeSpec(r) for r in even_split(config.n_layer, stages)],
                                    threads=threads, args=["--insecure"] if insecure else []).start()
        try:
            self.swarm = Swarm(read_manifest(model_dir).model_id, config.n_layer, config.n_head,
                               SwarmOptions(timeout=WAIT_MS / 1000, relay=links == "relay", insecure=insecure))
            self.swarm.add_addresses(self.cluster.addresses, timeout=30.0)
        except BaseException:
            self.cluster.stop()
            raise
        self.session: InferenceSession | None = None

    def open(self, length: int) -> None:
        if self.session is not None:
            self.session.close()
        self.session = InferenceSession.open(self.swarm, length)

    def step(self, x: torch.Tensor, last: int | None = None) -> torch.Tensor:
        return self.session.step(x, last=last)

    def close(self) -> None:
        if self.session is not None:
            self.session.close()
        self.swarm.close()
        self.cluster.stop()


def run_round(route, embed, head, ids: list[int], prompt_len: int,
              tokens: int) -> tuple[float, float, list[torch.Tensor]]:
    """A fresh cache, then prefill and decode through `route`; (prefill seconds, median token
    seconds, the logits of the prefill and of the last token)."""
    route.open(prompt_len + tokens)
    times, outputs = [], []
    for t in range(tokens + 1):
        a, b = (0, prompt_len) if t == 0 else (prompt_len + t - 1, prompt_len + t)
        t0 = time.perf_counter()
        with torch.inference_mode():
            hidden = route.step(embed(torch.tensor([ids[a:b]]), a), last=1)  # the next token's row, as generate
            logits = head(hidden[:, -1:])
            int(logits.argmax())
        times.append(time.perf_counter() - t0)
        outputs.append(logits)
    return times[0], statistics.median(times[1:]), [outputs[0], outputs[-1]]


def _names(value: str) -> list[str]:
    return [x for x in value.split(",") if x]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])  # the first paragraph
    ap.add_argument("--shape", default="gpt2-small", choices=sorted(SHAPES))
    ap.add_argument("--model", type=Path, help="a model dir instead of random weights of --shape")
    ap.add_argument("--work-dir", type=Path, help="where the random-weight model dir is kept")
    ap.add_argument("--stages", type=int, default=4)
    ap.add_argument("--links", default="ring,star", help="bare pipelines to run ('' for none)")
    ap.add_argument("--nanoswarm", default="relay,star",
                    help="nanoswarm routes to run in the same rotation: relay, star, and either with "
                    "'-insecure' (no CURVE: its share of the cost); '' for none")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=48)
    args = ap.parse_args()
    bare, ours = _names(args.links), _names(args.nanoswarm)
    for name in bare:
        if name not in ("ring", "star"):
            ap.error(f"unknown bare pipeline {name!r}")
    for name in ours:
        links, _, mode = name.partition("-")
        if links not in ("relay", "star") or mode not in ("", "insecure"):
            ap.error(f"unknown nanoswarm route {name!r}")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="nanoswarm-floor-") as tmp:
        model_dir, config, embed, head, ids = client_parts(args, Path(tmp))
        print(f"{config.n_layer} blocks, {config.n_embd} wide; {args.stages} stages, "
              f"{args.threads} torch threads per process, GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT')}")
        routes = {"one process": LocalRoute(model_dir)}
        try:
            for links in bare:
                routes[f"bare {links}"] = BareRoute(model_dir, args.stages, args.threads, links)
            for name in ours:
                links, _, mode = name.partition("-")
                routes[f"nanoswarm {name}"] = NanoswarmRoute(model_dir, args.stages, args.threads, links,
                                                             insecure=mode == "insecure")
            results = rotate(routes, embed, head, ids, args)
        finally:
            close_routes(routes)
    print_results(results, args.prompt_len)


def client_parts(args, tmp: Path) -> tuple:
    """The model dir (`--model`, or random weights of `--shape` under `--work-dir` or `tmp`), its
    config, the client's embeddings and head, and the token ids every route is fed."""
    model_dir = args.model or make_random_model_dir((args.work_dir or tmp) / args.shape, SHAPES[args.shape])
    manifest = read_manifest(model_dir)
    config = manifest.config
    ids = torch.randint(0, config.vocab_size, (args.prompt_len + args.tokens,),
                        generator=torch.Generator().manual_seed(0)).tolist()
    return model_dir, config, load_embeddings(model_dir, manifest), load_head(model_dir, manifest), ids


def close_routes(routes: dict) -> None:
    for name, route in routes.items():
        try:  # every route's processes are stopped, even if one route's close fails
            route.close()
        except Exception as e:
            print(f"closing {name}: {type(e).__name__}: {e}", file=sys.stderr)


def print_results(results: dict[str, list], prompt_len: int) -> None:
    """One line a route: its median decode token and prefill against the one process's."""
    local = results["one process"]
    lp, ld = (statistics.median(r[i] for r in local) for i in (0, 1))
    for name, rounds in results.items():
        p, d = (statistics.median(r[i] for r in rounds) for i in (0, 1))
        # The same blocks: the same logits, of the prefill and of the last token.
        err = max(float((a - b).abs().max()) for a, b in zip(local[-1][2], rounds[-1][2]))
        print(f"{name:24s} decode {d * 1e3:6.2f} ms, ratio {ld / d:.3f} | prefill {prompt_len}: "
              f"{p * 1e3:6.1f} ms, ratio {lp / p:.3f} | max |dlogit| {err:.1e}")


def rotate(routes: dict, embed, head, ids: list[int], args) -> dict[str, list]:
    """Every route once a round, in a new random order each round: a node that waited computes
    slower here (docs/performance.md), so a fixed order would favour the route that always
    follows the same one; shuffled, no route keeps one predecessor over the rounds."""
    names = list(routes)
    for name in names:  # warm-up
        run_round(routes[name], embed, head, ids, args.prompt_len, 4)
    results: dict[str, list] = {name: [] for name in names}
    order = random.Random(0)
    for _ in range(args.rounds):
        order.shuffle(names)
        for name in names:
            results[name].append(run_round(routes[name], embed, head, ids, args.prompt_len, args.tokens))
    return results


if __name__ == "__main__":
    main()
