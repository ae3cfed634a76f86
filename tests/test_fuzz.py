"""Property-based fuzzing of a node's request handling, in process (no sockets).

Hypothesis generates batches of messages: random bytes, valid requests of every type (steps
also as relayed steps: node/relay.py), and valid requests with one thing broken (truncated or
flipped header bytes, a field of the wrong type, a missing field, a wrong version, a reused id, a
tensor frame cut short or lengthened, extreme shapes, NaN/Inf or huge values). Every message must
get exactly one well-formed reply (or, relayed, one well-formed step for the next hop): a result
of the right kind, or an error with a known code (never `internal`). Session memory must stay
within the limits throughout, and afterwards the node must still serve a session with exact logits.

A head group's all-reduce (node/all_reduce.py) is drawn too: `group` steps, valid or with one thing
broken (group shapes and lengths, `member`, the node's own entry missing or twice, unknown or keyless
contacts, `wait`, phase/relay fields, positions, tensors, `last`), and other members' `partial`s (of
the phase waited on and the next, all of a phase at once, before the step, for no step or session,
out of turn, wrong member, key, shape, format or values, repeated, and floods past what a node keeps).
An accepted partial gets no reply and an all-reduce step under way gets its one reply later (from
another batch, or when its wait runs out: the case's end runs expire); the partials a step sends are
well formed, the session is a step longer after a result and as before after a failure, and the kept
partials' bytes stay as counted and within the limit. Half the nodes answer `records` from a real
table (node/gossip.py), every record in a reply verifying.

The default run tries a few hundred cases; the dedicated run (docs/reliability.md) sets
NANOSWARM_FUZZ_CASES=10000.
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from zmq.utils import z85

from nanoswarm.client.generate import ClientModel
from nanoswarm.node.handler import RequestHandler
from nanoswarm.node.partials import KEPT_MESSAGES
from nanoswarm.node.relay import Relay
from nanoswarm.node.sessions import NodeLimits
from nanoswarm.protocol.errors import ErrorCode
from nanoswarm.protocol.messages import (
    MAX_HEADER_BYTES,
    MAX_HOPS,
    MAX_ID_CHARS,
    PROTOCOL_VERSION,
    decode,
    encode,
    peek_id,
)
from nanoswarm.protocol.tensors import WIRE_FORMATS
from nanoswarm.shards.manifest import read_manifest
from nanoswarm.shards.weights import load_blocks, load_embeddings, load_head, load_model

CASES = int(os.environ.get("NANOSWARM_FUZZ_CASES", "200"))
KNOWN_PEER = "tcp://127.0.0.1:5999#" + "ab" * 32  # the one contact fuzzed nodes relay to
N_EMBD = 64  # tests/conftest.TINY
# Small limits, so that generated messages run into every one of them.
# A tiny-model session costs 512 bytes of KV cache per position: the budget holds two of the longest.
LIMITS = NodeLimits(max_message_bytes=64 * 1024, max_tokens_per_step=48, max_sessions=6,
                    kv_budget_bytes=2 * 96 * 512, max_session_length=96,
                    max_inflight_per_peer=4, idle_timeout=60.0)
KNOWN_CODES = {c.value for c in ErrorCode} - {ErrorCode.INTERNAL.value}
MANIFEST = {"format": "what a node's info sends when asked", "files": []}  # (the handler sends it as set)
REPLY_TYPE = {"info": "info_reply", "open": "opened", "step": "result", "forward": "result",
              "close": "closed", "admit": "admitted", "records": "records_reply"}
SENDER_KEYS = ["a" * 40, "b" * 40]  # CURVE keys (z85) that messages come with, as ZAP names them
# A head group's members (all-reduce steps, node/all_reduce.py): contacts the fuzzed nodes send to
# (as KNOWN_PEER), each with its CURVE key, which their partials come with where senders are known.
MEMBER_KEYS = [z85.encode(bytes([17 * j + 1]) * 32).decode() for j in range(5)]
MEMBERS = [f"tcp://127.0.0.1:{6000 + j}#{MEMBER_KEYS[j]}" for j in range(5)]
KNOWN = {KNOWN_PEER, *MEMBERS}
GROUP_IDS = 10**12  # all-reduce steps and partials take ids from here: their replies are told apart by id

ANY_VALUE = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.integers(-3, 300),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=24), st.binary(max_size=24),
    st.lists(st.integers(-3, 300), max_size=4), st.dictionaries(st.text(max_size=4), st.integers(-5, 5), max_size=3),
    st.lists(st.lists(st.text(max_size=4), max_size=2), max_size=2))


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Node:
    """A fresh handler over shared (read-only) blocks, plus what the fuzzer knows about it."""

    def __init__(self, blocks, model_id: str):
        self.handler = RequestHandler(blocks, model_id, "fuzz", LIMITS)
        self.handler.manifest = MANIFEST
        self.handler.can_relay = lambda contact: contact in KNOWN
        self.clock = FakeClock()
        self.clock.now = time.monotonic()  # (an all-reduce step marks its session used on time.monotonic)
        self.handler.sessions.clock = self.clock
        self._poison_cache_memory()
        self.next_id = 1
        self.used: list[int] = []
        self.senders: dict[int, str | None] = {}  # id(header frame) -> the key it came with
        self.next_group_id = GROUP_IDS
        # (peer, request id) -> what the fuzzer sent in an all-reduce step: its session, position,
        # positions, `last`, wire, members; and the replies it got, from any batch (at most one)
        self.group_steps: dict[tuple[bytes, int], dict] = {}
        self.sent: list = []  # partials sent through groups.send (where the case sets it)
        # an all-reduce step went whose replies cannot be told apart (a broken id, or `reply`):
        # from then on the case checks the replies' count from below only
        self.unclear = False
        self.batch_time: float | None = None  # wall-clock time the last batch went in (`handle`)

    def handle(self, batch: list) -> list:
        """`handle_batch`, its time kept: a reply's records are checked as of when it was made."""
        self.batch_time = time.time()
        return self.handler.handle_batch(batch)

    def check_senders(self) -> None:
        """Take relayed steps as a node with CURVE does: only from the key a session's owner
        admitted (the key of each message is drawn with it)."""
        self.handler.sender_key = lambda frames: self.senders.get(id(frames[0]))
        self.handler.groups.checks_keys = True  # as node/server.py sets it with CURVE

    def _poison_cache_memory(self) -> None:
        """Every map the pool hands out (new or reused) starts full of NaN bytes, so a session
        that reads a cache row it never wrote shows it (check_memory, and NaN results)."""
        pool = self.handler.sessions.pool
        take = pool.take

        def poisoned(nbytes: int):
            m = take(nbytes)
            m[:] = b"\xff" * len(m)  # 0xffffffff is a float32 NaN
            return m
        pool.take = poisoned

    def fresh_id(self) -> int:
        self.next_id += 1
        return self.next_id

    def group_id(self) -> int:
        self.next_group_id += 1
        return self.next_group_id


@pytest.fixture(scope="module")
def served(tiny_model_dir) -> list[tuple]:
    """Blocks of a whole-block node and of a head-shard node (blocks 1:3, heads 0:2)."""
    model_id = read_manifest(tiny_model_dir).model_id
    return [(load_blocks(tiny_model_dir, 0, 4), model_id),
            (load_blocks(tiny_model_dir, 1, 3, heads=(0, 2)), model_id)]


# ----- message generation ----------------------------------------------------------------
def draw_tensor(data, T: int) -> tuple[torch.Tensor, str]:
    shape = data.draw(st.one_of(
        st.just([1, T, N_EMBD]), st.just([1, T, N_EMBD]), st.just([1, T, N_EMBD]),
        st.lists(st.sampled_from([0, 1, 2, 3, N_EMBD - 1, N_EMBD, N_EMBD + 1, 65]), max_size=5)))
    n = 1
    for d in shape:
        n *= d
    if n > 16384:
        shape, n = [1, T, N_EMBD], T * N_EMBD
    scale = data.draw(st.sampled_from([1.0, 1.0, 1.0, 1e-30, 1e4, 1e30, 3e38]))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(data.draw(st.integers(0, 99)))) * scale
    if n and data.draw(st.integers(0, 9)) == 0:
        x.view(-1)[data.draw(st.integers(0, n - 1))] = data.draw(st.sampled_from([float("nan"), float("inf"),
                                                                                   float("-inf")]))
    wire = data.draw(st.sampled_from([*WIRE_FORMATS, "float32", "float32", "float32"]))
    return x, wire


