"""Relayed prefill (client/history.py): a step of more than TRAIL_MAX_POSITIONS positions crosses
a chain of layer stages keeping no trail, so the client never sees what the stages after the first
were sent. A failover recomputes those positions from the stage before, which holds them; results
and tokens stay those of the single-process model. Real node processes, real sockets."""

from __future__ import annotations

import signal
import time

import pytest
import torch

from nanoswarm.client.api import GenerationResult, SwarmModel
from nanoswarm.client.generate import SamplingParams
from nanoswarm.client.history import History, Unkept
from nanoswarm.client.session import TRAIL_MAX_POSITIONS
from nanoswarm.client.swarm import SwarmOptions
from nanoswarm.node.cluster import NodeSpec
from nanoswarm.shards.tokenizer import encode
from nanoswarm.shards.weights import load_model

SEEDED = SamplingParams(temperature=1.0, top_k=200, seed=1234)
LONG_PROMPT = ("First Citizen: Before we proceed any further, hear me speak. All: Speak, speak. First "
               "Citizen: You are all resolved rather to die than to famish? All: Resolved. resolved.")
N_TOKENS, FAIL_AT = 24, 6
TIMEOUT = 3.0


def test_the_prompt_is_long_enough_to_keep_no_trail():
    assert len(encode(LONG_PROMPT)) > TRAIL_MAX_POSITIONS


def test_history_keeps_recovers_and_refuses_what_it_lacks():
    h = History()
    h.append(torch.zeros(1, 2, 3), 2)
    h.append(Unkept(4), 4)
    h.append(lambda: torch.ones(1, 1, 3), 1)
    assert h.positions == 7 and h.first_unkept() == 2
    with pytest.raises(ValueError):
        h.tensor()
    with pytest.raises(ValueError):
        h.recovered(3, torch.ones(1, 5, 3))  # not where an entry starts
    with pytest.raises(ValueError):
        h.recovered(2, torch.ones(1, 4, 3))  # fewer positions than it replaces
    with pytest.raises(ValueError):
        h.recovered(8, torch.ones(1, 1, 3))  # past the positions held (was an IndexError)
    h.recovered(2, torch.full((1, 9, 3), 5.0))  # more: the rest is not this stage's (yet)
    assert h.first_unkept() is None and h.positions == 7
    assert torch.equal(h.tensor()[0, :, 0], torch.tensor([0, 0, 5, 5, 5, 5, 5.0]))


def test_history_truncates_to_the_positions_a_session_holds():
    """A step cut short is taken back out of every stage's history (Mending._undo_step),
    whatever its entries: a tensor, a function that makes one, unkept positions."""
    h = History()
    h.append(torch.arange(3.0).view(1, 3, 1), 3)
    h.append(lambda: torch.arange(3.0, 5.0).view(1, 2, 1), 2)
    h.append(Unkept(2), 2)
    h.truncate(8)  # past the end: nothing to drop
    assert h.sizes == [3, 2, 2]
    h.truncate(6)
    assert h.sizes == [3, 2, 1] and h.entries[-1] == Unkept(1)
    h.truncate(4)
    assert h.sizes == [3, 1] and torch.equal(h.tensor()[0, :, 0], torch.tensor([0, 1, 2, 3.0]))
    h.truncate(3)
    assert h.sizes == [3]
    h.truncate(0)
    assert h.positions == 0 and h.entries == []


def _index(swarm, address: str) -> int:
    return swarm.addresses.index(address)


P = 40  # prompt positions: more than TRAIL_MAX_POSITIONS, so the prompt is relayed without trail


