"""Spot checks (client/verify.py): a node that computes wrong is caught, failed over, and the
text is the one an honest swarm gives; honest nodes pass every check. Real node processes; the
dishonest one is `nanoswarm node` with its blocks patched (tests/dishonest_node.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import SwarmWithALiar, run_clis, wait_for_sessions

from nanoswarm.client.api import SwarmModel
from nanoswarm.client.generate import SamplingParams
from nanoswarm.client.session import SessionError
from nanoswarm.client.swarm import SwarmOptions
from nanoswarm.node.cluster import LocalCluster, NodeSpec

GREEDY = SamplingParams(temperature=0)
PROMPT, N_TOKENS = "To be, or not to be, that is the question", 8
# Past the 32 positions a relayed step brings back every hop's output for (client/relay.py).
LONG_PROMPT = PROMPT + ": whether 'tis nobler in the mind to suffer the slings and arrows of outrageous fortune"


@pytest.fixture(scope="module")
def liar_swarm(tiny_model_dir):
    """Blocks 0:2 on a liar and on an honest node; blocks 2:4 on an honest node."""
    swarm = SwarmWithALiar(tiny_model_dir, [NodeSpec((0, 2), args=["--dishonest"]), NodeSpec((0, 2)),
                                            NodeSpec((2, 4))])
    swarm.start()
    yield swarm
    swarm.stop()


def generate(model_dir, swarm: LocalCluster, verify: float, relay: bool = True, prompt: str = PROMPT):
    """A greedy generation whose route takes the liar (nodes[0]) for blocks 0:2 first."""
    model = SwarmModel.connect(model_dir, peers=swarm.addresses,
                               options=SwarmOptions(timeout=10, verify=verify, relay=relay))
    try:
        for address, peer in model.swarm.peers.items():  # routes prefer the lowest round trip
            if address != swarm.addresses[0] and peer.layers == (0, 2):
                peer.rtt = 1.0
        if verify:  # the stage checked is drawn at random: here, always the first
            model.swarm.checker.pick = lambda choices: choices[0]
        return model.generate(prompt, N_TOKENS, GREEDY, keep_logits=True)
    finally:
        model.close()


@pytest.mark.parametrize("relay,prompt", [(True, LONG_PROMPT), (False, PROMPT)],
                         ids=["relay asked for, a prompt past the trail", "stage by stage"])
def test_a_node_that_computes_wrong_is_caught_and_the_text_is_exact(tiny_model_dir, liar_swarm, relay, prompt):
    """A checking session runs stage by stage whatever the options say (client/verify.py)."""
    expected = SwarmModel.local(tiny_model_dir).generate(prompt, N_TOKENS, GREEDY, keep_logits=True)
    liar = liar_swarm.addresses[0]

    unchecked = generate(tiny_model_dir, liar_swarm, verify=0.0, relay=relay, prompt=prompt)
    assert unchecked.route[0]["peers"] == [liar] and unchecked.ids != expected.ids  # its arithmetic counts

    checked = generate(tiny_model_dir, liar_swarm, verify=1.0, relay=relay, prompt=prompt)
    assert checked.wrong_results == 1 and checked.failovers == 1 and checked.spot_checks == N_TOKENS
    assert liar not in [p for stage in checked.route for p in stage["peers"]]
    assert checked.ids == expected.ids
    diff = max(float((a - b).abs().max()) for a, b in zip(checked.logits, expected.logits))
    assert diff < 1e-4, diff  # the first token's logits come from the client's own redo


def interrupted(model, interrupt, tokens: int = 12, after: int = 4):
    """A greedy generation of `tokens` tokens with `interrupt()` called after the first `after`."""
    from nanoswarm.client.api import GenerationResult

    result = GenerationResult()
    stream = model.stream(PROMPT, tokens, GREEDY, result)
    for _ in range(after):
        next(stream)
    interrupt()
    list(stream)
    return result


def checked_run(model_dir, specs: list[NodeSpec], far: int, before=None):
    """A greedy generation with every step checked, through a swarm of `specs` whose node `far`
    is made to look far away (routes prefer the lowest round trip), so that the liar goes first."""
    swarm = SwarmWithALiar(model_dir, specs)
    swarm.start()
    try:
        model = SwarmModel.connect(model_dir, peers=swarm.addresses, options=SwarmOptions(timeout=10, verify=1.0))
        try:
            model.swarm.peers[swarm.addresses[far]].rtt = 1.0
            if before is not None:
                before(model)
            return model.generate(PROMPT, N_TOKENS, GREEDY), swarm.addresses
        finally:
            model.close()
    finally:
        swarm.stop()


def test_a_liar_that_hides_its_dtype_gets_the_strictest_tolerance(tiny_model_dir):
    """A node whose `info` left its dtype out was never checked (a review): it now gets float32's."""
    def hidden(model):
        assert sorted("dtype" in peer.extra for peer in model.swarm.peers.values()) == [False, True]

    result, addresses = checked_run(tiny_model_dir, [NodeSpec((0, 4), args=["--dishonest", "--hide-dtype"]),
                                                     NodeSpec((0, 4))], far=1, before=hidden)
    assert result.wrong_results == 1 and result.route[0]["peers"] == [addresses[1]]
    assert result.ids == SwarmModel.local(tiny_model_dir).generate(PROMPT, N_TOKENS, GREEDY).ids