def draw_reply_wire(data, wire: str) -> str:
    return data.draw(st.one_of(st.just(wire), st.just(wire), st.just(wire), st.sampled_from(["int8", "", "f32"])))


def draw_request(data, node: Node) -> tuple[str, dict, list[torch.Tensor], str]:
    h = node.handler
    kind = data.draw(st.sampled_from(["info", "open", "open", "step", "step", "step", "step", "close",
                                      "admit", "forward", "records"]))
    fields: dict = {}
    tensors: list[torch.Tensor] = []
    wire = "float32"
    layers = [h.blocks.start, h.blocks.stop]
    if kind == "info" and data.draw(st.booleans()):  # the model's manifest asked for, or junk for the flag
        fields = {"manifest": data.draw(st.one_of(st.just(True), st.just(False), ANY_VALUE))}
    if kind == "open":
        fields = {"model_id": h.model_id, "layers": layers,
                  "max_length": data.draw(st.one_of(st.integers(1, 40), st.integers(-2, 2000)))}
    elif kind in ("step", "close", "admit"):
        sessions = list(h.sessions.sessions.values())
        session = data.draw(st.sampled_from(sessions)) if sessions and data.draw(st.integers(0, 7)) else None
        # Ids near and past the 64 characters of an id, and one near the header limit: `closed`
        # repeated it, a reply past that limit (review84)
        sid = session.id if session else data.draw(st.one_of(
            st.text(max_size=24), st.text(max_size=24), st.integers(60, 66).map("a".__mul__),
            st.integers(65_490, 65_520).map("x".__mul__)))
        fields = {"session": sid}
        if kind == "admit":  # pins: from a sender's key relaying its session "sa", on to the known peer
            good = st.sampled_from([[k, "sa"] for k in SENDER_KEYS] + [None])
            fields["relay_from"] = data.draw(st.one_of(good, good, good, good, good, good,
                                                       st.lists(st.text(max_size=41), max_size=3),
                                                       st.sampled_from(BAD_RELAY_FROM), ANY_VALUE))
            good = st.sampled_from([[KNOWN_PEER, "next-session"], [MEMBERS[1], "m1"], None])
            fields["relay_to"] = data.draw(st.one_of(good, good, good, good, good, good, ANY_VALUE,
                                                     st.sampled_from(BAD_RELAY_TO)))
        if kind == "step":
            length = session.length if session else 0
            T = data.draw(st.one_of(st.integers(1, 3), st.integers(1, 60)))
            pos = data.draw(st.one_of(st.just(length), st.just(length), st.just(length), st.integers(-3, 100),
                                      st.integers(-(2**63), 2**63 - 1)))
            x, wire = draw_tensor(data, T)
            tensors = [x]
            fields.update({"pos": pos, "wire": draw_reply_wire(data, wire)})
            if session is not None and data.draw(st.integers(0, 3)) == 0:  # relayed: first or last hop
                hop = data.draw(st.integers(0, 3))
                trail = data.draw(st.booleans())  # without: only the previous hop's output comes
                tensors = [x] * (max(1, hop) if trail else 1)
                fields.update({"reply": data.draw(st.integers(0, 2**63 - 1)), "hop": hop,
                               "next": data.draw(st.sampled_from([[], [[KNOWN_PEER, "next-session"]],
                                                                  [[KNOWN_PEER, "elsewhere"]]])),
                               "from": data.draw(st.sampled_from(["sa", "sb", None]))})
                if not trail:
                    fields["trail"] = False
            elif data.draw(st.integers(0, 3)) == 0:  # a relayed step or a rewind, every field drawn
                hop = data.draw(st.one_of(st.just(0), st.integers(0, 3), st.integers(-2, 80)))
                tensors = [x] * data.draw(st.one_of(st.just(max(1, hop)), st.integers(0, 4)))
                fields.update({k: v for k, v in {
                    "reply": data.draw(st.one_of(st.integers(0, 2**63 - 1), ANY_VALUE)),
                    "next": data.draw(st.one_of(st.just([]), st.just([[KNOWN_PEER, "next-session"]]),
                                                st.just([["tcp://10.0.0.9:1", "s"]]), ANY_VALUE,
                                                # chains near 64 hops: with `hop`, one past (review84)
                                                st.integers(60, 66).map(lambda n: [[KNOWN_PEER, "s"]] * n))),
                    "hop": hop, "rewind": data.draw(st.one_of(st.booleans(), ANY_VALUE)),
                    "trail": data.draw(st.one_of(st.booleans(), ANY_VALUE)),
                    "busy": data.draw(st.one_of(st.lists(st.integers(0, 10**6), max_size=4), ANY_VALUE)),
                }.items() if data.draw(st.booleans())})
            # Head-shard nodes take phase steps only; whole-block nodes take them too, and must
            # not let them mix with plain steps (the cache rows a half-stored position lacks).
            if session is not None and (h.head_shard or data.draw(st.integers(0, 3)) == 0):
                phase = data.draw(st.sampled_from(["attn", "attn", "mlp", "bogus"]))
                block = session.start + session.next_block
                fields.update({"phase": phase, "block": data.draw(st.one_of(st.just(block), st.integers(-1, 5)))})
    elif kind == "forward":
        x, wire = draw_tensor(data, data.draw(st.integers(1, 8)))
        tensors = [x]
        fields = {"model_id": h.model_id, "layers": layers, "wire": draw_reply_wire(data, wire)}
    elif kind == "records":
        fields = data.draw(RECORDS_FIELDS)
    return kind, fields, tensors, wire


def build_frames(msg_type: str, req_id: int, fields: dict, tensors: list, wire: str) -> list[bytes]:
    return [bytes(f) for f in encode(msg_type, req_id, fields, tensors, wire)]


def mutate(data, frames: list[bytes], header: dict) -> tuple[list[bytes], bool]:
    """One thing broken (or nothing); returns the frames and whether the header is still intact."""
    how = data.draw(st.sampled_from(["none"] * 14 + ["truncate", "flip", "field", "drop", "junk", "version",
                                                     "tensor_cut", "tensor_grow", "frame_drop", "frame_add",
                                                     "spec", "dtype"]))
    if how == "none":
        return frames, True
    if how in ("truncate", "flip"):
        raw = bytearray(frames[0])
        if how == "truncate":
            raw = raw[:data.draw(st.integers(0, max(0, len(raw) - 1)))]
        else:
            for _ in range(data.draw(st.integers(1, 3))):
                raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
        return [bytes(raw), *frames[1:]], False
    if how == "dtype" and header.get("tensors"):  # a wrong dtype string, the shape kept
        header = {**header, "tensors": [[data.draw(st.sampled_from(["int8", "float64", "F32", ""])), spec[1]]
                                        for spec in header["tensors"]]}
        return [msgpack.packb(header, use_bin_type=True), *frames[1:]], False
    if how in ("field", "drop", "junk", "version", "spec", "dtype"):
        header = dict(header)
        keys = sorted(header)
        if how == "field":
            header[data.draw(st.sampled_from(keys))] = data.draw(ANY_VALUE)
        elif how == "drop":
            del header[data.draw(st.sampled_from(keys))]
        elif how == "junk":
            header[data.draw(st.text(max_size=8))] = data.draw(ANY_VALUE)
        elif how == "version":
            header["v"] = data.draw(st.one_of(ANY_VALUE, st.just(PROTOCOL_VERSION + 1), st.just(0)))
        else:
            header["tensors"] = data.draw(st.one_of(ANY_VALUE, st.lists(st.lists(ANY_VALUE, max_size=3), max_size=3)))
        return [msgpack.packb(header, use_bin_type=True), *frames[1:]], False
    tail = frames[1:]
    if how == "frame_drop" and tail:
        tail = tail[:-1]
    elif how == "frame_add":
        tail = [*tail, data.draw(st.binary(max_size=300))]
    elif tail:
        t = tail[0]
        cut = data.draw(st.integers(0, max(0, len(t) - 1)))
        tail = [t[:cut] if how == "tensor_cut" else t + data.draw(st.binary(min_size=1, max_size=64)), *tail[1:]]
    return [frames[0], *tail], True