class Run:
    """A session over `swarm` fed n random token ids (a P-position prompt, then one at a time),
    checked against the single-process model's logits."""

    def __init__(self, model_dir, swarm, n: int, seed: int, timeout: float = TIMEOUT):
        self.ids = torch.randint(0, 50257, (n,), generator=torch.Generator().manual_seed(seed))
        with torch.inference_mode():
            self.want = load_model(model_dir)(self.ids[None])[0][P - 1:]
        self.model = SwarmModel.connect(model_dir, peers=swarm.addresses,
                                        options=SwarmOptions(timeout=timeout, ban_seconds=60))
        self.session = self.model.session(n)
        self.got: list[torch.Tensor] = []

    def step(self, t: int) -> None:
        """The prompt (t == 0), or position t."""
        tokens = self.ids[:P].tolist() if t == 0 else [int(self.ids[t])]
        self.got.append(self.model.client.logits(self.session.step(self.model.client.embed(tokens, t))))

    def rest(self, before=lambda t: None) -> None:
        """Every position after the prompt, `before(t)` ahead of each."""
        for t in range(P, len(self.ids)):
            before(t)
            self.step(t)

    def error(self) -> float:
        return (torch.stack(self.got) - self.want[:len(self.got)]).abs().max().item()

    def close(self) -> None:
        """The session first (its nodes free the caches at once), then the connections."""
        self.session.close()
        self.model.close()


def test_relayed_prefill_is_exact_keeps_no_trail_and_is_recovered_on_failover(tiny_model_dir, cluster_factory):
    """The prefill is relayed with no trail (the later stages' histories hold Unkept); killing the
    last stage recomputes its input through both stages before it, killing the middle one after
    that replays what is now kept, and the logits still equal the single-process model's."""
    specs = [NodeSpec((0, 1)), NodeSpec((1, 3)), NodeSpec((3, 4)), NodeSpec((1, 3)), NodeSpec((3, 4))]
    swarm = cluster_factory(tiny_model_dir, specs)
    run = Run(tiny_model_dir, swarm, 48, seed=5)
    session = run.session

    def kill(t: int) -> None:
        if t == P + 2:  # the last stage dies: its history is recomputed through both before it
            swarm.kill(_index(swarm, session.stages[2].peers[0]), signal.SIGKILL)
        if t == P + 5:  # then the middle one (its replacement was replayed from the first's)
            swarm.kill(_index(swarm, session.stages[1].peers[0]), signal.SIGKILL)

    try:
        run.step(0)
        assert len(session.stages) == 3
        assert [h.first_unkept() for h in session.history] == [None, 0, 0]  # no trail came back
        assert relayed_counts(run) == [1, 1, 0]
        run.rest(kill)
        assert session.failovers == 2
        assert all(h.first_unkept() is None for h in session.history)
        assert run.error() <= 1e-5
    finally:
        run.close()


def relayed_counts(run: Run) -> list[int]:
    return [run.model.swarm.connection(s.peers[0]).request("info").fields["stats"]["relayed"]
            for s in run.session.stages]


def test_a_prompt_goes_stage_by_stage_when_a_node_takes_fewer_positions(tiny_model_dir, cluster_factory):
    """A node of the chain takes fewer positions a step than the prompt has (its opened limits):
    the prompt goes stage by stage, in pieces, with every stage's input kept; decode is relayed."""
    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 1)), NodeSpec((1, 3), args=["--max-tokens-per-step", "16"]),
                                             NodeSpec((3, 4))])
    run = Run(tiny_model_dir, swarm, 43, seed=10)
    try:
        run.step(0)
        assert relayed_counts(run) == [0, 0, 0]
        assert all(h.first_unkept() is None for h in run.session.history)
        run.rest()
        assert relayed_counts(run) == [3, 3, 0] and run.error() <= 1e-5
    finally:
        run.close()


def test_a_chain_with_a_node_that_does_not_say_trail_optional_is_not_sent_steps_without_trail():
    from types import SimpleNamespace

    from nanoswarm.client.relay import Chain

    limits = {"max_tokens_per_step": 1024, "max_message_bytes": 64 << 20}
    now = SimpleNamespace(opened={**limits, "trail_optional": True})
    earlier = SimpleNamespace(opened=limits)  # a node of an earlier version
    assert Chain.max_untrailed(SimpleNamespace(stages=[now, now]), 768) == 1024
    assert Chain.max_untrailed(SimpleNamespace(stages=[now, earlier]), 768) == 0


