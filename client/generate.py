"""Generation on the client: embeddings in, hidden states through the session, head and
sampling here. Peers only ever see hidden states; all sampling state stays with the client."""

from __future__ import annotations

import codecs
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import tiktoken
import torch

from nanoswarm.shards.device import tf32_on
from nanoswarm.shards.model import Embeddings, Head

from .session import InferenceSession

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0   # 0 means greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        # NaN fails every comparison, so `< 0` alone would let it through to the sampler.
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        # Whole numbers, checked here: torch would refuse 2.5 only after the prompt had run.
        if self.top_k is not None and not (type(self.top_k) is int and self.top_k >= 1):
            raise ValueError(f"top_k must be a whole number >= 1, got {self.top_k!r}")
        if self.top_p is not None and not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not (type(self.seed) is int and 0 <= self.seed < 2**64):  # torch: 64 bits
            raise ValueError(f"seed must be a whole number from 0 to 2**64 - 1, got {self.seed!r}")


MIN_TEMPERATURE = 1e-30  # below it sampling is greedy: float32 logits over it overflow to inf


class Sampler:
    def __init__(self, params: SamplingParams):
        self.params = params
        self.generator = torch.Generator()
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()

    def __call__(self, logits: torch.Tensor) -> int:
        """Next token id from the last position's logits ([vocab])."""
        p = self.params
        logits = logits.float()
        if p.temperature < MIN_TEMPERATURE:  # 0, or so small that float32 cannot divide by it
            return int(torch.argmax(logits))
        # top-k first: the softmax then runs over k values instead of the whole vocabulary
        if p.top_k is not None and p.top_k < logits.numel():
            values, ids = torch.topk(logits, p.top_k)
        else:
            values, ids = torch.sort(logits, descending=True)
        # Shifted so the largest is 0: a tiny temperature makes the others -inf, never inf - inf.
        probs = torch.softmax((values - values[0]) / p.temperature, dim=-1)
        if p.top_p is not None and p.top_p < 1:
            if p.top_k is not None:  # topk output is sorted already, but be explicit
                probs, order = torch.sort(probs, descending=True)
                ids = ids[order]
            keep = torch.cumsum(probs, dim=-1) - probs < p.top_p
            keep[0] = True  # a top_p below float32's smallest number compares as 0 (a review)
            probs = probs * keep
        choice = torch.multinomial(probs, 1, generator=self.generator)
        return int(ids[choice])


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    time_to_first_token: float = 0.0
    total_seconds: float = 0.0
    step_seconds: list[float] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        decode = self.total_seconds - self.time_to_first_token
        return (self.new_tokens - 1) / decode if self.new_tokens > 1 and decode > 0 else 0.0


class ClientModel:
    """The pieces a client runs itself: embeddings, final norm and head.

    The head may live on a GPU (`device`): it is the client's one big matrix (50257 x 768 for
    GPT-2 small, ~6 ms a token on two CPU cores). Embeddings stay on the CPU, where the wire
    takes hidden states from, and logits come back to it as float32 for the sampler."""

    def __init__(self, embeddings: Embeddings, head: Head):
        self.embeddings, self.head = embeddings, head
        # Where the head's weights are (load_head's device): a bare "cuda" would name the current
        # device of whichever thread asks, which need not be the one the head was loaded on.
        weight = next(head.parameters())
        self.device = weight.device
        # A float32 head on a GPU is warned of once if TF32 comes on in this process (`logits`).
        self._watch_tf32 = self.device.type == "cuda" and weight.dtype is torch.float32

    def embed(self, ids: list[int], start: int) -> torch.Tensor:
        with torch.inference_mode():
            return self.embeddings(torch.tensor([ids], dtype=torch.long), start)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The logits of the last position of `hidden` [1, T, C]: [vocab], float32 on the CPU."""
        return self.logits_rows(hidden[:, -1:, :])[0]

    def logits_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Logits of several generations' last positions at once, `rows` [n, 1, C] -> [n, vocab]
        float32 on the CPU: the head's weight is read once for all n (client/batch.py). Each
        row is within float32 rounding (~2e-6) of `logits` of that row alone, not equal to the bit."""
        with torch.inference_mode():
            if self.device.type == "cpu":
                return self.head(rows)[:, -1]
            if self._watch_tf32 and tf32_on():
                self._warn_tf32()
            return self.head(rows.to(self.device))[:, -1].float().cpu()

    def _warn_tf32(self) -> None:
        # Not turned off again here: the setting is the whole process's, and its owner chose it.
        self._watch_tf32 = False
        log.warning("TF32 is on in this process (torch.set_float32_matmul_precision): the head's float32 "
                    "logits on %s differ from float32's by ~1e-3; torch.set_float32_matmul_precision('highest') "
                    "makes them exact", self.device)


def generate_ids(model: ClientModel, session: InferenceSession, prompt: list[int],
                 max_new_tokens: int, sampling: SamplingParams, stop_token: int | None = None,
                 stats: GenerationStats | None = None, logits_out: list | None = None) -> Iterator[int]:
    """Yields new token ids one by one (prefill, then one decode step per token)."""
    if not prompt:
        raise ValueError("the prompt must hold at least one token")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if max_new_tokens == 0:
        return  # not even the prefill: nothing would use it
    sampler = Sampler(sampling)
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens = len(prompt)
    t0 = time.perf_counter()
    hidden = session.step(model.embed(prompt, 0), last=1)  # the next token's row: the nodes send no more
    for i in range(max_new_tokens):
        logits = model.logits(hidden)
        if logits_out is not None:
            logits_out.append(logits)
        token = sampler(logits)
        now = time.perf_counter()
        if i == 0:
            stats.time_to_first_token = now - t0
        stats.new_tokens += 1
        stats.total_seconds = now - t0
        yield token
        if token == stop_token or i + 1 == max_new_tokens:
            break
        t1 = time.perf_counter()
        hidden = session.step(model.embed([token], session.pos))
        stats.step_seconds.append(time.perf_counter() - t1)


class TextStream:
    """Token ids to text as they come: holds back bytes of a half-finished UTF-8 character."""

    def __init__(self, encoding: tiktoken.Encoding):
        self.encoding = encoding
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self.decoder.decode(self.encoding.decode_single_token_bytes(token))

    def flush(self) -> str:
        return self.decoder.decode(b"", final=True)