def draw_messages(data, node: Node) -> list[dict]:
    """One message (most often) or several (a member's partials of a phase, a flood): dicts of
    `frames`, `ids` (draw_message), `kind` ("plain", "group" for an all-reduce step, "partial"),
    and for the latter two the sender `key` and `peer` they must come with (None: drawn)."""
    h = node.handler
    if h.head_shard and data.draw(st.integers(0, 2 if not h.sessions.sessions else 7)) == 0:
        # a session to step (the drawn opens are mostly refused): all-reduce steps need one; small
        # ones, so that a flood of partials (of up to max_tokens_per_step each) can pass the limit
        layers = data.draw(st.sampled_from([[1, 3], [1, 3], [1, 2], [2, 3]]))
        frames = build_frames("open", node.fresh_id(), {"max_length": data.draw(st.sampled_from([1, 2, 4, 8, 40])),
                                                        "layers": layers}, [], "float32")
        return [{"frames": frames, "ids": {node.next_id}, "kind": "plain", "key": None, "peer": b"peer-a"}]
    if data.draw(st.integers(0, 1 if h.head_shard and h.sessions.sessions else 23)) == 0:
        if data.draw(st.integers(0, 3 if h.groups.steps else 1)) == 0:
            return draw_group_step(data, node)
        return draw_partials(data, node)
    frames, ids = draw_message(data, node)
    return [{"frames": frames, "ids": ids, "kind": "plain", "key": None, "peer": None}]


def draw_message(data, node: Node) -> tuple[list[bytes], set[int] | None]:
    """Frames of one message and the ids its reply may carry (None when the header is broken): its
    own, or for a relayed step the `reply` it names (when its session is held)."""
    if data.draw(st.integers(0, 9)) == 0:  # pure garbage
        return data.draw(st.lists(st.binary(max_size=200), max_size=4)), None
    kind, fields, tensors, wire = draw_request(data, node)
    if node.used and data.draw(st.integers(0, 11)) == 0:
        req_id = data.draw(st.sampled_from(node.used))
    else:
        req_id = node.fresh_id()
    frames = build_frames(kind, req_id, fields, tensors, wire)
    header = msgpack.unpackb(frames[0], raw=False)
    frames, intact = mutate(data, frames, header)
    node.used.append(req_id)
    if not intact or len(frames[0]) > MAX_HEADER_BYTES:  # (a header past the limit is not read)
        return frames, None
    return frames, {req_id, header["reply"]} if isinstance(header.get("reply"), int) else {req_id}


# ----- all-reduce steps and partials (node/all_reduce.py, node/group_step.py) -------------
BAD_RELAY_FROM = [["z" * 40, "sa"], ["\u00e9" * 40, "sa"], ["a" * 39, "sa"], ["ab" * 32, "sa"], [MEMBER_KEYS[0]],
                  [MEMBER_KEYS[0], "s" * 65], [MEMBER_KEYS[0], "sa", "x"], [MEMBER_KEYS[0], 5], [None, "sa"],
                  [MEMBER_KEYS[0].encode(), "sa"], ["#" * 40, "sa"]]
BAD_RELAY_TO = [["x" * 513, "s"], [KNOWN_PEER, "s" * 65], [KNOWN_PEER], [KNOWN_PEER, "s", "t"], [5, "s"],
                ["tcp://10.0.0.9:1#" + MEMBER_KEYS[0], "s"], ["tcp://127.0.0.1:6001#zz", "s"], [], [[KNOWN_PEER, "s"]]]
BAD_CONTACTS = ["tcp://10.0.0.9:1#" + MEMBER_KEYS[0], "tcp://127.0.0.1:6001", "tcp://127.0.0.1:6001#zz",
                "tcp://127.0.0.1:6001#" + "\u00e9" * 64, "tcp://127.0.0.1:6001#" + "g" * 64, "", "#", "x" * 513,
                "tcp://127.0.0.1:6001#" + "\u00e9" * 40, " " + MEMBERS[0], MEMBERS[0] + " "]


def _signed_records() -> list[dict]:
    from nanoswarm.keys.identity import generate_identity
    from nanoswarm.keys.records import DEFAULT_MAX_TTL, sign_record
    expires = time.time() + DEFAULT_MAX_TTL - 1
    return [sign_record(generate_identity(), address=f"tcp://127.0.0.1:{3000 + i}", layers=(0, 1),
                        model_id="fuzz-model" if i % 3 else "another-model", seq=1, expires=expires,
                        heads=(0, 2) if i % 5 == 0 else None)
            for i in range(12)]


# Signed again as the run goes on (`test_fuzz_request_handling`: they live DEFAULT_MAX_TTL), so
# the strategies read the list when they draw (review169: signed at import, a run that began after
# them took every one as expired).
SIGNED = _signed_records()
_SIGNED_WIRE = st.integers(0, len(SIGNED) - 1).map(lambda i: SIGNED[i])
_WIRE = st.one_of(_SIGNED_WIRE, ANY_VALUE, st.fixed_dictionaries(
    {"body": st.one_of(st.binary(max_size=200), _SIGNED_WIRE.map(lambda w: w["body"])),
     "sig": st.one_of(st.binary(max_size=70), _SIGNED_WIRE.map(lambda w: w["sig"]))}),
    _SIGNED_WIRE.map(lambda w: {**w, "sig": w["sig"][:-1] + bytes([w["sig"][-1] ^ 1])}),
    _SIGNED_WIRE.map(lambda w: {**w, "extra": 1}),
    _SIGNED_WIRE.map(lambda w: {"body": w["body"]}))
RECORDS_FIELDS = st.fixed_dictionaries({}, optional={
    "want": st.one_of(st.booleans(), st.booleans(), ANY_VALUE),
    "records": st.one_of(st.lists(_WIRE, max_size=12), st.lists(_WIRE, max_size=12), ANY_VALUE),
    "model_id": st.one_of(st.none(), st.just("fuzz-model"), st.text(max_size=70), ANY_VALUE),
    "after": st.one_of(st.none(), st.just(""), st.text(max_size=45), ANY_VALUE)})


def _member_tensor(data, T: int) -> torch.Tensor:
    x = torch.randn(1, T, N_EMBD, generator=torch.Generator().manual_seed(data.draw(st.integers(0, 99))))
    how = data.draw(st.sampled_from(["ok"] * 12 + ["nan", "inf", "huge", "f16max"]))
    if how == "nan":
        x[0, data.draw(st.integers(0, T - 1)), data.draw(st.integers(0, N_EMBD - 1))] = float("nan")
    elif how == "inf":
        x[0, 0, 0] = float("inf")
    elif how == "huge":
        x = x * 3e38
    elif how == "f16max":
        x = x * 7e4
    return x