def test_a_relayed_step_with_its_trail_fits_every_hops_output_in_one_message():
    """A trailed step's answer holds an output of each hop, so a chain of three carries a third
    of the positions one message of the nodes' limit holds (review204: the width of one hop's
    output, a mutation, passed the tests then; a long enough step would be refused too_large)."""
    from types import SimpleNamespace

    from nanoswarm.client.relay import Chain
    from nanoswarm.client.stages import HEADER_ROOM

    limit = 8 << 20
    hop = SimpleNamespace(opened={"max_tokens_per_step": 1 << 20, "max_message_bytes": limit})
    chain = SimpleNamespace(stages=[hop, hop, hop])
    n = Chain.max_trailed(chain, 768)
    assert n == (limit - HEADER_ROOM) // (4 * 768 * 3)
    assert HEADER_ROOM + 3 * n * 4 * 768 <= limit < HEADER_ROOM + 3 * (n + 1) * 4 * 768


def test_a_reclaimed_session_after_a_relayed_prefill_is_reopened_exactly(tiny_model_dir, cluster_factory,
                                                                        monkeypatch):
    """The last node reclaims the session while the reader pauses; in the next step the stages
    before it have stored the position when it refuses. Reopening it recomputes its unkept
    input through them (rewinding the position they just stored) and the logits stay exact."""
    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 1)), NodeSpec((1, 3)),
                                             NodeSpec((3, 4), args=["--idle-timeout", "1"])])
    from nanoswarm.client.session import InferenceSession

    reopen, reopened = InferenceSession._reopen, []

    def spy(self, i):
        failed = reopen(self, i)
        reopened.append(failed is None)
        return failed

    monkeypatch.setattr(InferenceSession, "_reopen", spy)
    run = Run(tiny_model_dir, swarm, 44, seed=6)
    try:
        run.step(0)
        time.sleep(2.5)  # the last node reclaims its session
        run.rest()
        assert reopened == [True] and run.session.failovers == 0
        assert run.error() <= 1e-5
    finally:
        run.close()


def test_a_stage_that_fails_while_recomputing_for_another_is_replaced_first(tiny_model_dir, cluster_factory,
                                                                             monkeypatch):
    """The last stage dies while the middle one is frozen: recomputing the last stage's unkept
    input needs the middle one, which times out, so the middle one is replaced inside the last
    one's failover (its replay gives the last one's input too), and the logits stay exact."""
    from nanoswarm.client.session import InferenceSession

    depth, nested = [0], []
    replace = InferenceSession._replace

    def spy(self, i, error, *args, **kwargs):  # records a replacement that starts while another is under way
        nested.append(depth[0])
        depth[0] += 1
        try:
            return replace(self, i, error, *args, **kwargs)
        finally:
            depth[0] -= 1

    monkeypatch.setattr(InferenceSession, "_replace", spy)
    specs = [NodeSpec((0, 1)), NodeSpec((1, 3)), NodeSpec((3, 4)), NodeSpec((1, 3)), NodeSpec((3, 4))]
    swarm = cluster_factory(tiny_model_dir, specs)
    run = Run(tiny_model_dir, swarm, 44, seed=7)
    frozen = []

    def freeze_and_kill(t: int) -> None:
        if t == P + 2:
            frozen.append(_index(swarm, run.session.stages[1].peers[0]))
            swarm.kill(frozen[0], signal.SIGSTOP)
            swarm.kill(_index(swarm, run.session.stages[2].peers[0]), signal.SIGKILL)
            time.sleep(0.5)  # the client sees the drop before the step's timeout

    try:
        run.step(0)
        run.rest(freeze_and_kill)
        assert run.session.failovers == 2 and nested == [0, 1]
        assert run.error() <= 1e-5
    finally:
        for i in frozen:
            swarm.kill(i, signal.SIGCONT)
        run.close()


