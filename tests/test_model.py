"""The model itself (shards/model.py) against a plain re-derivation of GPT-2's forward pass: its
config checks, block and head ranges, and KV-cache steps in any pieces."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_gpt as shared_make_gpt

from nanoswarm.shards.model import GPT, Blocks, KVCache, ModelConfig

CONFIGS = [ModelConfig(n_layer=3, n_head=4, n_embd=32, vocab_size=97, block_size=24, gelu="tanh"),
           ModelConfig(n_layer=2, n_head=3, n_embd=24, vocab_size=50, block_size=24, bias=False, gelu="exact")]


def make_gpt(config: ModelConfig, seed: int = 0) -> GPT:
    return shared_make_gpt(config, seed, attention_too=True)


def reference_logits(config: ModelConfig, sd: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """GPT-2 written out from its definition, one position and one head at a time, in float64:
    no KV cache, no fused attention, no head slices."""
    sd = {k: v.double() for k, v in sd.items()}

    def ln(x, name):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        y = (x - mu) / torch.sqrt(var + 1e-5) * sd[f"{name}.weight"]
        return y + sd[f"{name}.bias"] if config.bias else y

    def lin(x, name):
        y = x @ sd[f"{name}.weight"].T
        return y + sd[f"{name}.bias"] if config.bias else y

    def gelu(x):
        if config.gelu == "tanh":
            return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
        return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))

    T, E, H = ids.shape[-1], config.n_embd, config.n_head
    D = E // H
    x = sd["wte.weight"][ids] + sd["wpe.weight"][:T]
    for i in range(config.n_layer):
        qkv = lin(ln(x, f"h.{i}.ln_1"), f"h.{i}.attn.c_attn")
        q, k, v = qkv[..., :E], qkv[..., E:2 * E], qkv[..., 2 * E:]
        y = torch.zeros_like(x)
        for h in range(H):
            cols = slice(h * D, (h + 1) * D)
            for t in range(T):
                scores = q[..., t:t + 1, cols] @ k[..., :t + 1, cols].transpose(-1, -2) / math.sqrt(D)
                y[..., t:t + 1, cols] = torch.softmax(scores, dim=-1) @ v[..., :t + 1, cols]
        x = x + lin(y, f"h.{i}.attn.c_proj")
        x = x + lin(gelu(lin(ln(x, f"h.{i}.ln_2"), f"h.{i}.mlp.c_fc")), f"h.{i}.mlp.c_proj")
    return ln(x, "ln_f") @ sd["wte.weight"].T


@pytest.mark.parametrize("config", CONFIGS, ids=["tanh-bias", "exact-no-bias"])
def test_logits_match_gpt2_written_out(config):
    model = make_gpt(config)
    ids = torch.randint(0, config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    want = reference_logits(config, model.flat_state_dict(), ids)
    for grad in (True, False):  # training's F.linear and inference's linear
        with torch.set_grad_enabled(grad):
            got = model(ids)
        assert (got.double() - want).abs().max().item() <= 1e-4


@pytest.mark.parametrize("pieces", [[11], [1] * 11, [1, 3, 1, 2, 4], [2, 2, 3, 4], [5, 1, 5], [1, 10]])
def test_cached_steps_in_any_pieces_give_the_whole_sequences_logits(pieces):
    """A session steps its positions in pieces of any length (a prompt, decode steps, a later
    prompt): each piece sees the cache plus itself up to each position, as the whole sequence."""
    config = CONFIGS[0]
    model = make_gpt(config)
    ids = torch.randint(0, config.vocab_size, (1, sum(pieces)), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        want = model(ids)
        cache = model.blocks.new_cache(config.block_size)
        start = 0
        for n in pieces:
            got = model(ids[:, start:start + n], [cache], start)
            assert cache.length == start + n
            assert (got - want[:, start:start + n]).abs().max().item() <= 1e-5, (start, n)
            start += n
        # the cache holds each block's keys and values of every position, and nothing past them
        assert cache.k[:, :, :, start:].abs().max().item() == 0 and cache.k[:, :, :, :start].abs().min().item() > 0


def test_rows_of_one_step_attend_over_their_own_sessions_cache():
    """One forward pass over several sessions (batched steps): each row runs on its own cache,
    whose lengths differ, and gets what it gets alone."""
    config = CONFIGS[0]
    model = make_gpt(config)
    blocks = model.blocks
    g = torch.Generator().manual_seed(3)
    histories = [torch.randn(1, n, config.n_embd, generator=g) for n in (0, 1, 4)]
    for T in (1, 3):
        step = torch.randn(len(histories), T, config.n_embd, generator=g)
        with torch.inference_mode():
            caches = [blocks.new_cache(16) for _ in histories]
            for h, c in zip(histories, caches):
                if h.shape[1]:
                    blocks(h, [c])
            got = blocks(step, caches)
            for i, h in enumerate(histories):
                want = blocks(torch.cat([h, step[i:i + 1]], dim=1))[:, h.shape[1]:]
                assert (got[i:i + 1] - want).abs().max().item() <= 1e-5, (T, i)
                assert caches[i].length == h.shape[1] + T


@pytest.mark.parametrize("change,message", [
    (dict(n_layer=0), "config field n_layer must be a positive integer, got 0"),
    (dict(n_head=-4), "config field n_head must be a positive integer, got -4"),
    (dict(n_embd=64.0), "config field n_embd must be a positive integer, got 64.0"),
    (dict(vocab_size=True), "config field vocab_size must be a positive integer, got True"),
    (dict(block_size=0), "config field block_size must be a positive integer, got 0"),
    (dict(n_embd=66), "n_embd 66 is not divisible by n_head 4"),
    (dict(gelu="erf"), "gelu must be one of ('tanh', 'exact'), got 'erf'"),
])
def test_a_config_that_cannot_be_a_model_is_refused_naming_the_field(change, message):
    fields = dict(n_layer=2, n_head=4, n_embd=64, vocab_size=100, block_size=16, gelu="tanh")
    with pytest.raises(ValueError) as err:
        ModelConfig(**{**fields, **change})
    assert str(err.value) == message


@pytest.mark.parametrize("start,stop,heads,message", [
    (2, 2, None, "block range 2:2 is outside 0:4"),
    (3, 2, None, "block range 3:2 is outside 0:4"),
    (-1, 2, None, "block range -1:2 is outside 0:4"),
    (0, 5, None, "block range 0:5 is outside 0:4"),
    (0, 4, (2, 2), "head range 2:2 is outside 0:4"),
    (0, 4, (3, 1), "head range 3:1 is outside 0:4"),
    (0, 4, (0, 5), "head range 0:5 is outside 0:4"),
    (0, 4, (-1, 2), "head range -1:2 is outside 0:4"),
])
def test_blocks_refuse_empty_or_outside_ranges(start, stop, heads, message):
    config = ModelConfig(n_layer=4, n_head=4, n_embd=32, vocab_size=50, block_size=8)
    with pytest.raises(ValueError) as err:
        Blocks(config, start, stop, heads)
    assert str(err.value) == message
    Blocks(config, 3, 4, (3, 4))  # the last block, the last head: served


def test_blocks_run_the_sub_range_asked_with_a_cache_of_its_blocks_only():
    """A session may cover blocks [a, b) inside the ones a node serves: its cache holds those
    blocks only (node/sessions.py sizes its memory from it), in the model's dtype."""
    config = CONFIGS[0]
    blocks = make_gpt(config).blocks
    x = torch.randn(1, 5, config.n_embd, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        want = blocks.h["2"](blocks.h["1"](x))
        assert (blocks(x, None, 1, 3) - want).abs().max().item() <= 1e-6
        cache = blocks.new_cache(8, 2)
        assert cache.k.shape == cache.v.shape == (2, 1, config.n_head, 8, config.head_dim)
        assert (blocks(x, [cache], 1, 3) - want).abs().max().item() <= 1e-5
        half = Blocks(config, 0, 3, (1, 3)).to(torch.bfloat16)
        assert half.new_cache(4).k.dtype is torch.bfloat16 and half.new_cache(4).k.shape[:3] == (3, 1, 2)
    # what a node counts against its KV budget before it opens a session is what the cache takes
    for dtype in (torch.float32, torch.bfloat16):
        assert KVCache.bytes_for(3, 2, config.head_dim, 4, dtype) == half.to(dtype).new_cache(4).nbytes


def test_an_untied_lm_head_is_refused_not_loaded_over_wte():
    """Review212: this model ties lm_head to wte; an lm_head.weight of other values overwrote wte
    with it, without a word. One equal to wte (a tied head saved twice) loads."""
    config = ModelConfig(n_layer=1, n_head=2, n_embd=8, vocab_size=20, block_size=8)
    sd = {k: v.clone() for k, v in GPT(config).flat_state_dict().items()}
    model = GPT(config)
    model.load_flat_state_dict({**sd, "lm_head.weight": sd["wte.weight"].clone()})
    assert torch.equal(model.embeddings.wte.weight, sd["wte.weight"])
    with pytest.raises(ValueError, match="lm_head.weight is not its wte.weight"):
        GPT(config).load_flat_state_dict({**sd, "lm_head.weight": torch.randn(20, 8)})
