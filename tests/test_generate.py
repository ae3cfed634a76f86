"""What the client accepts before it generates: token budgets, the context, the vocabulary and
sampling settings. Runs the real local path (SwarmModel.local) on random-weight models."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TINY, make_model_dir

from nanoswarm.client.api import SwarmModel
from nanoswarm.client.generate import SamplingParams
from nanoswarm.client.swarm import Swarm, SwarmOptions
from nanoswarm.node.cluster import NodeSpec
from nanoswarm.shards.model import ModelConfig
from nanoswarm.shards.tokenizer import EOT_TOKEN

GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir) -> SwarmModel:
    return SwarmModel.local(tiny_model_dir)


def record_sessions(model: SwarmModel) -> list[int]:
    """The max_length of every session the model opens from now on."""
    opened: list[int] = []
    real = model.session

    def session(max_length: int, on_failover=None):
        opened.append(max_length)
        return real(max_length, on_failover)

    model.session = session
    return opened


def prompt_of(model: SwarmModel, n: int) -> str:
    """A prompt that encodes to exactly n tokens (" the" repeated)."""
    prompt = model.encoding.decode([262] * n)
    assert len(model.encoding.encode(prompt)) == n
    return prompt


def test_zero_new_tokens_generate_nothing_and_open_no_session(tiny_model_dir):
    model = SwarmModel.local(tiny_model_dir)
    opened = record_sessions(model)
    result = model.generate("ROMEO:", 0, GREEDY)
    assert result.ids == [] and result.text == "" and opened == []
    assert result.prompt_ids == model.encoding.encode("ROMEO:")
    model.close()
    with pytest.raises(RuntimeError, match="this SwarmModel is closed"):  # as with any tokens (review160)
        model.generate("ROMEO:", 0, GREEDY)


def test_negative_new_tokens_are_refused(tiny):
    with pytest.raises(ValueError, match="max_new_tokens must be a whole number >= 0, got -5"):
        tiny.generate("ROMEO:", -5, GREEDY)


def test_a_callers_mistakes_are_refused_before_any_peer_is_asked(tiny_model_dir, cluster_factory, monkeypatch):
    """Sent, a node would refuse them, and the client would fail its honest peer over and ban
    it: the model stopped working for the ban's 30 s after one `generate(prompt, 5.5)` (a review)."""
    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 4))])
    model = SwarmModel.connect(tiny_model_dir, peers=swarm.addresses)
    try:
        for call, error, why in ((lambda: model.generate("x", 5.5), ValueError, "max_new_tokens must be a whole"),
                                 (lambda: model.generate("x", True), ValueError, "max_new_tokens"),
                                 (lambda: model.generate(b"x", 5), TypeError, "the prompt must be text"),
                                 (lambda: model.generate("x", 5, {"temperature": 0}), TypeError, "SamplingParams"),
                                 (lambda: model.session(0), ValueError, "max_length must be a whole number from 1"),
                                 (lambda: model.session(TINY.block_size + 1), ValueError, "max_length"),
                                 (lambda: model.session(5.5), ValueError, "max_length")):
            with pytest.raises(error, match=why):
                call()
        session = model.session(8)
        x = model.client.embed([1, 2, 3], 0)
        for bad in (torch.zeros(1, 3, 7), x[:, :0], x[0], x.long(), "x"):
            with pytest.raises(ValueError, match=r"a step takes hidden states of shape \[1, positions >= 1, 64\]"):
                session.step(bad)
        assert session.step(x).shape == x.shape
        with pytest.raises(ValueError, match=r"session is full: 9 positions > max_length 8"):
            session.step(torch.cat([x, x], dim=1))  # 3 + 6 positions
        with pytest.raises(ValueError, match="hold NaN or Inf"):
            session.step(x[:, :2] * float("nan"))
        assert session.step(x).shape == x.shape  # (the session goes on as it was)
        session.close()
        with pytest.raises(RuntimeError, match="this session is closed"):
            session.step(model.client.embed([4], 3))
        assert model.swarm.bans == {}  # nothing blamed on the peer
        for args, why in (({"wire": "bogus"}, "wire must be one of float32"), ({"ban_seconds": -1}, "ban_seconds"),
                          ({"relay": "no"}, "relay must be True or False"), ({"timeout": True}, "timeout")):
            with pytest.raises(ValueError, match=why):
                SwarmOptions(**args)
        with pytest.raises(TypeError, match="peers must be a list of contacts, got a single str"):
            SwarmModel.connect(tiny_model_dir, peers=swarm.addresses[0])
        for none in ({}, {"peers": [], "bootstrap": None}):  # refused at once: every route failed later (review207)
            with pytest.raises(ValueError, match="give peers"):
                SwarmModel.connect(tiny_model_dir, **none)
        closed = []  # a connect that fails after connecting closes the links it made (a review)
        monkeypatch.setattr(Swarm, "close", lambda self, close=Swarm.close: (closed.append(self), close(self))[1])
        with pytest.raises(RuntimeError, match="CUDA device"):
            SwarmModel.connect(tiny_model_dir, peers=swarm.addresses, device="cuda:99")
        assert len(closed) == 1 and closed[0].closed and closed[0]._conns == {}
        with SwarmModel.connect(tiny_model_dir, peers=swarm.addresses) as other, other.session(4) as alone:
            alone.step(x[:, :1])
        assert alone.closed and other.closed
        assert model.generate("x", 3, GREEDY).ids == SwarmModel.local(tiny_model_dir).generate("x", 3, GREEDY).ids
        # A session stepped after its model closed: its links are gone, and a failover would
        # have made new ones (and banned the honest peer), outliving close() (a review)
        session = model.session(4)
        model.close()
        with pytest.raises(RuntimeError, match="this session's SwarmModel is closed"):
            session.step(x[:, :1])
        assert model.swarm.bans == {} and model.swarm._conns == {}
    finally:
        model.close()