def test_a_failed_reopen_after_a_split_replacement_replaces_the_stage_that_failed(tiny_model_dir, cluster_factory,
                                                                                  monkeypatch):
    """From a review: the last node reclaims the session; as the client reopens it, the first
    node and the last one die. Recomputing the last stage's input replaces the first stage by two
    (a split: every later index moves), then the reopen fails: the stage to replace is the one
    that failed, not the healthy one now at its old index."""
    from nanoswarm.client.session import InferenceSession

    specs = [NodeSpec((0, 2)), NodeSpec((2, 3)), NodeSpec((3, 4), args=["--idle-timeout", "1"]),
             NodeSpec((0, 1)), NodeSpec((1, 2)), NodeSpec((3, 4), args=["--idle-timeout", "1"])]
    swarm = cluster_factory(tiny_model_dir, specs)  # whichever 3:4 node the route takes reclaims
    run = Run(tiny_model_dir, swarm, 44, seed=8)
    reopen, fired = InferenceSession._reopen, []

    def reopen_as_two_nodes_die(self, i):
        if not fired:
            fired.append([s.peers[0] for s in self.stages])
            swarm.kill(_index(swarm, self.stages[0].peers[0]), signal.SIGKILL)
            swarm.kill(_index(swarm, self.stages[i].peers[0]), signal.SIGKILL)
            time.sleep(0.5)  # both drops seen before the reopen asks them
        return reopen(self, i)

    monkeypatch.setattr(InferenceSession, "_reopen", reopen_as_two_nodes_die)
    session = run.session
    try:
        run.step(0)
        assert [s.start for s in session.stages] == [0, 2, 3]
        time.sleep(2.5)  # the last node reclaims its session
        run.rest()
        assert fired, "the last node did not reclaim the session"
        first, healthy, last = fired[0]
        assert session.failovers == 2 and set(run.model.swarm.bans) == {first, last}
        assert [s.start for s in session.stages] == [0, 1, 2, 3] and session.stages[2].peers == [healthy]
        assert run.error() <= 1e-5
    finally:
        run.close()


def test_each_hop_of_a_relayed_prefill_gets_the_timeout(tiny_model_dir, cluster_factory):
    """From a review: a relayed prefill's hops compute one after another, so the step may take the
    client's timeout once per hop (stage by stage, each stage had its own). A middle node stopped
    for longer than the timeout and the probe after it (~2.5 s: `stalled_stage`) but less than
    the chain's 4.5 s is waited for, not banned."""
    import threading

    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 1)), NodeSpec((1, 3)), NodeSpec((3, 4))])
    run = Run(tiny_model_dir, swarm, P, seed=9, timeout=1.5)
    try:
        middle = _index(swarm, run.session.stages[1].peers[0])
        swarm.kill(middle, signal.SIGSTOP)
        wake = threading.Timer(3.2, swarm.kill, (middle, signal.SIGCONT))
        wake.start()
        t0 = time.monotonic()
        try:
            run.step(0)
        finally:
            wake.join()
        assert time.monotonic() - t0 >= 3.0 and run.session.failovers == 0
        assert run.error() <= 1e-5
    finally:
        run.close()


def three_stages_with_spares() -> list[NodeSpec]:
    return [NodeSpec((0, 4)), NodeSpec((4, 8)), NodeSpec((8, 12)), NodeSpec((4, 8)), NodeSpec((8, 12))]


@pytest.fixture(scope="module")
def expected_long(small12_model_dir) -> list[int]:
    return SwarmModel.local(small12_model_dir).generate(LONG_PROMPT, N_TOKENS, SEEDED).ids