def test_a_replacement_is_judged_on_its_own_outputs(tiny_model_dir, cluster_factory):
    """After a failover the next check compared the new peer with the old one's outputs: an
    honest float32 node that replaced an honest bfloat16 one was banned as wrong (a review)."""
    import signal

    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 4), args=["--dtype", "bfloat16"]), NodeSpec((0, 4))])
    model = SwarmModel.connect(tiny_model_dir, peers=swarm.addresses, options=SwarmOptions(timeout=10, verify=1.0))
    try:
        model.swarm.peers[swarm.addresses[1]].rtt = 1.0  # the bfloat16 node first
        result = interrupted(model, lambda: swarm.kill(0, signal.SIGKILL))
    finally:
        model.close()
    assert result.failovers == 1 and result.wrong_results == 0 and result.spot_checks == 12
    assert result.route[0]["peers"] == [swarm.addresses[1]] and result.stop_reason == "length"


@pytest.mark.parametrize("specs", [
    [NodeSpec((0, 2), args=["--dtype", "bfloat16"]), NodeSpec((2, 4))],
    [NodeSpec((0, 4), (0, 1), args=["--dtype", "bfloat16"]), NodeSpec((0, 4), (1, 4))],
], ids=["layer stages", "a head group"])
def test_honest_nodes_pass_every_check(tiny_model_dir, cluster_factory, specs):
    """The tolerance covers an honest node's (or member's) dtype and the wire's rounding: no false alarm."""
    swarm = cluster_factory(tiny_model_dir, specs)
    for wire in ("float32", "q80", "float16"):
        model = SwarmModel.connect(tiny_model_dir, peers=swarm.addresses,
                                   options=SwarmOptions(timeout=10, verify=1.0, wire=wire))
        try:
            result = model.generate(PROMPT, N_TOKENS, GREEDY)
        finally:
            model.close()
        assert ("heads" in result.route[0]) == (specs[0].heads is not None)
        assert result.spot_checks == N_TOKENS and result.wrong_results == 0 and result.failovers == 0, wire


def test_a_last_stage_that_computes_wrong_is_caught_too(tiny_model_dir):
    """The last stage's outputs are checked against what the client kept of them."""
    def check_the_last(model):
        model.swarm.checker.pick = lambda choices: choices[-1]

    result, addresses = checked_run(tiny_model_dir, [NodeSpec((2, 4), args=["--dishonest"]), NodeSpec((0, 2)),
                                                     NodeSpec((2, 4))], far=2, before=check_the_last)
    assert result.wrong_results == 1 and addresses[0] not in result.route[-1]["peers"]
    assert result.ids == SwarmModel.local(tiny_model_dir).generate(PROMPT, N_TOKENS, GREEDY).ids


def test_a_stage_that_fails_while_the_work_is_redone_is_failed_over_too(tiny_model_dir, monkeypatch):
    """After a wrong result the stages after the liar are reopened and replayed; one whose peer
    died just then ended the generation (a known gap): it is now failed over like any other."""
    from nanoswarm.client.session import InferenceSession

    swarm = SwarmWithALiar(tiny_model_dir, [NodeSpec((0, 2), args=["--dishonest"]), NodeSpec((0, 2)),
                                            NodeSpec((2, 4)), NodeSpec((2, 4))])
    replace = InferenceSession._replace

    def replace_then_kill_the_next(self, i, error, *args, **kwargs):
        index = replace(self, i, error, *args, **kwargs)
        if error.code == "wrong_result":
            swarm.kill(2)  # the route's peer for blocks 2:4, before it is reopened
        return index

    monkeypatch.setattr(InferenceSession, "_replace", replace_then_kill_the_next)
    swarm.start()
    try:
        model = SwarmModel.connect(tiny_model_dir, peers=swarm.addresses,
                                   options=SwarmOptions(timeout=2, verify=1.0))
        try:
            for far in (1, 3):  # routes prefer the lowest round trip: the liar and node 2 first
                model.swarm.peers[swarm.addresses[far]].rtt = 1.0
            model.swarm.checker.pick = lambda choices: choices[0]
            result = model.generate(PROMPT, N_TOKENS, GREEDY)
        finally:
            model.close()
    finally:
        swarm.stop()
    assert result.wrong_results == 1 and result.failovers == 2
    assert [stage["peers"] for stage in result.route] == [[swarm.addresses[1]], [swarm.addresses[3]]]
    assert result.ids == SwarmModel.local(tiny_model_dir).generate(PROMPT, N_TOKENS, GREEDY).ids