def draw_group_step(data, node: Node) -> list[dict]:
    """An all-reduce step (`group`) of a live session (or none), valid or with one thing broken,
    from the session's owner (mostly); half the time followed by the other members' partials of
    its first two phases (a member may be a phase ahead), so that steps get through."""
    h = node.handler
    sessions = list(h.sessions.sessions.values())
    session = data.draw(st.sampled_from(sessions)) if sessions and data.draw(st.integers(0, 9)) else None
    sid = session.id if session else data.draw(st.sampled_from(["nope", "", "x" * 64]))
    length = session.length if session else 0
    T = data.draw(st.one_of(st.just(1), st.just(1), st.integers(1, 3), st.integers(1, 60)))
    n = data.draw(st.sampled_from([2, 2, 2, 3, 4, 4, 1, 5]))  # the tiny model has 4 heads
    me = data.draw(st.integers(0, n - 1))
    contacts = data.draw(st.permutations([KNOWN_PEER, *MEMBERS]))[:n]
    group = [[c, sid if j == me else f"m{j}-session"] for j, c in enumerate(contacts)]
    fields: dict = {"session": sid, "pos": length, "group": group, "member": me}
    epoch = session.epoch if session else 0
    if epoch:
        fields["epoch"] = epoch
    running = [g.session for g in h.groups.steps.values() if h.sessions.sessions.get(g.session.id) is g.session]
    rewound = session is not None and data.draw(st.integers(0, 5)) == 0 or bool(running) and data.draw(
        st.integers(0, 3)) == 0
    if rewound:  # after a step cut short (one may still run here): back to a held position, a new epoch
        if running and (session is None or data.draw(st.booleans())):  # one whose step still runs: ended by it
            session = data.draw(st.sampled_from(running))
            sid, length, epoch = session.id, session.length, session.epoch
            fields["session"] = group[me][1] = sid
        epoch += data.draw(st.sampled_from([1, 1, 1, 2, 0]))  # (0: refused, not a greater one)
        fields.update(rewind=True, epoch=epoch, pos=data.draw(st.integers(0, length)))
    if data.draw(st.booleans()):
        fields["wait"] = data.draw(st.one_of(st.floats(0.05, 2.0), st.just(5), st.none()))
    if data.draw(st.integers(0, 3)) == 0:
        fields["wire"] = data.draw(st.sampled_from([*WIRE_FORMATS, "float32"]))
    if data.draw(st.integers(0, 3)) == 0:
        fields["last"] = data.draw(st.integers(1, T))
    x = _member_tensor(data, T)
    wire = "float32"
    broken = data.draw(st.sampled_from(["none"] * 10 + [
        "group", "entry", "length", "member", "own_missing", "own_twice", "contact", "wait", "phase", "relay",
        "pos", "tensor", "last", "session_twice", "drop", "epoch"]))
    if broken == "group":
        fields["group"] = data.draw(ANY_VALUE)
    elif broken == "entry":
        j = data.draw(st.integers(0, n - 1))
        c, s_ = group[j]
        group[j] = data.draw(st.sampled_from([[c], [c, s_, 1], [1, s_], [c, 5], c, None, [c, "x" * 65], [[c, s_]],
                                              ["x" * 513, s_], [c.encode(), s_], {"contact": c}]))
    elif broken == "length":
        fields["group"] = data.draw(st.sampled_from([[], group[:1], group * 3, [group[0]] * 65,
                                                     [[f"tcp://127.0.0.1:{7000 + k}#{MEMBER_KEYS[0]}", "s"]
                                                      for k in range(70)]]))
    elif broken == "member":
        fields["member"] = data.draw(st.one_of(st.sampled_from([-1, n, n + 1, 4, 5, 2**63 - 1, -(2**63), 2**64 - 1,
                                                                None, True, 1.0, "0"]), ANY_VALUE))
    elif broken == "own_missing":
        group[me][1] = data.draw(st.sampled_from(["someone-else", "", sid + "x"]))
    elif broken == "own_twice":
        j = data.draw(st.integers(0, n - 1))
        group.append(list(group[j]))  # a contact twice (the same entry, or the node's own)
    elif broken == "session_twice" and n > 1:
        group[(me + 1) % n][1] = sid  # two members of one session, at two contacts
    elif broken == "contact":
        j = data.draw(st.integers(0, n - 1))
        group[j][0] = data.draw(st.sampled_from(BAD_CONTACTS))
    elif broken == "wait":
        fields["wait"] = data.draw(st.one_of(st.sampled_from(
            [-1, -1e300, 0, 0.0, 1e300, float("nan"), float("inf"), float("-inf"), 2**64 - 1, -(2**63), 10**6,
             1e-320, True, "5"]), ANY_VALUE))
    elif broken == "phase":
        start = session.start if session else 0
        fields.update({k: v for k, v in (("phase", data.draw(st.sampled_from(["attn", "mlp", "x", None]))),
                                         ("block", data.draw(st.sampled_from([start, start + 1, -1, None]))))
                       if data.draw(st.booleans())} or {"phase": "attn", "block": start})
    elif broken == "relay":
        fields[data.draw(st.sampled_from(["reply", "next", "hop", "trail", "from", "rewind", "busy"]))] = data.draw(
            st.sampled_from([0, 1, [], [[KNOWN_PEER, "s"]], True, False, "sa", [5]]))
    elif broken == "pos":
        fields["pos"] = data.draw(st.one_of(st.sampled_from([length - 1, length + 1, -1, 2**63 - 1, -(2**63)]),
                                            st.integers(-3, 100)))
    elif broken == "tensor":
        x, wire = draw_tensor(data, T)
    elif broken == "last":
        fields["last"] = data.draw(st.one_of(st.sampled_from([0, -1, T + 1, 2**63 - 1]), ANY_VALUE))
    elif broken == "drop":
        del fields[data.draw(st.sampled_from(["session", "pos", "group", "member"]))]
    elif broken == "epoch":
        fields["epoch"] = data.draw(st.one_of(st.sampled_from([epoch - 1, epoch + 1, -1, 2**63 - 1, None, True]),
                                              ANY_VALUE))
    req_id = node.group_id()
    sent = build_frames("step", req_id, fields, [x], wire)
    frames, _ = mutate(data, sent, msgpack.unpackb(sent[0], raw=False))
    # exact: sent as drawn, a valid step (its session as it was when drawn, if nothing before it
    # in the batch moved it): its outcome can be checked against what was sent
    info = {"session": sid, "pos": fields.get("pos"), "T": T, "last": fields.get("last"), "group": group,
            "me": me, "wire": fields.get("wire") or "float32", "replies": 0, "started": False,
            "exact": broken == "none" and frames is sent and (not rewound or epoch > session.epoch),
            "rewound": rewound}
    owner = session.peer if session is not None and data.draw(st.integers(0, 7)) else None
    out = [{"frames": frames, "ids": None, "kind": "group", "key": None, "peer": owner, "info": info}]
    if session is not None and broken in ("none", "wait", "pos", "last", "tensor") and data.draw(st.booleans()):
        wire = info["wire"] if info["wire"] in WIRE_FORMATS else "float32"
        for phase in ("attn", "mlp")[:data.draw(st.integers(1, 2))]:
            for j, (c, _) in enumerate(group):
                if j != me:
                    f = {"session": sid, "pos": fields["pos"], "block": session.start, "phase": phase, "member": j,
                         **({"epoch": epoch} if epoch else {})}
                    out.append(_partial_message(node, f, _member_tensor(data, T), wire, _contact_key(c),
                                                data.draw(st.sampled_from([b"member-1", b"member-2"]))))
    return out


def _partial_message(node: Node, fields: dict, x: torch.Tensor | None, wire: str, key, peer=None,
                     req_id: int | None = None) -> dict:
    frames = build_frames("partial", node.group_id() if req_id is None else req_id, fields,
                          [] if x is None else [x], wire)
    return {"frames": frames, "ids": None, "kind": "partial", "key": key, "peer": peer}


