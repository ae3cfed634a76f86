"""The floor for a head group on this machine: bare member processes, each holding a share of the
heads of every block, against one process, in the two ways a group's members can meet.

    .venv/bin/python scripts/bench_heads_floor.py [--shape gpt2-small|tiny | --model DIR]
        [--members 2] [--rounds 3] [--tokens 32] [--nanoswarm]

- `fan-out`, what nanoswarm's HeadGroupStage did before the forty-fifth session, and does with
  `SwarmOptions.all_reduce` off (client/head_group.py): the client sends each block's input to every
  member and adds their partial sums to the residual, first of the block's attention, then of
  its MLP: 2 x n_layer round trips a token.
- `all-reduce`, what nanoswarm's head groups do since (node/all_reduce.py): the client sends a
  step's input to every member once; each member sends each partial sum straight to the others, adds all of them to the
  residual in member order (the same sums on every member) and goes on to the next phase; the
  first member answers the client (in nanoswarm every member does, and the client checks that
  they agree). One round trip a token, and 2 x n_layer one-way exchanges
  between the members.

Bare members read raw ZeroMQ frames (a 20-byte header and float32 activations: no msgpack, no
CURVE, no sessions; an all-reduce answers a prompt's last row only, as nanoswarm's members answer
a step's `last`), one torch thread each (unbound, as nanoswarm's harness leaves a node of
one thread). With `--nanoswarm`, nanoswarm's own head groups (real nodes, CURVE, the client's
HeadGroupStage), one all-reducing and one met by fan-out, run in the same rotation. The client
embeds, runs ln_f + lm_head and argmax as `nanoswarm bench` does; routes take turns round by
round (scripts/bench_floor.py).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import struct
import sys
import tempfile
from pathlib import Path

import nanoswarm  # noqa: F401  (first: its OpenMP defaults must precede torch's import)

# isort: split
import torch
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_floor import (  # noqa: E402
    WAIT_MS,
    BareSwarm,
    LocalRoute,
    NanoswarmRoute,
    bare_requests,
    client_parts,
    close_routes,
    print_results,
    rotate,
)

from nanoswarm.bench.models import SHAPES  # noqa: E402
from nanoswarm.client.session import InferenceSession  # noqa: E402
from nanoswarm.client.swarm import Swarm, SwarmOptions  # noqa: E402
from nanoswarm.node.affinity import float_io_threads  # noqa: E402
from nanoswarm.node.cluster import LocalCluster, NodeSpec  # noqa: E402
from nanoswarm.shards.manifest import read_manifest  # noqa: E402
from nanoswarm.shards.weights import load_blocks  # noqa: E402

# positions in this step; the length of a new cache, or 0; block (fan-out) or -1; phase 0 attn, 1 mlp
# Positions; a new cache's length, or 0; the block and phase of a fan-out step (-1, 0 for an
# all-reduce); the rows the client takes back from an all-reduce (0: all).
HEADER = struct.Struct("<iiiii")
PARTIAL = struct.Struct("<ii")  # the sending member's index, the phase's number in the step (all-reduce)


def member_main(model_dir: str, heads: tuple[int, int], index: int, mode: str, ready, peers, parent: int) -> None:
    """A bare member: heads `heads` of every block. Puts (client port, partials port) into
    `ready`, reads the other members' partials ports from `peers` (all-reduce), then serves
    until the client's stop message or its process is gone."""
    torch.set_num_threads(1)
    n_layer = read_manifest(model_dir).config.n_layer
    blocks = load_blocks(model_dir, 0, n_layer, heads=heads)
    ctx = zmq.Context()
    float_io_threads(ctx)
    inbox, partials = ctx.socket(zmq.ROUTER), ctx.socket(zmq.PULL)
    ready.put((inbox.bind_to_random_port("tcp://127.0.0.1"), partials.bind_to_random_port("tcp://127.0.0.1")))
    others = []
    for port in peers.get(timeout=WAIT_MS / 1000):  # the other members' partials ports, in member order
        out = ctx.socket(zmq.PUSH)
        out.connect(f"tcp://127.0.0.1:{port}")
        others.append(out)
    members = len(others) + 1
    cache = None
    # A later phase's partial that came first (3+ members), kept across steps: the next step's
    # first partial may come before another member's last of this one (review114: dropped with
    # the step, it left every member waiting). No member is more than a phase ahead of another.
    early: dict[tuple[int, int], zmq.Frame] = {}
    with torch.inference_mode():
        for peer, header, data in bare_requests(inbox, parent):
            n, fresh, block, phase, keep = HEADER.unpack(header.bytes)
            if fresh:
                cache = blocks.new_cache(fresh)
            if not n:
                inbox.send_multipart([peer.bytes, b""])
                continue
            x = torch.frombuffer(data.buffer, dtype=torch.float32).view(1, n, -1)
            if mode == "fan-out":  # one phase of one block; the client adds the partials
                b = blocks.h[str(block)]
                y = b.attn_partial(x, [cache], block) if phase == 0 else b.mlp_partial(x)
                if phase == 0 and block == n_layer - 1:
                    cache.length += n
                inbox.send_multipart([peer.bytes, memoryview(y.numpy()).cast("B")], copy=False)
                continue
            for block in range(n_layer):  # all-reduce: every phase's partials exchanged here
                b = blocks.h[str(block)]
                for phase in (0, 1):
                    seq = 2 * block + phase
                    mine = b.attn_partial(x, [cache], block) if phase == 0 else b.mlp_partial(x)
                    for out in others:
                        out.send_multipart([PARTIAL.pack(index, seq), memoryview(mine.numpy()).cast("B")], copy=False)
                    raws = {k: early.pop((k, seq)) for k in range(members) if (k, seq) in early}
                    while len(raws) < members - 1:
                        sender, raw = partials.recv_multipart(copy=False)
                        k, at = PARTIAL.unpack(sender.bytes)
                        if at == seq:
                            raws[k] = raw
                        else:
                            early[(k, at)] = raw
                    for k in range(members):  # in member order: the same sums on every member
                        x = x + (mine if k == index else
                                 torch.frombuffer(raws[k].buffer, dtype=torch.float32).view(1, n, -1))
            cache.length += n
            if index == 0:  # (a prompt's last row only, as nanoswarm's members answer a step's `last`)
                y = x[:, -keep:] if keep else x
                inbox.send_multipart([peer.bytes, memoryview(y.numpy()).cast("B")], copy=False)