def test_with_no_honest_peer_for_the_blocks_the_generation_ends_with_the_reason(tiny_model_dir):
    swarm = SwarmWithALiar(tiny_model_dir, [NodeSpec((0, 2), args=["--dishonest"]), NodeSpec((2, 4))])
    swarm.start()
    try:
        with pytest.raises(SessionError, match="no peer serves layers 0:2.*banned .*failed: wrong_result"):
            generate(tiny_model_dir, swarm, verify=1.0)
    finally:
        swarm.stop()


def test_verify_is_a_fraction(tiny_model_dir):
    with pytest.raises(ValueError, match="verify must be a fraction of steps from 0 to 1"):
        SwarmOptions(verify=1.5)
    out, = run_clis(["generate", "x", "--model", str(tiny_model_dir), "--peers", "tcp://127.0.0.1:9",
                     "--verify", "-0.1"], timeout=60)
    assert out.returncode == 2 and "'--verify': -0.1 is not in the range 0<=x<=1" in out.stderr


def test_verify_checks_that_share_of_steps(tiny_model_dir):
    from nanoswarm.client.verify import SpotChecker
    from nanoswarm.shards.manifest import read_manifest

    manifest = read_manifest(tiny_model_dir)
    checkers = {f: SpotChecker(tiny_model_dir, manifest, f) for f in (0.0, 0.25, 1.0)}
    draws = {f: sum(checker.due() for _ in range(4000)) for f, checker in checkers.items()}
    assert draws[0.0] == 0 and draws[1.0] == 4000
    assert 850 <= draws[0.25] <= 1150, draws  # binomial: 1000 +- 27 (one sd)


def test_the_difference_is_relative_to_the_reference_s_scale(tiny_model_dir):
    from nanoswarm.client.verify import SpotChecker
    from nanoswarm.shards.manifest import read_manifest

    reference = torch.tensor([[[100.0, -50.0, 0.5]]])
    assert SpotChecker.difference(reference, reference) == 0.0
    assert SpotChecker.difference(reference, reference + 1.0) == pytest.approx(0.01)
    assert SpotChecker.difference(reference / 1000, reference / 1000 + 0.01) == pytest.approx(0.01)  # scale >= 1
    checker = SpotChecker(tiny_model_dir, read_manifest(tiny_model_dir), 0.5)
    assert checker.tolerance("float32", "float32") == 1e-4
    assert checker.tolerance("float32", "q80") == checker.tolerance("bfloat16", "float32") == 1e-1


def group_run(model_dir, liar: tuple[int, int], liar_args: list[str], due=None):
    """A greedy generation through a head group of blocks 0:4 whose member for heads `liar`
    lies (`liar_args`: tests/dishonest_node.py); an honest node for the same heads looks far
    away, so it is the replacement. `due` may replace the checker's draw."""
    other = (2, 4) if liar == (0, 2) else (0, 2)
    swarm = SwarmWithALiar(model_dir, [NodeSpec((0, 4), liar, args=["--dishonest", *liar_args]),
                                       NodeSpec((0, 4), other), NodeSpec((0, 4), liar)])
    swarm.start()
    try:
        model = SwarmModel.connect(model_dir, peers=swarm.addresses, options=SwarmOptions(timeout=10, verify=1.0))
        try:
            model.swarm.peers[swarm.addresses[2]].rtt = 1.0
            if due is not None:
                model.swarm.checker.due = due
            return model.generate(PROMPT, N_TOKENS, GREEDY, keep_logits=True), swarm.addresses
        finally:
            model.close()
    finally:
        swarm.stop()


def prompt_positions(model_dir) -> int:
    return len(SwarmModel.local(model_dir).generate(PROMPT, 0, GREEDY).prompt_ids)