def draw_partials(data, node: Node) -> list[dict]:
    """Partials from other members: for a step in flight (its phase, or the next), all of a phase's
    at once (so that steps get through), before any step, for no step or session, out of turn,
    from the wrong member or key, of wrong shapes, formats and values, repeated, or a flood."""
    h = node.handler
    steps = list(h.groups.steps.values())
    live = list(h.sessions.sessions.values())
    mode = data.draw(st.sampled_from(["step"] * 4 + ["complete"] * 6 + ["early"] * 3 +
                                     ["unknown", "future", "flood", "dup", "dup_id", "broken"]))
    if not steps and mode in ("step", "complete", "future", "dup", "dup_id", "broken"):
        mode = "early" if live and data.draw(st.integers(0, 3)) else "unknown"
    if mode == "early" and not live:
        mode = "unknown"
    wire = data.draw(st.sampled_from(["float32"] * 4 + list(WIRE_FORMATS)))
    if mode == "unknown":
        fields = {"session": data.draw(st.sampled_from(["nope", "", "x" * 64])), "pos": 0, "block": 1,
                  "phase": "attn", "member": 1}
        return [_partial_message(node, fields, torch.zeros(1, 1, N_EMBD), wire, None)]
    if mode in ("early", "flood"):
        out = []
        # a flood: every member's partial (the most positions a partial takes) for each session
        targets = [(data.draw(st.sampled_from(live)), data.draw(st.sampled_from([0, 1, 2, 3, 1, 1, 4, -1])))] \
            if mode == "early" else [(s, j) for s in live if s.id not in h.groups.steps for j in range(4)]
        for s, member in targets:
            T = data.draw(st.sampled_from([1, 1, 2, 3, LIMITS.max_tokens_per_step])) if mode == "early" \
                else LIMITS.max_tokens_per_step
            fields = {"session": s.id, "pos": s.length, "block": s.start, "phase": "attn", "member": member}
            if s.epoch:
                fields["epoch"] = s.epoch
            if mode == "early" and data.draw(st.integers(0, 4)) == 0:
                fields[data.draw(st.sampled_from(["pos", "block", "phase"]))] = data.draw(
                    st.sampled_from([s.length + 1, s.start + 1, "mlp", -1]))
            out.append(_partial_message(node, fields, _member_tensor(data, T), wire,
                                        data.draw(st.sampled_from([*MEMBER_KEYS[:4], None]))))
        return out
    g = data.draw(st.sampled_from(steps))
    others = [j for j in range(len(g.members)) if j != g.me]
    phases = [(g.block, g.phase), (g.block, "mlp") if g.phase == "attn" else (g.block + 1, "attn")]
    T = g.shape[1]
    key_of = {j: (g.keys[j] if g.keys[j] is not None else _contact_key(g.members[j][0])) for j in others}
    peer = data.draw(st.sampled_from([b"member-1", b"member-2"]))

    epoch = {"epoch": g.epoch} if g.epoch else {}

    def one(j: int, block: int, phase: str) -> dict:
        fields = {"session": g.session.id, "pos": g.pos, "block": block, "phase": phase, "member": j, **epoch}
        return _partial_message(node, fields, _member_tensor(data, T), wire, key_of[j], peer)
    if mode == "complete":
        out = [one(j, *phases[0]) for j in others]
        if data.draw(st.integers(0, 3)) == 0:  # a member a phase ahead
            out += [one(j, *phases[1]) for j in others]
        return out
    j = data.draw(st.sampled_from(others))
    block, phase = phases[data.draw(st.integers(0, 1))]
    if mode == "future":  # two phases ahead, or behind
        block, phase = data.draw(st.sampled_from([(g.block + 1, g.phase), (g.block - 1, g.phase), (g.block + 2, "attn"),
                                                  (g.block, "bogus")]))
    msg = one(j, block, phase)
    if mode == "dup":  # the same partial twice: a repeat of the id, or the same phase again
        again = dict(msg)
        return [msg, again]
    if mode == "dup_id":
        return [msg, one(j, block, phase)]
    if mode == "broken":
        fields = {"session": g.session.id, "pos": g.pos, "block": block, "phase": phase, "member": j, **epoch}
        x = _member_tensor(data, T)
        how = data.draw(st.sampled_from(["member", "pos", "shape", "key", "tensors", "field", "epoch"]))
        key = key_of[j]
        if how == "member":
            fields["member"] = data.draw(st.sampled_from([g.me, len(g.members), -1, 2**63 - 1, 4, 5]))
        elif how == "pos":
            fields["pos"] = data.draw(st.sampled_from([g.pos - 1, g.pos + 1, -1, 2**63 - 1]))
        elif how == "shape":
            x = data.draw(st.sampled_from([torch.zeros(1, T + 1, N_EMBD), torch.zeros(1, T, N_EMBD + 1),
                                           torch.zeros(2, T, N_EMBD), torch.zeros(T, N_EMBD), torch.zeros(1, 0, N_EMBD),
                                           torch.zeros(1, T, N_EMBD, 1), torch.zeros(0), torch.zeros(1, 49, N_EMBD)]))
        elif how == "key":
            key = data.draw(st.sampled_from([None, *SENDER_KEYS, *(key_of[i] for i in others if i != j),
                                             MEMBER_KEYS[4]]))
        elif how == "epoch":  # a rewound step's (kept for it), or one's that was rewound (refused)
            fields["epoch"] = data.draw(st.sampled_from([g.epoch - 1, g.epoch + 1, g.epoch + 1, -1, 2**63 - 1, None]))
        elif how == "tensors":
            frames = build_frames("partial", node.group_id(), fields, data.draw(st.sampled_from([[], [x, x]])), wire)
            return [{"frames": frames, "ids": None, "kind": "partial", "key": key, "peer": peer}]
        else:
            fields[data.draw(st.sampled_from(["session", "pos", "block", "phase", "member", "epoch"]))] = \
                data.draw(ANY_VALUE)
        return [_partial_message(node, fields, x, wire, key, peer)]
    return [msg]


def _names_reply(frames: list) -> bool:
    try:
        header = msgpack.unpackb(frames[0], raw=False)
    except (ValueError, msgpack.UnpackException):  # (peek_id's reading, which the reply's id comes from)
        return False
    return isinstance(header, dict) and "reply" in header


def _contact_key(contact: str) -> str | None:
    from nanoswarm.keys.contact import split_contact
    try:
        key = split_contact(contact)[1]
    except ValueError:
        return None
    return None if key is None else key.decode()


# ----- checks ----------------------------------------------------------------------------
def check_reply(frames: list, n_embd: int, seen: Counter, now: float | None = None) -> dict:
    """One reply, well formed (`now`: the wall-clock time its batch went in, at which the records
    of a `records_reply` were live)."""
    msg = decode(frames)  # a node reply must always decode
    if msg.type == "error":
        code = msg.fields["code"]
        assert code in KNOWN_CODES, f"error reply with code {code!r}: {msg.fields['message']}"
        seen[code] += 1
    else:
        assert msg.type in REPLY_TYPE.values(), msg.type
        seen[msg.type] += 1
        # An id a node issued, never one repeated from a request however long (review84)
        assert len(msg.fields.get("session", "")) <= MAX_ID_CHARS
        if msg.type == "result":  # a relayed step's last hop also returns the hops before it
            assert 1 <= len(msg.tensors) <= 65
            y = msg.tensors[-1]
            assert y.dim() == 3 and y.shape[2] == n_embd
            assert bool(torch.isfinite(y).all())
        if msg.type == "info_reply" and "manifest" in msg.fields:  # asked for: the model's, as set
            assert msg.fields["manifest"] == MANIFEST
        if msg.type == "records_reply":  # a table's records: each one verifies, pages at most MAX_WIRES
            from nanoswarm.keys.records import verify_record
            from nanoswarm.node.gossip import MAX_WIRES
            assert len(msg.fields["records"]) <= MAX_WIRES
            for w in msg.fields["records"]:
                verify_record(w, now=now)
            assert msg.fields.get("after") is None or isinstance(msg.fields["after"], str)
    return {"id": msg.id, "type": msg.type, "fields": msg.fields,
            "shape": tuple(msg.tensors[-1].shape) if msg.type == "result" else None}


def check_memory(node: Node) -> None:
    store, limits = node.handler.sessions, node.handler.limits
    assert store.kv_bytes == sum(s.cache.nbytes for s in store.sessions.values())
    assert store.kv_bytes <= limits.kv_budget_bytes
    assert len(store.sessions) <= limits.max_sessions
    groups = node.handler.groups.steps
    for s in store.sessions.values():
        assert 0 <= s.length <= s.cache.max_length <= limits.max_session_length
        # Rows below the length were written by the session (the maps start as NaN: Node). (Those
        # of an all-reduce step under way may hold what a member's NaN partial made: the step
        # fails at its end, the session as before it.)
        g = groups.get(s.id)
        written = s.length if g is None or g.session is not s else min(s.length, g.pos)
        for name, rows in (("k", s.cache.k), ("v", s.cache.v)):
            assert not rows[..., :written, :].isnan().any(), f"length {s.length} covers {name} rows never written"
    # The pool of closed sessions' maps fits in what live caches leave, and no map serves twice.
    assert store.pool.nbytes <= min(store.pool.max_bytes, limits.kv_budget_bytes - store.kv_bytes)
    maps = [m for s in store.sessions.values() for m in s.maps] + [m for _, m in store.pool._maps]
    assert len({id(m) for m in maps}) == len(maps)


def check_partial_sent(to, frames: list, node: Node, seen: Counter) -> None:
    """A partial an all-reduce step sends another member: well formed, to a member its step names
    (not itself), for that member's session, of the step's positions and wire."""
    msg = decode(frames)
    assert msg.type == "partial", msg.type
    info = node.group_steps.get((to.owner, to.reply))
    assert info is not None or node.unclear, f"a partial for no all-reduce step the fuzzer sent: {to}"
    info = info or {"exact": False}
    f = msg.fields
    assert to.session == f["session"]
    assert f["phase"] in ("attn", "mlp") and isinstance(f["block"], int)
    [(wire, shape)] = msg.specs
    assert len(shape) == 3 and shape[0] == 1 and shape[2] == N_EMBD
    if info["exact"]:
        members = {c: s_ for c, s_ in info["group"]}
        assert to.contact in members and members[to.contact] == f["session"], (to, f)
        assert f["member"] == info["me"] and f["pos"] == info["pos"] and shape[1] == info["T"], f
        assert wire == info["wire"], (wire, info["wire"])
        if wire != "float32":  # (float32 partials go as computed: a member's NaN makes the sums so)
            assert bool(torch.isfinite(msg.tensor(0)).all())
    seen["partial sent"] += 1