def test_a_full_context_prompt_still_gets_one_token(tiny_model_dir):
    model = SwarmModel.local(tiny_model_dir)
    opened = record_sessions(model)
    result = model.generate(prompt_of(model, TINY.block_size), 5, GREEDY)
    assert len(result.ids) == 1
    assert opened == [TINY.block_size]  # positions 0..block_size-1: the new token needs none


def test_new_tokens_are_capped_by_the_context(tiny_model_dir):
    model = SwarmModel.local(tiny_model_dir)
    opened = record_sessions(model)
    n = TINY.block_size - 3
    result = model.generate(prompt_of(model, n), 50, GREEDY)
    # 4 tokens: three are fed back (positions n..block_size-1), the last is only sampled
    assert opened == [TINY.block_size]
    assert len(result.ids) == 4 and result.stop_reason == "context"


def test_a_prompt_longer_than_the_context_is_refused(tiny):
    with pytest.raises(ValueError, match=f"prompt is {TINY.block_size + 1} tokens; the model's context is"):
        tiny.generate(prompt_of(tiny, TINY.block_size + 1), 1, GREEDY)


def test_prompt_tokens_outside_a_small_vocabulary_are_named(tmp_path):
    config = ModelConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=1000, block_size=32, gelu="tanh")
    model = SwarmModel.local(make_model_dir(tmp_path, config))
    assert max(model.encoding.encode(" the the")) < 1000
    assert len(model.generate(" the the", 3, GREEDY).ids) == 3  # ids the model has: fine
    ids = model.encoding.encode("ROMEO:")
    bad = next(t for t in ids if t >= 1000)
    with pytest.raises(ValueError, match=rf"prompt token {bad} .* vocabulary of 1000 ids"):
        model.generate("ROMEO:", 3, GREEDY)
    assert model.encoding.encode("ale") == [1000]  # the first id past the vocabulary: refused too
    with pytest.raises(ValueError, match=r"prompt token 1000 \('ale'\) is outside the model's vocabulary of 1000"):
        model.generate("ale", 3, GREEDY)
    with pytest.raises(ValueError, match="prompt token 50256 .*endoftext"):
        model.generate("", 3, GREEDY)  # an empty prompt starts from <|endoftext|>