@pytest.mark.parametrize("liar,liar_args", [
    ((0, 2), ["--wrong-heads"]),
    # The member without the output biases: partials of 0.02-0.03 here, where a slack relative to
    # 1 (as for hidden states) let a 50% lie pass under bfloat16's tolerance (a review).
    ((2, 4), ["--wrong-heads", "--dtype", "bfloat16"]),
    # The prompt in pieces of 5 (the liar's limit), the lie in every piece but the last: a
    # record of the last piece alone passed (a review).
    ((0, 2), ["--wrong-heads-of", "5", "--max-tokens-per-step", "5"]),
], ids=["float32", "small partials, bfloat16", "a prompt in pieces"])
def test_a_head_group_member_that_computes_wrong_is_caught_and_blamed_alone(tiny_model_dir, liar, liar_args):
    """A group's output is a sum of its members' partials: the check redoes each member's share
    and bans only the member that lied; the other member serves on, and the text is exact."""
    if "--max-tokens-per-step" in liar_args:
        assert prompt_positions(tiny_model_dir) % 5 != 0  # a shorter last piece, told the truth
    expected = SwarmModel.local(tiny_model_dir).generate(PROMPT, N_TOKENS, GREEDY, keep_logits=True)
    result, (liar_address, honest, replacement) = group_run(tiny_model_dir, liar, liar_args)
    assert result.wrong_results == 1 and result.failovers == 1 and result.spot_checks == N_TOKENS
    members = sorted([(liar, replacement), ((2, 4) if liar == (0, 2) else (0, 2), honest)])
    assert result.route == [{"layers": [0, 4], "peers": [p for _, p in members],
                             "heads": [list(h) for h, _ in members], "all_reduce": False}]  # checks need partials
    assert result.ids == expected.ids
    diff = max(float((a - b).abs().max()) for a, b in zip(result.logits, expected.logits))
    assert diff < 1e-4, diff


def test_a_member_s_unchecked_lie_gets_no_member_blamed_later(tiny_model_dir):
    """The liar lies in the prompt's step only, which is not checked; the later steps' attention
    of every member reads caches built from that lie's sums. Each member is judged on the inputs
    the client sent it, so none is blamed (redone from the group's inputs instead, every member's
    later attention differs, and whichever was checked first, honest or not, would be banned)."""
    draws = iter([False] + [True] * N_TOKENS)
    result, _ = group_run(tiny_model_dir, (0, 2), ["--wrong-heads-prompt"], due=lambda: next(draws))
    assert result.spot_checks == N_TOKENS - 1 and result.wrong_results == 0 and result.failovers == 0
    honest = SwarmModel.local(tiny_model_dir).generate(PROMPT, N_TOKENS, GREEDY, keep_logits=True)
    assert max(float((a - b).abs().max()) for a, b in zip(result.logits, honest.logits)) > 1e-2  # the lie counted


def test_a_member_s_share_is_redone_as_its_node_computes_it(tiny_model_dir):
    """member_reference, from the record of a step, against a head shard's cached steps."""
    from nanoswarm.client.verify import FanOutRecord, SpotChecker
    from nanoswarm.shards.manifest import read_manifest
    from nanoswarm.shards.weights import load_blocks

    manifest = read_manifest(tiny_model_dir)
    checker = SpotChecker(tiny_model_dir, manifest, 1.0)
    shard = load_blocks(tiny_model_dir, 1, 2, heads=(1, 3))
    layer, cache, record = shard.h["1"], shard.new_cache(16), FanOutRecord()
    x = torch.randn(1, 9, manifest.config.n_embd, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        for a, b in ((0, 6), (6, 7), (7, 9)):  # a prompt, then two steps
            record.begin(b - a)
            record.sent(1, "attn", x[:, a:b])
            attn = layer.attn_partial(x[:, a:b], [cache], 0)
            cache.length = b
            record.sent(1, "mlp", x[:, a:b] + attn)
            record.answered(1, "attn", [attn])
            record.answered(1, "mlp", [layer.mlp_partial(x[:, a:b] + attn)])
    for phase in ("attn", "mlp"):
        want = record.step_partials(1, phase)[0]
        got = checker.member_reference(1, (1, 3), phase, record.inputs(1, phase), record.positions)
        assert got.shape == want.shape == (1, 2, manifest.config.n_embd)
        assert (got - want).abs().max().item() < 1e-5, phase
    assert record.has_step
    record.drop_step()
    assert len(record.attn_inputs[1].entries) == 1  # joined once by the check, kept joined
    assert not record.has_step and record.attn_inputs[1].positions == 9  # the attention inputs stay
    record.reset()
    assert record.attn_inputs == {} and not record.has_step


def test_a_callers_bad_input_to_a_checked_head_group_gets_no_member_blamed(tiny_model_dir, cluster_factory):
    """Members refuse a NaN `bad_value` and store nothing; the group's record must not keep it
    either (it did: the next check judged every member on a position they never took, and banned
    an honest one; a review)."""
    from nanoswarm.client.session import SessionError

    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 4), (0, 2)), NodeSpec((0, 4), (2, 4))])
    model = SwarmModel.connect(tiny_model_dir, peers=swarm.addresses, options=SwarmOptions(timeout=10, verify=1.0))
    try:
        session = model.session(8)
        x = model.client.embed([1], 0)
        bad = x.clone()
        bad[0, 0, 3] = float("nan")
        with pytest.raises(SessionError, match="hold NaN or Inf"):
            session.step(bad)
        for t in range(3):
            session.step(model.client.embed([1 + t], t))
        assert session.spot_checks == 3 and session.wrong_results == 0 and session.failovers == 0
        assert model.swarm.bans == {}
        session.close()
    finally:
        model.close()