def check_groups(node: Node) -> None:
    """All-reduce bookkeeping: the kept partials' bytes as counted and within the limit; a step in
    flight holds its session between its position and the end of its positions."""
    groups, h = node.handler.groups, node.handler
    kept = sum(entry[3] for per in groups.kept.by_session.values() for entry in per.values()) * groups.kept._row_bytes
    assert groups.kept.bytes == kept, (groups.kept.bytes, kept)
    assert 0 <= kept <= KEPT_MESSAGES * LIMITS.max_message_bytes
    for sid, g in groups.steps.items():
        assert g.session.id == sid
        if h.sessions.sessions.get(sid) is g.session:
            assert g.pos <= g.session.length <= g.pos + g.shape[1], (g.pos, g.session.length)
            assert g.session.start <= g.block < g.session.stop


def run_batch(node: Node, data, seen: Counter, counts: Counter) -> None:
    """One batch of messages drawn for `node`, through handle_batch, and every reply checked."""
    peers = [b"peer-a"] * 4 + [b"peer-b", data.draw(st.binary(min_size=1, max_size=8))]
    batch, descs = [], []
    for _ in range(data.draw(st.integers(1, 8))):
        for d in draw_messages(data, node):
            peer = d["peer"] or data.draw(st.sampled_from(peers))
            if d["frames"]:
                node.senders[id(d["frames"][0])] = d["key"] if d["kind"] == "partial" and data.draw(
                    st.integers(0, 7)) else data.draw(st.sampled_from([*SENDER_KEYS, *MEMBER_KEYS[:2], None]))
            d["peer"] = peer
            batch.append((peer, d["frames"]))
            descs.append(d)
    for d in descs:  # (recorded before the batch runs: its partials may be sent within it)
        if d["kind"] == "group":
            d["key_id"] = (d["peer"], peek_id(d["frames"][0]) if d["frames"] else 0)
            if d["key_id"][1] >= GROUP_IDS and not _names_reply(d["frames"]):
                node.group_steps[d["key_id"]] = d["info"]
            else:  # a broken header's id may be any other message's; one with `reply` is answered with that
                node.unclear = True
                d["key_id"] = (d["peer"], -1)
    waiting = {k for k, info in node.group_steps.items() if info["started"] and not info["replies"]}
    replies = node.handle(batch)
    counts["messages"] += len(batch)
    check_replies(node, replies, seen, descs, waiting)


def check_replies(node: Node, replies: list, seen: Counter, descs: list[dict], waiting: set) -> None:
    """Exactly one reply per message, except for partials taken (none) and all-reduce steps under
    way (theirs comes with a later batch, or from expire); each well formed."""
    sent, node.sent[:] = list(node.sent), []
    for to, f in sent:  # (groups.send: partials only)
        assert isinstance(to, Relay)
        check_partial_sent(to, f, node, seen)
    got_ids: Counter = Counter()
    by_key: Counter = Counter()
    n_replies = 0
    for to, f in replies:
        if isinstance(to, Relay):
            msg = decode(f)
            if msg.type == "partial":  # an all-reduce step's partial to another member
                check_partial_sent(to, f, node, seen)
                continue
            # passed on: a well-formed step for a known next hop
            assert msg.type == "step" and to.contact in KNOWN and msg.fields["hop"] >= 1
            # ... that the next hop can take: within the chain's limits (review84)
            assert msg.fields["hop"] + len(msg.fields.get("next") or []) <= MAX_HOPS, msg.fields["hop"]
            got_ids[to.reply] += 1
            seen["relayed"] += 1
            n_replies += 1
        else:
            reply = check_reply(f, node.handler.config.n_embd, seen, node.batch_time)
            got_ids[reply["id"]] += 1
            by_key[(to, reply["id"])] += 1
            n_replies += 1
            info = node.group_steps.get((to, reply["id"]))
            if info is not None:
                check_group_reply(node, info, reply, seen)
    ours = Counter(d["key_id"] if d["kind"] == "group" else (d["peer"], peek_id(d["frames"][0]) if d["frames"] else 0)
                   for d in descs if d["kind"] != "plain")
    for d in descs:
        if d["kind"] == "plain" and d["ids"] is not None:
            assert any(got_ids[i] for i in d["ids"]), f"no reply carries request id {d['ids']}"
    # Replies to steps of earlier batches that waited for partials; then the messages of this one
    # that got none: partials taken, all-reduce steps under way.
    late = sum(by_key[k] for k in waiting)
    silent = 0
    clean = not node.unclear and all(k[1] >= GROUP_IDS for k in ours)  # (a broken header's id may be any other's)
    for k, m in ours.items():
        if clean:
            assert by_key[k] <= m, f"{by_key[k]} replies to {m} messages of id {k[1]}"
        silent += max(0, m - by_key[k])
    if clean:
        assert n_replies == len(descs) - silent + late, (n_replies, len(descs), silent, late)
    else:
        assert len(descs) - sum(ours.values()) + late <= n_replies
        assert node.unclear or n_replies <= len(descs) + late
    for d in descs:
        if d["kind"] == "group" and d["key_id"][1] >= GROUP_IDS and not by_key[d["key_id"]]:
            d["info"]["started"] = True
            seen["all-reduce under way"] += 1
    for k in waiting:
        assert by_key[k] <= 1
    check_memory(node)
    check_groups(node)


def check_group_reply(node: Node, info: dict, reply: dict, seen: Counter) -> None:
    """An all-reduce step's one reply: a result of its positions, the session a step longer; or an
    error, the session as before the step (one that was under way: its position)."""
    info["replies"] += 1
    assert info["replies"] == 1, f"an all-reduce step answered twice: {reply}"
    session = node.handler.sessions.sessions.get(info["session"])
    if reply["type"] == "result":
        seen["all-reduce result"] += 1
        seen["rewound all-reduce result"] += info.get("rewound", False)
        if info["exact"] and session is not None:
            assert session.length == info["pos"] + info["T"] and session.next_block == 0, (session.length, info)
            want = info["last"] or info["T"]
            assert reply["shape"][1] == want, (reply["shape"], info)
    elif "a rewound step of this session ended this one" in reply["fields"]["message"]:
        seen["all-reduce step ended by a rewind"] += 1  # (the rewound step holds the session now)
    elif info["started"] and info["exact"] and session is not None:
        assert session.length == info["pos"] and session.next_block == 0, (session.length, info, reply)


def flood_partials(node: Node, data, seen: Counter) -> None:
    """As many sessions as the node holds, and every member's partial of the most positions for
    each (before any step): as much as the node keeps (KEPT_MESSAGES messages' bytes) where the
    sessions' lengths allow it, the rest refused `busy` (a partial longer than its session can
    take is refused `bad_position`: review168)."""
    h = node.handler
    opens = [{"frames": build_frames("open", node.fresh_id(), {"max_length": LIMITS.max_tokens_per_step}, [],
                                     "float32"), "ids": {node.next_id}, "kind": "plain", "peer": b"peer-a"}
             for _ in range(LIMITS.max_sessions - len(h.sessions.sessions))]
    # (checked as any batch is: its end may release a held all-reduce step, whose partials and
    # result come with the opens' replies: review169)
    waiting = {k for k, info in node.group_steps.items() if info["started"] and not info["replies"]}
    check_replies(node, node.handle([(d["peer"], d["frames"]) for d in opens]), seen, opens, waiting)
    descs = []
    for s in h.sessions.sessions.values():
        if s.id not in h.groups.steps:
            for j in range(4):
                f = {"session": s.id, "pos": s.length, "block": s.start, "phase": "attn", "member": j}
                descs.append(_partial_message(node, f, torch.randn(1, LIMITS.max_tokens_per_step, N_EMBD),
                                              data.draw(st.sampled_from(["float32", "q80"])), MEMBER_KEYS[j],
                                              b"member-1"))
    for d in descs:
        node.senders[id(d["frames"][0])] = d["key"]
    waiting = {k for k, info in node.group_steps.items() if info["started"] and not info["replies"]}
    replies = node.handle([(d["peer"], d["frames"]) for d in descs])
    for _, f in replies:
        msg = decode(f)
        if msg.type == "error" and "keeps as many partials" in msg.fields["message"]:
            seen["partials kept to the limit"] += 1
    check_replies(node, replies, seen, descs, waiting)


