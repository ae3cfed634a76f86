"""A node that computes wrong, for tests/test_verify.py: `nanoswarm node` whose blocks add a
rolled copy of their output (plausible hidden states, the wrong ones; with --wrong-decode only on
one-position steps, so that its replays are right), and which claims a huge throughput so that
routes prefer it. Run as a real process, like `python -m nanoswarm node`;
with --hide-dtype its `info` does not say its dtype (so that checks cannot know its slack). As a
head shard it computes right unless given --wrong-heads (its attention partial sums get the same
error on every step), --wrong-heads-prompt (only on steps of more than one position) or
--wrong-heads-of N (only on steps of exactly N positions). With --reclaim-held it computes right
but answers `session_closed` to the second request that finds a session holding positions, as
if it had reclaimed it idle: every other token its client replays the whole history into it;
with --late too it answers that 1.1 s late, and states an idle timeout of 1 ms at `open`. With
--drop-relay it computes right but never passes a relayed step on (it says it did), with
--drop-relay-once only its first, with --drop-relay-alternate every other one (the first, third,
...); with --misshape-relay it passes relayed steps on without its output, with --answer-relay it
answers them to the client itself (a success, as if it were the last hop) instead. With --nan its blocks
output NaN, which the node's own check refuses (`bad_value`); with --send-nan they output NaN and
the node sends them on, with --huge they output 1e20 times the right values (finite, absurd: the
next stage's LayerNorm overflows; with --wrong-decode on one-position steps only; --large: 1e6
times, past float16's range) and send them on; as a head shard, its attention partial sums do
the same. With --slow S (a layer node) it computes right but sleeps S seconds in every forward
pass, and states the throughput it measures (an honest peer on a slow machine). With
--slow-handshake S it computes right and states what it measures, but answers each CURVE
handshake's ZAP request S seconds late (a link whose set-up is slow). With --refuse-info-after N it
computes right but answers `info` with an internal error after its first N answers (a live node
whose `info` fails). With --late-close S it computes right but does a `close` S seconds after
answering it, at the next message it reads (as if it read the close after others that came
meanwhile on other connections)."""

import dataclasses
import sys
import time

import nanoswarm  # noqa: F401  (first: its OpenMP defaults must precede torch's import)
from nanoswarm.cli import main
from nanoswarm.node import all_reduce, handler, relay, server, sessions, steps, zap
from nanoswarm.protocol.messages import encode
from nanoswarm.shards.model import Block, Blocks

_forward = Blocks.forward
_measure = steps.StepRunner.measure_throughput


def wrong(self, x, caches=None, start=None, stop=None):
    y = _forward(self, x, caches, start, stop)
    if poison:
        return y * float("nan")
    if huge:
        return y * huge if lies(x) else y
    return y + 0.5 * y.roll(1, dims=-1) if lies(x) else y


lies = lambda x: True  # noqa: E731
poison = "--nan" in sys.argv or "--send-nan" in sys.argv
huge = {"--huge": 1e20, "--large": 1e6}.get(next((a for a in sys.argv if a in ("--huge", "--large")), ""))
if huge:
    sys.argv.remove("--huge" if huge == 1e20 else "--large")
for flag in ("--nan", "--send-nan"):
    if flag in sys.argv:
        sys.argv.remove(flag)
        if flag == "--send-nan":
            steps._unsendable = all_reduce._unsendable = lambda *args: None
if "--wrong-decode" in sys.argv:
    sys.argv.remove("--wrong-decode")
    lies = lambda x: x.shape[1] == 1  # noqa: E731


def reclaiming_get(self, session_id, peer=None):
    session = _get(self, session_id, peer)
    if session.length > 0:
        held[session_id] = held.get(session_id, 0) + 1
        if held[session_id] >= 2:
            self.close(session_id, "expired")
            time.sleep(late)
            return _get(self, session_id, peer)  # session_closed
    return session


def stating_open(self, peer, msg):
    real = self.limits
    self.limits = dataclasses.replace(real, idle_timeout=0.001)
    try:
        return _open(self, peer, msg)
    finally:
        self.limits = real


_get, _open, held, late = sessions.SessionStore.get, handler.RequestHandler._open, {}, 0.0
if "--reclaim-held" in sys.argv:
    sys.argv.remove("--reclaim-held")
    lies = lambda x: False  # noqa: E731
    sessions.SessionStore.get = reclaiming_get
if "--late" in sys.argv:
    sys.argv.remove("--late")
    late = 1.1
    handler.RequestHandler._open = stating_open


def claimed(self, seconds=0.3):
    _measure(self, seconds)
    self.stats.throughput = 1e6
    return 1e6


def wrong_partial(when, change=lambda y: y + 0.5 * y.roll(1, dims=-1)):
    def attn_partial(self, x, caches, block):
        y = _attn_partial(self, x, caches, block)
        return change(y) if not self.full and when(x) else y
    return attn_partial


def dropping(drops):
    """RelayLinks.send that drops the relayed steps whose count (from 1) `drops` says."""
    def send(self, to, frames):
        sent.append(1)
        return None if drops(len(sent)) else _send(self, to, frames)
    return send