def test_a_peer_that_does_not_say_its_dtype_in_time_is_not_judged_on_float32_s_slack(tiny_model_dir, cluster_factory,
                                                                                    monkeypatch):
    """A bfloat16 node known from a record (no dtype there) whose `info` times out is failed over
    as a timeout, not judged with float32's tolerance, which banned it as wrong (a review), nor
    left unchecked, which a liar could use. The text stays exact."""
    from nanoswarm.client.peer_errors import PeerTimeout
    from nanoswarm.client.transport import PeerConnection

    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 4), args=["--dtype", "bfloat16"]), NodeSpec((0, 4))])
    model = SwarmModel.connect(tiny_model_dir, peers=swarm.addresses, options=SwarmOptions(timeout=10, verify=1.0))
    try:
        model.swarm.peers[swarm.addresses[1]].rtt = 1.0  # the bfloat16 node first
        model.swarm.peers[swarm.addresses[0]].extra.pop("dtype")
        unanswered = []
        request = PeerConnection.request

        def request_without_info_at_first(conn, kind, *args, **kwargs):
            if kind == "info" and conn.address == swarm.addresses[0]:
                unanswered.append(kind)
                raise PeerTimeout(conn.address, 1.0)
            return request(conn, kind, *args, **kwargs)

        monkeypatch.setattr(PeerConnection, "request", request_without_info_at_first)
        result = model.generate(PROMPT, N_TOKENS, GREEDY)
        banned = set(model.swarm.bans)
    finally:
        model.close()
    assert unanswered == ["info"] and banned == {swarm.addresses[0]}
    assert result.wrong_results == 0 and result.failovers == 1 and result.spot_checks == N_TOKENS - 1
    assert result.route[0]["peers"] == [swarm.addresses[1]]
    assert result.ids == SwarmModel.local(tiny_model_dir).generate(PROMPT, N_TOKENS, GREEDY).ids


@pytest.mark.parametrize("checked", [0, -1], ids=["the replacement checked", "the stage after it checked"])
def test_the_stages_after_a_replacement_that_computes_otherwise_are_rebuilt_before_they_are_judged(
        tiny_model_dir, cluster_factory, checked):
    """A bfloat16 first stage dies and a float32 one replaces it. Its outputs become what the next
    stage is judged on, but that stage's cache was built on the bfloat16 ones: checks banned the
    honest float32 stage as wrong (and with no other peer for its blocks, the generation ended).
    It is now reopened from the replacement's outputs first. The replacement itself is judged on
    its own outputs, not the bfloat16 node's (client/reopen.py `_replayed_outputs`)."""
    import signal

    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 2), args=["--dtype", "bfloat16"]), NodeSpec((2, 4)),
                                             NodeSpec((0, 2))])
    model = SwarmModel.connect(tiny_model_dir, peers=swarm.addresses, options=SwarmOptions(timeout=10, verify=1.0))
    try:
        model.swarm.peers[swarm.addresses[2]].rtt = 1.0  # the bfloat16 node first
        model.swarm.checker.pick = lambda choices: choices[checked]  # the same stage every step
        result = interrupted(model, lambda: swarm.kill(0, signal.SIGKILL))
    finally:
        model.close()
    assert result.failovers == 1 and result.wrong_results == 0 and result.spot_checks == 12
    assert [stage["peers"] for stage in result.route] == [[swarm.addresses[2]], [swarm.addresses[1]]]