class BareGroup(BareSwarm):
    """Bare members of one head group, driven fan-out or all-reduce."""

    def __init__(self, model_dir: Path, members: int, mode: str):
        self.config = read_manifest(model_dir).config
        self.members, self.mode = members, mode
        super().__init__(model_dir, members, 1, mode)

    def _start(self, model_dir: Path, n_layer: int, stages: int, threads: int, links: str) -> None:
        spawn = mp.get_context("spawn")
        per = self.config.n_head // self.members
        ports, queues = [], []
        for k in range(self.members):
            heads = (k * per, self.config.n_head if k == self.members - 1 else (k + 1) * per)
            ready, peers = spawn.Queue(), spawn.Queue()
            p = spawn.Process(target=member_main, args=(str(model_dir), heads, k, self.mode, ready, peers,
                                                        os.getpid()), daemon=True)
            p.start()  # not bound to a core: LocalCluster binds no single-thread node either
            self.procs.append(p)
            ports.append(self._port(p, ready))
            queues.append(peers)
        for k, peers in enumerate(queues):
            reduce = self.mode == "all-reduce"
            peers.put([partials for j, (_, partials) in enumerate(ports) if j != k and reduce])
        for inbox, _ in ports:
            s = self._socket(zmq.DEALER)
            s.connect(f"tcp://127.0.0.1:{inbox}")
            self.socks.append(s)

    def open(self, length: int) -> None:
        for s in self.socks:
            s.send_multipart([HEADER.pack(0, length, -1, 0, 0), b""])
        for s in self.socks:
            s.recv()

    def step(self, x: torch.Tensor, last: int | None = None) -> torch.Tensor:
        """The group's output; with `last`, its last `last` rows (all-reduce: member 0 sends
        those alone; a fan-out's partials are every row's, as nanoswarm's)."""
        n = x.shape[1]
        if self.mode == "all-reduce":
            keep = last if last is not None and last < n else 0
            for s in self.socks:
                s.send_multipart([HEADER.pack(n, 0, -1, 0, keep), memoryview(x.numpy()).cast("B")], copy=False)
            return self._tensor(self.socks[0].recv(copy=False), x)
        for block in range(self.config.n_layer):
            for phase in (0, 1):
                for s in self.socks:
                    s.send_multipart([HEADER.pack(n, 0, block, phase, 0), memoryview(x.numpy()).cast("B")],
                                     copy=False)
                parts = [self._tensor(s.recv(copy=False), x) for s in self.socks]
                for part in parts:  # in member order, as HeadGroupStage adds them
                    x = x + part
        return x if last is None else x[:, -last:]

    @staticmethod
    def _tensor(frame: zmq.Frame, like: torch.Tensor) -> torch.Tensor:
        return torch.frombuffer(frame.buffer, dtype=torch.float32).view(1, -1, like.shape[2])


class NanoswarmGroup(NanoswarmRoute):
    """nanoswarm's own head group: real head-shard nodes, one torch thread each."""

    def __init__(self, model_dir: Path, members: int, all_reduce: bool):
        config = read_manifest(model_dir).config
        per = config.n_head // members
        specs = [NodeSpec((0, config.n_layer), (k * per, config.n_head if k == members - 1 else (k + 1) * per))
                 for k in range(members)]
        self.cluster = LocalCluster(model_dir, specs, threads=1).start()
        try:
            self.swarm = Swarm(read_manifest(model_dir).model_id, config.n_layer, config.n_head,
                               SwarmOptions(timeout=WAIT_MS / 1000, all_reduce=all_reduce))
            self.swarm.add_addresses(self.cluster.addresses, timeout=30.0)
        except BaseException:
            self.cluster.stop()
            raise
        self.session: InferenceSession | None = None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="gpt2-small", choices=sorted(SHAPES))
    ap.add_argument("--model", type=Path, help="a model dir instead of random weights of --shape")
    ap.add_argument("--work-dir", type=Path, help="where the random-weight model dir is kept")
    ap.add_argument("--members", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the one process and the client")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--nanoswarm", action="store_true", help="nanoswarm's own head group in the rotation too")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="nanoswarm-heads-floor-") as tmp:
        model_dir, config, embed, head, ids = client_parts(args, Path(tmp))
        if not 2 <= args.members <= config.n_head:
            ap.error(f"--members must be from 2 to {config.n_head}")
        print(f"{config.n_layer} blocks, {config.n_embd} wide, {config.n_head} heads; {args.members} members "
              f"of 1 torch thread; {args.threads} in the one process")
        routes = {"one process": LocalRoute(model_dir)}
        try:
            for mode in ("fan-out", "all-reduce"):
                routes[f"bare {mode}"] = BareGroup(model_dir, args.members, mode)
            if args.nanoswarm:
                for mode in ("fan-out", "all-reduce"):
                    routes[f"nanoswarm {mode}"] = NanoswarmGroup(model_dir, args.members, mode == "all-reduce")
            results = rotate(routes, embed, head, ids, args)
        finally:
            close_routes(routes)
    print_results(results, args.prompt_len)


if __name__ == "__main__":
    main()