def test_end_of_text_in_a_prompt_is_plain_text(tiny):
    """Text an application passes on from its users cannot end the document early."""
    result = tiny.generate("ROMEO:<|endoftext|>JULIET:", 2, GREEDY)
    assert EOT_TOKEN not in result.prompt_ids
    assert result.prompt_ids == tiny.encoding.encode_ordinary("ROMEO:<|endoftext|>JULIET:")
    assert tiny.generate("", 1, GREEDY).prompt_ids == [EOT_TOKEN]  # an empty prompt starts from it


def test_a_tiny_temperature_is_greedy_not_a_crash(tiny):
    """1e-40 divided float32 logits into inf - inf: "probability tensor contains inf, nan"."""
    greedy = tiny.generate("ROMEO:", 6, GREEDY)
    for temperature in (1e-40, 5e-324, 1e-20):
        assert tiny.generate("ROMEO:", 6, SamplingParams(temperature=temperature, seed=1)).ids == greedy.ids
    assert greedy.stop_reason == "length"


def test_a_sampled_end_of_text_ends_the_text_without_printing_itself(tiny, monkeypatch):
    from nanoswarm.client import generate as generate_mod

    picks = iter([262, 262, EOT_TOKEN])
    monkeypatch.setattr(generate_mod.Sampler, "__call__", lambda self, logits: next(picks))
    result = tiny.generate("ROMEO:", 10, GREEDY)
    assert result.ids == [262, 262, EOT_TOKEN] and result.stop_reason == "eot"
    assert result.text == " the the" and "<|endoftext|>" not in result.text


def test_threads_may_share_a_model_and_close_ends_their_generations(tiny_model_dir):
    """A local model's sessions each have their own cache: interleaved generations agree."""
    import threading

    model = SwarmModel.local(tiny_model_dir)
    expected = model.generate("ROMEO:", 12, GREEDY).ids
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(model.generate("ROMEO:", 12, GREEDY).ids))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [expected] * 3
    from nanoswarm.client.api import GenerationResult

    result = GenerationResult()
    stream = model.stream("ROMEO:", 12, GREEDY, result)
    next(stream)
    model.close()
    with pytest.raises(RuntimeError, match="closed during the generation"):
        list(stream)
    assert result.stop_reason == ""  # it did not end as a generation ends
    with pytest.raises(RuntimeError, match="this SwarmModel is closed"):
        model.generate("ROMEO:", 2, GREEDY)


@pytest.mark.parametrize("kwargs,what", [
    ({"temperature": math.nan}, "temperature"), ({"temperature": math.inf}, "temperature"),
    ({"temperature": -1.0}, "temperature"), ({"top_p": math.nan}, "top_p"), ({"top_p": 0.0}, "top_p"),
    ({"seed": -1}, "seed"), ({"seed": 2**64}, "seed"), ({"seed": 1.5}, "seed"), ({"seed": True}, "seed"),
    ({"top_k": 0}, "top_k"), ({"top_k": 2.5}, "top_k"), ({"top_k": True}, "top_k"),
])
def test_sampling_params_refuse_bad_values(kwargs, what):
    with pytest.raises(ValueError, match=what):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("top_k", [None, 5])
def test_a_top_p_too_small_for_float32_keeps_the_likeliest_token(top_k):
    """A top_p below float32's smallest number compared as 0, kept no token, and the sampler
    failed ("invalid multinomial distribution"): a review's `--top-p 1e-300`."""
    from nanoswarm.client.generate import Sampler

    logits = torch.randn(100, generator=torch.Generator().manual_seed(0))
    sampler = Sampler(SamplingParams(temperature=1.0, top_k=top_k, top_p=1e-300, seed=1))
    assert [sampler(logits) for _ in range(3)] == [int(torch.argmax(logits))] * 3