def test_a_stage_that_lied_then_replays_right_after_a_reclaim_is_caught_by_its_replay(tiny_model_dir):
    """A node lies on its one-token steps, lets its idle session be reclaimed, and replays the
    history right when the client reopens it. Its replay became the next stage's history, on
    which checks banned that honest stage (its cache holds the lies' results), and it erased the
    record of the lies (reviews). A reclaimed stage's replay is now held against what it returned
    before for the same inputs: the liar is failed over as wrong, the stages after it rebuilt."""
    import time


    swarm = SwarmWithALiar(tiny_model_dir, [NodeSpec((0, 2), args=["--dishonest", "--wrong-decode",
                                                                   "--idle-timeout", "1"]),
                                            NodeSpec((2, 4)), NodeSpec((0, 2))])
    swarm.start()
    try:
        model = SwarmModel.connect(tiny_model_dir, peers=swarm.addresses, options=SwarmOptions(timeout=10, verify=1.0))
        try:
            model.swarm.peers[swarm.addresses[2]].rtt = 1.0  # the liar first
            model.swarm.checker.pick = lambda choices: choices[-1]  # the honest stage after it, every step
            # The liar reclaims the idle session while the client sleeps; the next step reopens it.
            result = interrupted(model, lambda: time.sleep(2.5), tokens=10, after=5)
            banned = set(model.swarm.bans)
        finally:
            model.close()
    finally:
        swarm.stop()
    liar, honest, spare = swarm.addresses
    assert result.stop_reason == "length" and result.spot_checks == 10
    assert result.wrong_results == 1 and result.failovers == 1 and banned == {liar}
    assert [stage["peers"] for stage in result.route] == [[spare], [honest]]


def test_a_client_without_block_files_is_told_before_any_peer_is_asked(tiny_model_dir, tmp_path):
    """A client's model dir may hold the manifest, embeddings and head only (enough to generate),
    but spot checks redo blocks: asked for them, it failed at its first check, mid-generation, with
    text printed (review207). The missing or cut file is named at connect, before any peer."""
    import shutil
    import time

    from nanoswarm.shards.manifest import ShardIntegrityError, read_manifest

    manifest = read_manifest(tiny_model_dir)
    client_dir = tmp_path / "client"
    client_dir.mkdir()
    blocks = [e.name for e in manifest.files if e.layers is not None]
    for entry in manifest.files:
        if entry.name not in blocks:
            shutil.copy(tiny_model_dir / entry.name, client_dir / entry.name)
    shutil.copy(tiny_model_dir / "manifest.json", client_dir / "manifest.json")
    t0 = time.monotonic()
    with pytest.raises(ShardIntegrityError, match=f"{blocks[0]}: cannot read it"):
        SwarmModel.connect(client_dir, peers=["tcp://127.0.0.1:1"], options=SwarmOptions(verify=0.5))
    assert time.monotonic() - t0 < 5  # (no peer asked: one that listens nowhere would take its timeout)
    for name in blocks:
        shutil.copy(tiny_model_dir / name, client_dir / name)
    cut = [e.name for e in manifest.files if e.layers is not None and e.heads is None][-1]  # (not a head slice)
    with open(client_dir / cut, "r+b") as f:
        f.truncate(100)
    with pytest.raises(ShardIntegrityError, match=f"{cut}: it is 100 bytes"):
        SwarmModel.connect(client_dir, peers=["tcp://127.0.0.1:1"], options=SwarmOptions(verify=1.0))


def test_a_node_restarted_with_another_dtype_is_judged_by_its_new_one(tiny_model_dir, cluster_factory):
    """A checking client kept each peer's dtype by address for its life: an honest node restarted
    at the same address and key as bfloat16 was judged on float32's slack and banned as wrong
    (review208's repro: 0.005 of the scale, float32's bound 1e-4). The dtype is kept for the peer
    process a link reached (a new connection is asked again)."""
    from conftest import free_port

    endpoint = f"tcp://127.0.0.1:{free_port()}"
    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 4), args=["--listen", endpoint])])
    node = swarm.nodes[0]
    greedy = SamplingParams(temperature=0)
    with SwarmModel.connect(tiny_model_dir, peers=swarm.addresses, options=SwarmOptions(verify=1.0)) as model:
        first = model.generate("To be, or not to be", 4, greedy)
        assert first.spot_checks > 0 and first.wrong_results == 0
        node.proc.kill()
        node.proc.wait(10)
        swarm.start_node(NodeSpec((0, 4), args=["--listen", endpoint, "--key-file", str(node.key_file),
                                                "--dtype", "bfloat16"]))
        again = model.generate("To be, or not to be", 4, greedy)
        assert again.spot_checks > 0 and again.wrong_results == 0 and not model.swarm.bans
        assert set(model.swarm.checker._dtypes.values()) == {"float32", "bfloat16"}