def complete_group_steps(node: Node, seen: Counter) -> None:
    """The other members' partials of every phase of the steps in flight, phase by phase (as
    members that compute them send them), in batches of their own; each batch checked."""
    for _ in range(2 * LIMITS.max_session_length):
        steps = list(node.handler.groups.steps.values())
        if not steps:
            return
        descs = []
        for g in steps:
            for j in range(len(g.members)):
                if j != g.me:
                    f = {"session": g.session.id, "pos": g.pos, "block": g.block, "phase": g.phase, "member": j,
                         **({"epoch": g.epoch} if g.epoch else {})}
                    y = torch.randn(g.shape, generator=torch.Generator().manual_seed(j))
                    descs.append(_partial_message(node, f, y, g.wire,
                                                  g.keys[j] or _contact_key(g.members[j][0]), b"member-1"))
        for d in descs:
            node.senders[id(d["frames"][0])] = d["key"]
        waiting = {k for k, info in node.group_steps.items() if info["started"] and not info["replies"]}
        check_replies(node, node.handle([(d["peer"], d["frames"]) for d in descs]), seen, descs, waiting)
        if node.handler.groups._held:
            time.sleep(0.004)


def finish_group_steps(node: Node, seen: Counter) -> None:
    """At a case's end: every all-reduce step still waiting fails (its wait run out: expire), each
    answered once, unless its client closed its session; nothing is left kept."""
    groups = node.handler.groups
    for _ in range(50):
        if not groups.steps:
            break
        waiting = {k for k, info in node.group_steps.items() if info["started"] and not info["replies"]}
        check_replies(node, groups.expire(now=time.monotonic() + 1e6), seen, [], waiting)
        if groups.steps:
            time.sleep(0.004)  # (a step held for its phase-mates: HOLD_SECONDS)
    assert not groups.steps, "all-reduce steps left waiting after their wait ran out"
    for info in node.group_steps.values():
        if info["started"] and not info["replies"]:
            assert info["session"] not in node.handler.sessions.sessions, f"an all-reduce step never answered: {info}"
    groups.forget_stale(now=float("inf"))
    assert not groups.kept and groups.kept.bytes == 0


def scripted_all_reduce(node: Node, seen: Counter) -> None:
    """One valid all-reduce step through a head shard, the other member's partials sent phase by
    phase, checked as the fuzzed ones are: whatever the draws reached, the run reaches a result
    (review169: 5 of 40 runs of 200 cases got none, and the run was then repeated)."""
    [(_, frames)] = node.handle([(b"peer-a", build_frames("open", node.fresh_id(), {"max_length": 8, "layers": [1, 3]},
                                                          [], "float32"))])
    sid = check_reply(frames, N_EMBD, seen)["fields"]["session"]
    group = [[MEMBERS[0], sid], [MEMBERS[1], "m1-session"]]
    req_id = node.group_id()
    frames = build_frames("step", req_id, {"session": sid, "pos": 0, "group": group, "member": 0},
                          [torch.randn(1, 1, N_EMBD)], "float32")
    info = {"session": sid, "pos": 0, "T": 1, "last": None, "group": group, "me": 0, "wire": "float32",
            "exact": True, "replies": 0, "started": False}
    step = {"frames": frames, "ids": None, "kind": "group", "key": None, "peer": b"peer-a", "info": info,
            "key_id": (b"peer-a", req_id)}
    node.group_steps[step["key_id"]] = info
    check_replies(node, node.handle([(b"peer-a", frames)]), seen, [step], set())
    complete_group_steps(node, seen)
    assert info["replies"] == 1, "a valid all-reduce step with every partial sent got no answer"


def scripted_records(node: Node, seen: Counter) -> None:
    """One valid `records` request to a node with a real table, checked as the fuzzed ones are:
    the draws reach a table's `records_reply` by chance (7-38 in 200 cases; none in one clean
    CI run of the sixty-first session, which then failed the coverage check below)."""
    [(_, frames)] = node.handle([(b"peer-r", build_frames("records", node.fresh_id(), {"records": [], "want": True},
                                                          [], "float32"))])
    assert check_reply(frames, N_EMBD, seen, node.batch_time)["type"] == "records_reply"


