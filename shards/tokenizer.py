"""GPT-2's tokenizer (tiktoken's r50k_base), built offline from the vendored BPE file.

tiktoken.get_encoding("gpt2") would download its BPE ranks on first use; peers and clients may
have no internet access, so the ranks ship with the package (shards/data/r50k_base.tiktoken) and
are checked against a pinned hash before use, so a corrupted or swapped file cannot silently
change token ids (which would make every peer compute on the wrong inputs).
"""

from __future__ import annotations

import base64
import functools
import hashlib
from pathlib import Path

import tiktoken

BPE_PATH = Path(__file__).parent / "data" / "r50k_base.tiktoken"
BPE_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
EOT_TOKEN = 50256
N_VOCAB = 50257

# The split regex of tiktoken's r50k_base (tiktoken_ext.openai_public.r50k_pat_str); the
# possessive quantifiers only speed matching up, the splits are those of GPT-2's original regex.
GPT2_PAT_STR = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)


class TokenizerFileError(RuntimeError):
    """The vendored BPE file is missing, corrupted or not the one this code was written for."""


def _parse_bpe_ranks(data: bytes) -> dict[bytes, int]:
    """Parse tiktoken's format: one `base64(token) rank` pair per line."""
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            token_b64, rank = line.split()
            ranks[base64.b64decode(token_b64, validate=True)] = int(rank)
        except ValueError as exc:  # binascii.Error is a ValueError too
            raise TokenizerFileError(f"{BPE_PATH.name}: bad line {lineno}: {line[:60]!r}") from exc
    return ranks


def load_bpe_ranks(path: Path = BPE_PATH, expected_sha256: str = BPE_SHA256) -> dict[bytes, int]:
    """Read the BPE ranks, refusing a file whose sha256 is not the pinned one."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TokenizerFileError(f"cannot read the GPT-2 BPE file {path}: {exc}") from exc
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected_sha256:
        raise TokenizerFileError(
            f"{path} has sha256 {actual}, expected {expected_sha256}; "
            "the vendored tokenizer file is corrupted or was replaced"
        )
    return _parse_bpe_ranks(data)


@functools.lru_cache(maxsize=1)
def get_encoding() -> tiktoken.Encoding:
    """GPT-2's encoding; built once per process (parsing 50k ranks takes ~50 ms)."""
    ranks = load_bpe_ranks()
    if len(ranks) != EOT_TOKEN:
        raise TokenizerFileError(f"{BPE_PATH.name} has {len(ranks)} ranks, expected {EOT_TOKEN}")
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PAT_STR,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": EOT_TOKEN},
        explicit_n_vocab=N_VOCAB,
    )


def encode(text: str, allow_eot: bool = False) -> list[int]:
    """Token ids of `text`. By default "<|endoftext|>" in the text is encoded as plain text, so
    user input cannot inject the special token; pass allow_eot=True to get id 50256 for it."""
    enc = get_encoding()
    if allow_eot:
        return enc.encode(text, allowed_special={"<|endoftext|>"})
    return enc.encode_ordinary(text)


def decode(ids: list[int]) -> str:
    """Text of token ids; invalid UTF-8 byte sequences (a token cut mid-character) become U+FFFD."""
    return get_encoding().decode(list(ids), errors="replace")