def test_a_peers_reply_of_another_shape_or_an_impossible_magnitude_is_refused():
    """A peer's answer must have the shape sent (its last `last` rows if asked so), and no honest
    block grows hidden states past HIDDEN_LIMIT + 2 |input| (review208: no test had a reply of
    another shape, and a factor of 2e6 for 2 passed the tests)."""
    from types import SimpleNamespace

    from nanoswarm.client.peer_errors import PeerError
    from nanoswarm.client.stages import HIDDEN_LIMIT, check_magnitude, check_reply
    from nanoswarm.protocol.messages import decode, encode

    conn = SimpleNamespace(address="tcp://127.0.0.1:9")
    x = torch.ones(1, 3, 8)
    for y, last in ((torch.ones(1, 4, 8), None), (torch.ones(1, 3, 8), 1), (torch.ones(1, 3, 9), None)):
        with pytest.raises(PeerError, match="expected tensors"):
            check_reply(conn, decode(encode("result", 1, {}, [y])), x, last)
    assert check_reply(conn, decode(encode("result", 1, {}, [x[:, -1:] * 2])), x, 1).shape == (1, 1, 8)
    x = torch.full((1, 3, 8), 100.0, dtype=torch.float64)  # (float64: 1e15 + 150 is exact)
    check_magnitude(conn.address, x, torch.full_like(x, HIDDEN_LIMIT + 150))  # within 2 |x| of the limit
    with pytest.raises(PeerError, match="no honest block"):
        check_magnitude(conn.address, x, torch.full_like(x, HIDDEN_LIMIT + 1e6))


def test_the_checks_measures_take_the_largest_error_and_the_strictest_slack_for_a_peer_that_hides_its_dtype(
        tiny_model_dir):
    """The spot checks' arithmetic (review208's verify.py survivors): a peer that states no dtype,
    or one the client does not know, gets float32's slack; a difference is the largest error,
    not a mean (one position or channel changed a lot is caught); a member's partial is judged
    against a hundredth of its input when it is small itself (a partial of 0.03 for inputs of 3
    may not move by half)."""
    from nanoswarm.client.verify import DTYPE_TOLERANCE, SpotChecker
    from nanoswarm.shards.manifest import read_manifest

    checker = SpotChecker(tiny_model_dir, read_manifest(tiny_model_dir), 0.0)
    for hidden in (None, "int4", ""):
        assert checker.tolerance(hidden, "float32") == DTYPE_TOLERANCE["float32"]
    assert checker.tolerance("bfloat16", "float32") == DTYPE_TOLERANCE["bfloat16"]
    reference = torch.zeros(1, 64, 8)
    got = reference.clone()
    got[0, 5, 3] = 0.5
    assert SpotChecker.difference(reference, got) == 0.5
    partial, sent = torch.full((1, 4, 8), 0.03), torch.full((1, 4, 8), 3.0)
    assert SpotChecker.partial_difference(partial, partial * 1.5, sent) == pytest.approx(0.015 / 0.03)
    assert SpotChecker.partial_difference(partial, partial * 1.5, sent) > DTYPE_TOLERANCE["bfloat16"]


def test_a_reclaimed_stage_caught_by_its_replay_is_failed_over_as_wrong_not_as_closed(tiny_model_dir, cluster_factory):
    """The reclaim-and-lie case above, as the user and the ban see it: the stage is failed over
    for its wrong replay (`wrong_result`), not for the `session_closed` that led to the reopen.
    Failed over under the reclaim's error, the notice and the ban said session_closed, and the
    suite passed (review214)."""


    from nanoswarm.client.api import GenerationResult

    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 2), args=["--dishonest", "--wrong-decode",
                                                                    "--idle-timeout", "1"]),
                                             NodeSpec((2, 4)), NodeSpec((0, 2))], cluster=SwarmWithALiar)
    liar, honest, spare = swarm.addresses
    notices: list[str] = []
    model = SwarmModel.connect(tiny_model_dir, peers=swarm.addresses, options=SwarmOptions(timeout=10, verify=1.0))
    try:
        model.swarm.peers[spare].rtt = 1.0  # the liar first
        model.swarm.checker.pick = lambda choices: choices[-1]  # the honest stage after it, every step
        result = GenerationResult()
        stream = model.stream(PROMPT, 8, GREEDY, result, on_failover=notices.append)
        for _ in range(4):
            next(stream)
        wait_for_sessions(liar, 0, seconds=10)  # the liar reclaims the idle session; the next step reopens it
        list(stream)
        ban = model.swarm.bans[liar]
    finally:
        model.close()
    assert result.wrong_results == 1 and result.failovers == 1
    assert len(notices) == 1 and notices[0].startswith(f"failover: {liar} (layers 0:2) wrong_result"), notices
    assert ban.code == "wrong_result"
    assert [stage["peers"] for stage in result.route] == [[spare], [honest]]