def test_the_sampler_draws_from_the_distribution_its_options_leave():
    """Tokens of probabilities 0.4, 0.3, 0.15, 0.1, 0.05: top_k and top_p keep the likeliest few
    (top_p: while the mass before a token is under it), temperature sharpens, and a seed repeats."""
    from collections import Counter

    from nanoswarm.client.generate import Sampler

    logits = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05]).log()

    def drawn(**params) -> Counter:
        sampler = Sampler(SamplingParams(seed=5, **params))
        return Counter(sampler(logits) for _ in range(2000))

    plain = drawn()
    assert set(plain) == {0, 1, 2, 3, 4} and 690 <= plain[0] <= 910  # 0.4 of 2000, sd 22
    for kept in (drawn(top_k=2), drawn(top_p=0.5)):  # 0.4 + 0.3: renormalised to 4:3
        assert set(kept) == {0, 1} and 1030 <= kept[0] <= 1260, kept
    assert set(drawn(top_p=0.75)) == {0, 1, 2}  # the mass before token 2 is 0.7
    sharp = drawn(temperature=0.5)  # p squared, renormalised: token 0 at 0.16 / 0.285 = 0.56
    assert 1010 <= sharp[0] <= 1240, sharp
    a, b = Sampler(SamplingParams(seed=9)), Sampler(SamplingParams(seed=9))
    assert [a(logits) for _ in range(50)] == [b(logits) for _ in range(50)]


def test_sampling_options_decide_the_tokens_a_generation_draws(tiny):
    """Through the generation path: a seed repeats its draws and another seed (0 too) draws others;
    top_k=1, or a tiny top_p, leaves the likeliest token only (greedy, whatever the seed); a top_k
    past the vocabulary and top_p=1 cut nothing (the draws of the same seed without them)."""
    def drawn(**params) -> list[int]:
        return tiny.generate("ROMEO:", 8, SamplingParams(**params)).ids

    greedy = tiny.generate("ROMEO:", 8, GREEDY).ids
    one, zero = drawn(seed=1), drawn(seed=0)
    assert one == drawn(seed=1) and zero == drawn(seed=0)
    assert len({tuple(one), tuple(zero), tuple(drawn(seed=2))}) == 3  # (8 draws from ~50k tokens each)
    assert one != greedy
    for seed in (1, 2):
        assert drawn(top_k=1, seed=seed) == greedy and drawn(top_p=1e-9, seed=seed) == greedy
    assert drawn(top_k=10**6, seed=1) == one and drawn(top_k=TINY.vocab_size, seed=1) == one
    assert drawn(top_p=1.0, seed=1) == one


def test_a_generation_times_its_first_token_and_rates_the_rest(tiny):
    """GenerationStats as `--json` reports them: the first token's time counts the prompt, the
    rate counts only the tokens after it, over the time after it."""
    one = tiny.generate("ROMEO:", 1, GREEDY)
    assert one.stats.new_tokens == 1 and one.stats.step_seconds == []
    assert 0 < one.stats.time_to_first_token == one.stats.total_seconds
    assert one.stats.tokens_per_second == 0.0  # no token after the first
    result = tiny.generate("ROMEO:", 6, GREEDY)
    stats = result.stats
    assert stats.prompt_tokens == len(result.prompt_ids) == 3 and stats.new_tokens == 6
    assert len(stats.step_seconds) == 5 and all(s > 0 for s in stats.step_seconds)
    assert 0 < stats.time_to_first_token < stats.total_seconds
    assert stats.tokens_per_second == pytest.approx(5 / (stats.total_seconds - stats.time_to_first_token))
    shown = result.to_json()
    assert (shown["time_to_first_token"], shown["tokens_per_second"]) == (stats.time_to_first_token,
                                                                           stats.tokens_per_second)