_send, sent = relay.RelayLinks.send, []
for flag, drops in (("--drop-relay", lambda n: True), ("--drop-relay-once", lambda n: n == 1),
                    ("--drop-relay-alternate", lambda n: n % 2 == 1)):
    if flag in sys.argv:
        sys.argv.remove(flag)
        lies = lambda x: False  # noqa: E731
        relay.RelayLinks.send = dropping(drops)
if "--answer-relay" in sys.argv:  # a hop that answers the client itself instead of passing the step on
    sys.argv.remove("--answer-relay")
    lies = lambda x: False  # noqa: E731
    _send_all = server.NodeServer._send_all
    server.NodeServer._send_all = lambda self, replies: _send_all(self, [
        (to.owner, encode("result", to.reply, {"busy_us": 1})) if isinstance(to, relay.Relay) else (to, frames)
        for to, frames in replies])
if "--misshape-relay" in sys.argv:
    sys.argv.remove("--misshape-relay")
    lies = lambda x: False  # noqa: E731
    _encode = steps.encode_frames
    steps.encode_frames = lambda kind, rid, fields, specs, frames: _encode(
        kind, rid, fields, *((specs[:-1], frames[:-1]) if kind == "step" else (specs, frames)))

_attn_partial = Block.attn_partial
Blocks.forward = wrong
if poison or huge:  # a head shard's attention partial sums too
    Block.attn_partial = wrong_partial(lambda x: lies(x), lambda y: y * (float("nan") if poison else huge))
for flag, when in (("--wrong-heads", lambda x: True), ("--wrong-heads-prompt", lambda x: x.shape[1] > 1)):
    if flag in sys.argv:
        sys.argv.remove(flag)
        Block.attn_partial = wrong_partial(when)
if "--wrong-heads-of" in sys.argv:
    at = sys.argv.index("--wrong-heads-of")
    positions = int(sys.argv[at + 1])
    del sys.argv[at:at + 2]
    Block.attn_partial = wrong_partial(lambda x: x.shape[1] == positions)
steps.StepRunner.measure_throughput = claimed
if "--slow" in sys.argv:
    at = sys.argv.index("--slow")
    pause = float(sys.argv[at + 1])
    del sys.argv[at:at + 2]

    def slow(self, x, caches=None, start=None, stop=None):
        time.sleep(pause)
        return _forward(self, x, caches, start, stop)
    Blocks.forward = slow
    steps.StepRunner.measure_throughput = _measure
if "--slow-handshake" in sys.argv:
    at = sys.argv.index("--slow-handshake")
    handshake_pause = float(sys.argv[at + 1])
    del sys.argv[at:at + 2]
    Blocks.forward, steps.StepRunner.measure_throughput = _forward, _measure
    _answer = zap.ZapHandler.answer

    def slow_answer(self, request):
        time.sleep(handshake_pause)
        return _answer(self, request)
    zap.ZapHandler.answer = slow_answer
if "--refuse-info-after" in sys.argv:  # a live node whose `info` fails (an internal error) after N answers
    at = sys.argv.index("--refuse-info-after")
    answered_info = int(sys.argv[at + 1])
    del sys.argv[at:at + 2]
    Blocks.forward, steps.StepRunner.measure_throughput = _forward, _measure
    _simple = handler.RequestHandler._handle_simple

    def refusing_simple(self, peer, msg):
        global answered_info
        if msg.type == "info":
            answered_info -= 1
            if answered_info < 0:
                raise RuntimeError("info refused (tests/dishonest_node.py --refuse-info-after)")
        return _simple(self, peer, msg)
    handler.RequestHandler._handle_simple = refusing_simple
if "--late-close" in sys.argv:  # closes answered at once but done S seconds later, as if read after
    at = sys.argv.index("--late-close")  # what came meanwhile on other connections
    close_delay = float(sys.argv[at + 1])
    del sys.argv[at:at + 2]
    Blocks.forward, steps.StepRunner.measure_throughput = _forward, _measure
    _simple_late, _batch_late, deferred = handler.RequestHandler._handle_simple, handler.RequestHandler.handle_batch, []

    def late_simple(self, peer, msg):
        if msg.type != "close":
            return _simple_late(self, peer, msg)
        deferred.append((time.monotonic() + close_delay, peer, msg.fields["session"]))
        return encode("closed", msg.id, {"session": msg.fields["session"]})

    def late_batch(self, batch):
        now = time.monotonic()
        for entry in [e for e in deferred if e[0] <= now]:
            deferred.remove(entry)
            self.sessions.close(entry[2], peer=entry[1])
        return _batch_late(self, batch)
    handler.RequestHandler._handle_simple, handler.RequestHandler.handle_batch = late_simple, late_batch
if "--hide-dtype" in sys.argv:
    sys.argv.remove("--hide-dtype")
    _info = handler.RequestHandler.info
    handler.RequestHandler.info = lambda self: {k: v for k, v in _info(self).items() if k != "dtype"}
sys.argv = ["nanoswarm", *sys.argv[1:]]
main()