def test_stages_reopened_after_a_replacement_are_not_held_to_their_old_outputs(tiny_model_dir, cluster_factory):
    """A bfloat16 first stage of three dies and a float32 one replaces it: the stages after it are
    reopened from the replacement's outputs, and their replays differ from what they returned
    before, as their inputs do. That is no lie: only a reclaimed stage, replayed the same inputs,
    is held to its earlier outputs. Held to them (review214's mutation), the honest middle stage
    was failed over as wrong; the test above, with one stage after the replacement, passed."""
    import signal

    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 1), args=["--dtype", "bfloat16"]), NodeSpec((1, 2)),
                                             NodeSpec((2, 4)), NodeSpec((0, 1))])
    model = SwarmModel.connect(tiny_model_dir, peers=swarm.addresses, options=SwarmOptions(timeout=10, verify=1.0))
    try:
        model.swarm.peers[swarm.addresses[3]].rtt = 1.0  # the bfloat16 node first
        model.swarm.checker.pick = lambda choices: choices[-1]  # the last stage, every step
        result = interrupted(model, lambda: swarm.kill(0, signal.SIGKILL))
        banned = set(model.swarm.bans)
    finally:
        model.close()
    assert result.failovers == 1 and result.wrong_results == 0 and result.spot_checks == 12
    assert banned == {swarm.addresses[0]}
    assert [stage["peers"] for stage in result.route] == [[swarm.addresses[3]], [swarm.addresses[1]],
                                                          [swarm.addresses[2]]]


def test_an_honest_bfloat16_stage_reclaimed_and_replayed_gets_no_stage_after_it_blamed(
        tiny_model_dir, cluster_factory):
    """An honest bfloat16 node reclaims the idle session; its replay (the prompt and the tokens
    so far in one go) rounds otherwise than the steps did, within its dtype's slack: no lie, but
    the stage after it holds a cache built on the old outputs, which checks now judge it on. It
    is reopened from the replay's outputs at once, and no one is blamed. Left to a later step
    (review214's mutation), the suite passed."""


    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 2), args=["--dtype", "bfloat16", "--idle-timeout", "1"]),
                                             NodeSpec((2, 4))])
    model = SwarmModel.connect(tiny_model_dir, peers=swarm.addresses, options=SwarmOptions(timeout=10, verify=1.0))

    def reclaimed():
        wait_for_sessions(swarm.addresses[0], 0, seconds=10)

    try:
        model.swarm.checker.pick = lambda choices: choices[-1]  # the float32 stage after it, every step
        result = interrupted(model, reclaimed, tokens=10, after=5)
        banned = set(model.swarm.bans)
    finally:
        model.close()
    assert result.stop_reason == "length" and result.spot_checks == 10
    assert result.failovers == 0 and result.wrong_results == 0 and banned == set()
    assert [stage["peers"] for stage in result.route] == [[a] for a in swarm.addresses]


def test_a_checking_session_relays_nothing_though_relay_is_asked_for(tiny_model_dir, cluster_factory):
    """Spot checks judge each stage on the outputs it sent the client itself: a relayed step would
    bring the earlier hops' outputs back through the later ones (which could alter them and have
    an honest node blamed), and a relayed prompt's not at all. So a checking session steps stage
    by stage, and pins no hop, with `relay=True` (review224)."""
    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 2)), NodeSpec((2, 4))])
    model = SwarmModel.connect(tiny_model_dir, peers=swarm.addresses,
                               options=SwarmOptions(timeout=10, verify=1.0, relay=True))
    try:
        session = model.session(16)
        assert not session.relay
        result = model.generate(PROMPT, 4, GREEDY)
        assert result.spot_checks == 4 and result.wrong_results == 0
        relayed = [model.swarm.connection(a).request("info").fields["stats"]["relayed"] for a in swarm.addresses]
        assert relayed == [0, 0]
        session.close()
    finally:
        model.close()
    assert result.ids == SwarmModel.local(tiny_model_dir).generate(PROMPT, 4, GREEDY).ids