def test_a_character_split_over_tokens_is_text_once_whole_and_a_cut_one_is_marked(tiny, monkeypatch):
    """Bytes of a UTF-8 character split over tokens are held back until it is whole; a generation
    that ends inside one ends with U+FFFD, not silently short."""
    from nanoswarm.client import generate as generate_mod

    picks = iter([447, 247])  # b"\xe2\x80", b"\x99": "’"
    monkeypatch.setattr(generate_mod.Sampler, "__call__", lambda self, logits: next(picks))
    result = tiny.generate("ROMEO:", 2, GREEDY)
    assert result.ids == [447, 247] and result.text == "\u2019"
    picks = iter([262, 158])  # " the", then b"\xe2" alone: the generation stops inside a character
    pieces = list(tiny.stream("ROMEO:", 2, GREEDY))
    assert pieces == [" the", "\ufffd"]
    picks = iter([262, 158])
    assert tiny.generate("ROMEO:", 2, GREEDY).text == " the\ufffd"


def test_a_prompts_step_asks_back_only_the_row_the_next_token_needs(tiny, monkeypatch):
    """The prefill asks for its last position alone (`last=1`): the route's last node then sends
    one row, not the whole prompt's hidden states; each decode step is one position in, one out."""
    from nanoswarm.client.session import InferenceSession

    rows: list[tuple[int, int]] = []
    real = InferenceSession.step

    def step(self, hidden, last=None):
        out = real(self, hidden, last)
        rows.append((hidden.shape[1], out.shape[1]))
        return out
    monkeypatch.setattr(InferenceSession, "step", step)
    result = tiny.generate("ROMEO: the swarm", 3, GREEDY)
    assert len(result.prompt_ids) > 1 and rows == [(len(result.prompt_ids), 1), (1, 1), (1, 1)]


def test_swarm_options_refuse_seconds_and_heartbeats_out_of_their_bounds():
    """SwarmOptions are checked when made: a timeout or ban of 0 seconds (every request timed out
    at once, a ban that bans nothing), one past MAX_SECONDS (ZeroMQ's poll takes milliseconds as a
    C int) or infinite, and a heartbeat under 0.1 s are refused with the bound; the bounds
    themselves are taken."""
    from nanoswarm.protocol.bounds import MAX_SECONDS

    for name in ("timeout", "ban_seconds"):
        for bad in (0, 0.0, -1, MAX_SECONDS * 2, math.inf, math.nan):
            with pytest.raises(ValueError, match=f"{name} must be a positive number of seconds up to 1000000"):
                SwarmOptions(**{name: bad})
        assert getattr(SwarmOptions(**{name: MAX_SECONDS}), name) == MAX_SECONDS
    for bad in (0, 0.05, -1, 3601, math.nan):
        with pytest.raises(ValueError, match="heartbeat must be 0.1 to 3600 seconds"):
            SwarmOptions(heartbeat=bad)
    assert SwarmOptions(heartbeat=0.1).silence == 0.1 and SwarmOptions(heartbeat=3600).silence == 3600
    for name in ("insecure", "relay", "introduce", "all_reduce"):
        with pytest.raises(ValueError, match=f"{name} must be True or False, got 1"):
            SwarmOptions(**{name: 1})


# Review227: a step of more than one sequence is the caller's mistake.


def test_a_step_of_more_than_one_sequence_is_refused_before_any_peer_is_asked(tiny_model_dir, cluster_factory):
    """A session holds one sequence: hidden states of batch size 2 are refused as the caller's
    mistake, no peer asked or blamed, and the session goes on as it was. (Dropping the batch-size
    check from InferenceSession._check_input, a review227 mutation, passed the suite: no mistake
    of the test above has a batch size other than 1.)"""
    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 4))])
    with SwarmModel.connect(tiny_model_dir, peers=swarm.addresses) as model, model.session(8) as session:
        x = model.client.embed([1, 2, 3], 0)
        with pytest.raises(ValueError, match=r"a step takes hidden states of shape \[1, positions >= 1, 64\]"):
            session.step(torch.cat([x, x]))
        assert session.pos == 0 and session.failovers == 0 and model.swarm.bans == {}
        assert session.step(x).shape == x.shape