@pytest.mark.fuzz
def test_fuzz_request_handling(served, tiny_model_dir):
    """Each case: a fresh handler (the blocks are shared) and 1-6 batches of 1-8 messages."""
    from nanoswarm.keys.identity import generate_identity
    from nanoswarm.node.gossip import Gossip

    seen: Counter = Counter()
    counts: Counter = Counter()
    last: list[Node] = [Node(*served[0])]
    table_node = Node(*served[0])  # a real table's `records` (node/gossip.py), for half the nodes
    gossip = Gossip(generate_identity(), table_node.handler, "tcp://127.0.0.1:7001")
    signed_at = [-math.inf]

    def fresh_records() -> None:
        """The drawn records and the table's signed again well before they expire (its own lives
        a minute, the others DEFAULT_MAX_TTL): a long run outlives both (review169)."""
        if time.monotonic() - signed_at[0] > 20.0:
            SIGNED[:] = _signed_records()
            gossip.refresh()
            gossip.offer_all(SIGNED[:6])
            signed_at[0] = time.monotonic()

    @settings(max_examples=CASES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(st.data())
    def one_case(data) -> None:
        fresh_records()
        node = Node(*served[data.draw(st.integers(0, 1))])
        if data.draw(st.booleans()):
            node.check_senders()
        if data.draw(st.booleans()):
            node.handler.on_records = gossip.on_records
        if data.draw(st.booleans()):  # partials sent the moment they are computed, as node/server.py has them
            node.handler.groups.send = node.sent.extend
        for _ in range(data.draw(st.integers(1, 6))):
            if node.handler.head_shard and data.draw(st.integers(0, 29)) == 0:
                flood_partials(node, data, seen)
            if data.draw(st.integers(0, 9)) == 0:  # time passes: idle sessions are reclaimed
                node.clock.now += data.draw(st.sampled_from([1.0, LIMITS.idle_timeout + 1]))
                node.handler.expire_idle()
                if data.draw(st.booleans()):
                    node.handler.groups.forget_stale(now=time.monotonic() + data.draw(st.sampled_from([0, 61])))
            run_batch(node, data, seen, counts)
        if data.draw(st.integers(0, 3)):  # (else they wait until expire fails them)
            complete_group_steps(node, seen)
        finish_group_steps(node, seen)
        counts["cases"] += 1
        if node.handler.blocks is served[0][0]:
            last[0] = node

    t0 = time.perf_counter()
    try:
        one_case()
        fresh_records()
        table_node.handler.on_records = gossip.on_records
        scripted_records(table_node, seen)
    finally:
        gossip.close()
    scripted_all_reduce(Node(*served[1]), seen)
    seconds = time.perf_counter() - t0
    print(f"\nfuzz: {counts['cases']} cases, {counts['messages']} messages, 0 crashes, {seconds:.1f} s; "
          f"replies: {dict(sorted(seen.items()))}")
    assert counts["cases"] >= min(CASES, 100)
    # The fuzzer must reach real work, not only refusals at the door.
    assert seen["result"] > 0 and seen["opened"] > 0 and seen["malformed"] > 0
    assert seen["partial sent"] > 0 and seen["all-reduce result"] > 0 and seen["records_reply"] > 0
    assert_still_serves(last[0], tiny_model_dir)


@pytest.mark.fuzz
def test_fuzz_sessions_read_only_cache_rows_they_wrote(served):
    """Nearly valid step sequences (plain, rewind, attention and MLP phases, in and out of block
    order, one position over different token counts, pipelined and batched, NaN inputs that are
    refused and undone) on nodes whose cache memory starts as NaN: no session's length may
    cover a row it did not write. The broad fuzzer above rarely gets two steps of a session
    through; this one mostly does."""
    seen: Counter = Counter()

    @settings(max_examples=max(CASES // 2, 50), deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def one_case(data) -> None:
        node = Node(*served[data.draw(st.integers(0, 1))])
        if data.draw(st.booleans()):
            node.check_senders()
        h = node.handler
        for _ in range(data.draw(st.integers(1, 12))):
            batch = [(b"peer", _near_valid_request(data, node, seen)) for _ in range(data.draw(st.integers(1, 4)))]
            for _, frames in h.handle_batch(batch):
                msg = decode(frames)
                assert msg.type != "error" or msg.fields["code"] != "internal", msg.fields
                seen[msg.type if msg.type != "error" else msg.fields["code"]] += 1
            check_memory(node)

    one_case()
    if not seen["attn after the first block"] or not seen["phase rewind"]:  # 100 cases once had none: 100 more
        one_case()
    # It must get steps through, phase steps after the first block of a position included.
    assert seen["result"] > 0 and seen["attn after the first block"] > 0 and seen["phase rewind"] > 0, dict(seen)


def _near_valid_request(data, node: Node, seen: Counter) -> list:
    h = node.handler
    live = list(h.sessions.sessions.values())
    kind = data.draw(st.sampled_from(["open", "close", "step", "step", "step", "step", "step"]))
    if kind == "open" or not live:
        a = data.draw(st.integers(h.blocks.start, h.blocks.stop - 1))
        b = data.draw(st.integers(a + 1, h.blocks.stop))
        return encode("open", node.fresh_id(), {"layers": [a, b], "max_length": data.draw(st.integers(1, 24))})
    s = data.draw(st.sampled_from(live))
    if kind == "close":
        return encode("close", node.fresh_id(), {"session": s.id})
    T = data.draw(st.sampled_from([1, 1, 2, 3, s.pending_tokens or 1]))
    pos = data.draw(st.one_of(st.just(s.length), st.just(s.length), st.just(s.length), st.integers(0, s.length + 1)))
    fields = {"session": s.id, "pos": pos}
    # A session part-way through a position's phases goes on with them half the time (a client
    # always does); a third of the time, as at a position's start, was too rare to rely on.
    if h.head_shard or data.draw(st.integers(0, 1 if s.next_block else 2)) == 0:
        expected = s.start + s.next_block
        block = data.draw(st.one_of(st.just(expected), st.just(expected), st.integers(s.start, s.stop - 1)))
        fields.update(phase=data.draw(st.sampled_from(["attn", "attn", "mlp"])), block=block)
        if fields["phase"] == "attn" and s.next_block and block == expected:
            seen["attn after the first block"] += 1
        if data.draw(st.integers(0, 7)) == 0:  # refused but at the attention of the first block
            fields["rewind"] = True
            if data.draw(st.booleans()):  # (where it takes: the first block's attention, back to a held position)
                fields.update(phase="attn", block=s.start, pos=data.draw(st.integers(0, s.length)))
            held = s.length + (s.next_block > 0)  # (a position stored in part is dropped too)
            seen["phase rewind"] += fields["phase"] == "attn" and fields["block"] == s.start and fields["pos"] < held
    elif data.draw(st.integers(0, 5)) == 0:
        fields["rewind"] = True
    x = torch.randn(1, T, N_EMBD, generator=torch.Generator().manual_seed(data.draw(st.integers(0, 99))))
    if data.draw(st.integers(0, 19)) == 0:
        x[0, 0, 0] = float("nan")  # refused, and the step undone
    return encode("step", node.fresh_id(), fields, [x])


def assert_still_serves(node: Node, model_dir) -> None:
    """After the storm, on the last fuzzed whole-block handler: its sessions closed, a fresh
    session's logits equal the single-process model's."""
    for sid in list(node.handler.sessions.sessions):
        node.handler.sessions.close(sid)
    assert node.handler.sessions.kv_bytes == 0
    client = ClientModel(load_embeddings(model_dir), load_head(model_dir))
    ids = torch.randint(0, 50257, (20,), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        want = load_model(model_dir)(ids[None])[0][7:]
    sid = _request(node, "open", {"max_length": 20})["fields"]["session"]
    got = [client.logits(_step(node, sid, 0, client.embed(ids[:8].tolist(), 0)))]
    for t in range(8, 20):
        got.append(client.logits(_step(node, sid, t, client.embed([int(ids[t])], t))))
    assert (torch.stack(got) - want).abs().max().item() <= 1e-5


def _request(node: Node, msg_type: str, fields: dict, tensors=()) -> dict:
    frames = node.handler.handle(b"checker", encode(msg_type, node.fresh_id(), fields, tensors))
    msg = decode(frames)
    assert msg.type != "error", msg.fields
    return {"fields": msg.fields, "tensors": msg.tensors}


def _step(node: Node, sid: str, pos: int, x: torch.Tensor) -> torch.Tensor:
    return _request(node, "step", {"session": sid, "pos": pos}, [x])["tensors"][0]


@pytest.mark.fuzz
def test_fuzz_records_requests_against_a_real_table(served):
    """`records` requests through the handler to a real Gossip (the request fuzzer's node has no
    table: review84): pushed wires of every kind (signed records of this model and another, junk),
    `want`, `model_id` and `after` drawn. Every request gets one well-formed reply, and paging a
    model's records from the start returns each live one exactly once, in peer-id order."""
    from nanoswarm.keys.identity import generate_identity
    from nanoswarm.keys.records import DEFAULT_MAX_TTL, sign_record, verify_record
    from nanoswarm.node.gossip import Gossip

    blocks, model_id = served[0]
    # Live for the whole run (a record past max_ttl is refused too_far_future), however long:
    # a record that lapsed between two pages would be missing from the second
    expires = time.time() + DEFAULT_MAX_TTL - 1
    signed = [sign_record(generate_identity(), address=f"tcp://127.0.0.1:{3000 + i}", layers=(0, 1),
                          model_id=model_id if i % 4 else "another-model", seq=1, expires=expires)
              for i in range(300)]  # this model's alone fill more than a page (MAX_WIRES)
    peer_ids = [verify_record(w).peer_id for w in signed]
    wire = st.one_of(st.sampled_from(signed), ANY_VALUE, st.fixed_dictionaries(
        {"body": st.one_of(st.binary(max_size=200), st.sampled_from([w["body"] for w in signed])),
         "sig": st.one_of(st.binary(max_size=70), st.sampled_from([w["sig"] for w in signed]))}))
    fields = st.fixed_dictionaries({}, optional={
        "want": st.one_of(st.booleans(), ANY_VALUE), "records": st.one_of(st.lists(wire, max_size=30), ANY_VALUE),
        "model_id": st.one_of(st.none(), st.just(model_id), st.just("another-model"), st.text(max_size=70), ANY_VALUE),
        "after": st.one_of(st.none(), st.just(""), st.sampled_from(peer_ids), st.text(max_size=45), ANY_VALUE)})
    seen: Counter = Counter()

    @settings(max_examples=max(20, CASES // 4), deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(fields, min_size=1, max_size=6), st.integers(0, len(signed)))
    def one_case(requests: list[dict], known: int) -> None:
        node = Node(blocks, model_id)
        gossip = Gossip(generate_identity(), node.handler, "tcp://127.0.0.1:7001")
        gossip.refresh()
        accepted = sum(gossip.offer_all(signed[i:min(i + 200, known)]).get("accepted", 0) for i in range(0, known, 200))
        assert accepted == known or time.time() > expires - 5  # (one message's records are at most 256)
        try:
            for f in requests:
                (to, frames), = node.handler.handle_batch([(b"peer", encode("records", node.fresh_id(), f))])
                assert to == b"peer"
                reply = check_reply(frames, N_EMBD, seen)
                assert reply["type"] in ("records_reply", "error"), reply
            live = sorted(r.peer_id for r in gossip.table.records(model_id))
            got, after, pages = [], "", 0
            for _ in range(len(live) + 2):
                page = _request(node, "records", {"want": True, "model_id": model_id, "after": after})["fields"]
                got += [verify_record(w).peer_id for w in page["records"]]
                after = page.get("after")
                pages += 1
                if not after:
                    break
            assert got == live
            seen["pages"] = max(seen["pages"], pages)
        finally:
            gossip.close()

    one_case()
    assert seen["records_reply"] > 0 and seen["malformed"] > 0 and seen["pages"] > 1, seen