@pytest.mark.parametrize("picks", [[1], [2], [1, 2]], ids=["middle hop", "last hop", "both"])
def test_killed_hops_after_a_relayed_prefill_give_the_same_tokens(small12_model_dir, cluster_factory,
                                                                  expected_long, picks):
    swarm = cluster_factory(small12_model_dir, three_stages_with_spares())
    model = SwarmModel.connect(small12_model_dir, peers=swarm.addresses,
                               options=SwarmOptions(timeout=TIMEOUT, ban_seconds=60))
    result = GenerationResult(LONG_PROMPT)
    notices: list[str] = []
    killed: list[str] = []
    try:
        for _ in model.stream(LONG_PROMPT, N_TOKENS, SEEDED, result, on_failover=notices.append):
            if len(result.ids) == FAIL_AT:
                for pick in picks:
                    killed.append(result.route[pick]["peers"][0])
                    swarm.kill(_index(swarm, killed[-1]), signal.SIGKILL)
    finally:
        model.close()
    assert result.ids == expected_long
    assert result.failovers == len(picks) and len(notices) == len(picks)
    assert not set(killed) & {p for stage in result.route for p in stage["peers"]}  # spares took over


# Review173 (sixty-second session): a mutation of the code that no test caught before.
def test_a_relayed_prompt_after_a_kept_one_is_recovered_from_its_own_position(tiny_model_dir, cluster_factory):
    """A short prompt (kept: its trail came back), then a long one relayed without trail
    from position 3: the later stages' histories lack positions 3.. only. Killing the last stage
    recomputes them through the stage before from position 3 (a replay sent at position 0 would
    rewind that stage's cache to 0 and store them there), and the logits stay exact."""
    import signal

    from nanoswarm.client.api import SwarmModel
    from nanoswarm.client.swarm import SwarmOptions
    from nanoswarm.shards.weights import load_model

    specs = [NodeSpec((0, 1)), NodeSpec((1, 3)), NodeSpec((3, 4)), NodeSpec((3, 4))]
    swarm = cluster_factory(tiny_model_dir, specs)
    ids = torch.randint(0, 50257, (3 + P + 2,), generator=torch.Generator().manual_seed(11))
    with torch.inference_mode():
        want = load_model(tiny_model_dir)(ids[None])[0]
    model = SwarmModel.connect(tiny_model_dir, peers=swarm.addresses, options=SwarmOptions(timeout=3.0, ban_seconds=60))
    try:
        session = model.session(len(ids))

        def step(a: int, b: int) -> torch.Tensor:
            out = model.client.logits(session.step(model.client.embed(ids[a:b].tolist(), a)))
            return out.reshape(-1, out.shape[-1])[-1]

        step(0, 3)
        step(3, 3 + P)
        assert [h.first_unkept() for h in session.history] == [None, 3, 3]
        swarm.kill(_index(swarm, session.stages[2].peers[0]), signal.SIGKILL)
        got = step(3 + P, 4 + P)
        assert session.failovers == 1
        assert (got - want[3 + P]).abs().max().item() <= 1e-5
        session.close()
    finally:
        model.close()


def test_a_prompt_piece_fits_the_nodes_message_limit_and_the_clients_frame_limit():
    """How many positions one request to a stage carries: what fits a message of the node's
    stated limit, in float32 (4 bytes a value, the widest wire), and never more than the client
    takes back in one frame however large a limit the node states (review208: 2 bytes a value,
    and no cap at the client's frame size, passed the tests)."""
    from nanoswarm.client.stages import HEADER_ROOM, positions_per_request
    from nanoswarm.client.transport import MAX_FRAME_BYTES

    limit, width = 8 << 20, 768
    assert positions_per_request({"max_message_bytes": limit}, width) == (limit - HEADER_ROOM) // (4 * width)
    most = (MAX_FRAME_BYTES - HEADER_ROOM) // (4 * width)
    assert positions_per_request({"max_message_bytes": 1 << 40}, width) == most
    assert positions_per_request({"max_message_bytes": limit, "max_tokens_per_step": 7}, width) == 7
    assert positions_per_request({"max_message_bytes": 10}, width) == 1  # (at least one)
    # A stated step limit that makes no sense is no limit (review224: 0 or less sent a prompt
    # one position a request); one a node did not state at all neither.
    for nonsense in (0, -5, 7.0, None):
        opened = {"max_message_bytes": limit, "max_tokens_per_step": nonsense}
        assert positions_per_request(opened, width) == (limit - HEADER_ROOM) // (4 * width), nonsense
