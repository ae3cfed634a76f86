"""Tests for node identities, key files, signed records and the swarm table."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import msgpack
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st
from zmq.utils import z85

from nanoswarm.keys.allowed import read_allowed_keys
from nanoswarm.keys.contact import allow_ipv6, format_contact
from nanoswarm.keys.identity import (
    Identity,
    KeyFileError,
    _encode_key_file,
    curve_key_hex,
    default_key_path,
    describe_identity,
    generate_identity,
    load_identity,
    load_or_create_identity,
    peer_id_for,
    save_identity,
)  # fmt: skip
from nanoswarm.keys.records import (
    REASONS,
    Record,
    RecordRejected,
    encode_record,
    sign_departure,
    sign_record,
    unverified_record,
    verify_record,
    verify_wire,
)  # fmt: skip
from nanoswarm.keys.table import RecordTable

NOW = 1_700_000_000.0


@pytest.fixture(scope="module")
def alice() -> Identity:
    return generate_identity()


@pytest.fixture(scope="module")
def bob() -> Identity:
    return generate_identity()


def make_wire(identity: Identity, seq: int = 1, expires: float = NOW + 60, **extra: object) -> dict:
    fields: dict = {"address": "tcp://127.0.0.1:5555", "model_id": "gpt2", "layers": (0, 6)}
    fields.update(extra)
    return sign_record(identity, seq=seq, expires=expires, **fields)


def reason_of(wire: object, now: float = NOW) -> str:
    with pytest.raises(RecordRejected) as info:
        verify_record(wire, now=now)
    return info.value.reason


# ---------------------------------------------------------------------------------------------
# Identity and key file


def test_peer_id_is_stable_and_derived_from_sign_key(alice: Identity, bob: Identity) -> None:
    assert alice.peer_id == peer_id_for(alice.sign_public)
    assert Identity(alice.signing_key, alice.curve_secret, alice.curve_public).peer_id == alice.peer_id
    assert alice.peer_id != bob.peer_id
    assert alice.peer_id.startswith("ns-") and len(alice.peer_id) == 19
    assert len(alice.sign_public) == 32 and len(alice.curve_public) == 40
    with pytest.raises(ValueError):
        peer_id_for(b"short")


def test_key_file_created_0600_and_round_trips(tmp_path: Path, alice: Identity) -> None:
    path = tmp_path / "node.key"
    save_identity(alice, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = load_identity(path)
    assert loaded.peer_id == alice.peer_id
    assert loaded.curve_public == alice.curve_public
    assert loaded.curve_secret == alice.curve_secret
    assert loaded.sign(b"x") == alice.sign(b"x")  # Ed25519 is deterministic


def test_save_refuses_existing_unless_overwrite(tmp_path: Path, alice: Identity, bob: Identity) -> None:
    path = tmp_path / "node.key"
    save_identity(alice, path)
    with pytest.raises(KeyFileError, match="already exists"):
        save_identity(bob, path)
    os.chmod(path, 0o644)
    save_identity(bob, path, overwrite=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_identity(path).peer_id == bob.peer_id


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o606, 0o660])
def test_open_permissions_refused(tmp_path: Path, alice: Identity, mode: int) -> None:
    path = tmp_path / "node.key"
    save_identity(alice, path)
    os.chmod(path, mode)
    with pytest.raises(KeyFileError) as info:
        load_identity(path)
    message = str(info.value)
    assert "permissions" in message and f"{mode:04o}" in message and str(path) in message
    assert "\n" not in message


def _with(**changes: object):
    return lambda text: json.dumps(dict(json.loads(text), **changes))


CORRUPTIONS = {
    "garbage": lambda text: "\x00\xffnot a key file at all",
    "truncated": lambda text: text[: len(text) // 2],
    "not_object": lambda text: "[1, 2, 3]",
    "wrong_curve_public": _with(curve_public=zmq.curve_keypair()[0].decode()),
    "short_ed25519": _with(ed25519_private="AAAA"),
    "bad_base64": _with(ed25519_private="!!!!"),
    "missing_field": _with(curve_secret=None),
    "version": _with(version=99),
    "version_true": _with(version=True),  # (True == 1 in Python)
    # What the file states must be what its secrets give: an altered secret made a node serve as
    # a peer id other than the one its file named (a review).
    "other_ed25519": lambda text: _with(ed25519_private=json.loads(
        _encode_key_file(generate_identity()))["ed25519_private"])(text),
    "other_peer_id": _with(peer_id="ns-aaaaaaaaaaaaaaaa"),
    "other_curve_hex": _with(curve_public_hex="00" * 32),
    # Review206: a valid key file made too large by trailing blanks; keys of 40 characters that
    # are not z85 (out of its alphabet, or in it but past 32 bits a group): libzmq refuses those
    # only when a socket is made
    "too_large": lambda text: text + " " * 64 * 1024,
    "curve_not_z85": _with(curve_secret="," * 40),
    "curve_overflows_z85": _with(curve_public="#" * 40),
}

# Each refusal says what is wrong, not only that the file is corrupt.
CORRUPTION_REASONS = {
    "garbage": "not valid JSON",
    "truncated": "not valid JSON",
    "not_object": "not a JSON object",
    "wrong_curve_public": "CURVE public key does not match the secret key",
    "short_ed25519": "ed25519_private is 3 bytes, expected 32",
    "bad_base64": "ed25519_private is not valid base64",
    "missing_field": "field 'curve_secret' is missing or not a string",
    "version": "unsupported version 99 (expected 1)",
    "version_true": "unsupported version True (expected 1)",
    "other_ed25519": "is not the one its private keys give (ns-",
    "other_peer_id": "its peer_id 'ns-aaaaaaaaaaaaaaaa' is not the one its private keys give",
    "other_curve_hex": f"its curve_public_hex '{'00' * 32}' is not the one its private keys give",
    "too_large": "file is too large to be a key file",
    "curve_not_z85": "CURVE keys must be 40-character z85 bytes",
    "curve_overflows_z85": "CURVE keys must be 40-character z85 bytes",
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupt_key_file_refused(tmp_path: Path, alice: Identity, corruption: str) -> None:
    path = tmp_path / "node.key"
    save_identity(alice, path)
    path.write_text(CORRUPTIONS[corruption](path.read_text()), encoding="latin-1")
    with pytest.raises(KeyFileError) as info:
        load_identity(path)
    message = str(info.value)
    assert message.startswith(f"corrupt key file {path}:") and "\n" not in message
    assert CORRUPTION_REASONS[corruption] in message


@pytest.mark.skipif(os.name != "posix", reason="character devices at /dev/null and /dev/zero are POSIX's")
@pytest.mark.parametrize("device", ["/dev/null", "/dev/zero"])
def test_a_character_device_as_key_file_is_refused(device: str) -> None:
    """Review206: a device is not a key file (/dev/zero would be read without end)."""
    with pytest.raises(KeyFileError, match=f"^key file {device} is not a regular file$"):
        load_identity(device)


def _unblock_fifo(path: Path) -> None:
    """Give a reader stuck opening a FIFO its writer, so a failing test does not hang the run."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
@pytest.mark.parametrize("load", [load_identity, load_or_create_identity])
def test_fifo_key_file_is_refused_without_hanging(tmp_path: Path, load) -> None:
    path = tmp_path / "node.key"
    os.mkfifo(path, 0o600)
    outcome: list[BaseException | Identity] = []

    def run() -> None:
        try:
            outcome.append(load(path))
        except BaseException as e:  # noqa: BLE001 - handed to the test thread to assert on
            outcome.append(e)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(5.0)
    if worker.is_alive():
        _unblock_fifo(path)
        worker.join(5.0)
        pytest.fail(f"{load.__name__} blocked opening a FIFO")
    (error,) = outcome
    assert isinstance(error, KeyFileError)
    assert str(error) == f"key file {path} is not a regular file"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_keys_show_on_a_fifo_fails_fast(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    os.mkfifo(path, 0o600)
    try:
        out = subprocess.run([sys.executable, "-m", "nanoswarm", "keys", "show", str(path)],
                             capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        _unblock_fifo(path)
        pytest.fail("`nanoswarm keys show` blocked opening a FIFO")
    assert out.returncode != 0 and out.stdout == ""
    assert f"key file {path} is not a regular file" in out.stderr
    assert "Traceback" not in out.stderr


def test_missing_key_file_is_clear(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="does not exist"):
        load_identity(tmp_path / "nope.key")


def test_default_path_honours_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NANOSWARM_KEY_FILE", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    assert default_key_path() == tmp_path / "cfg" / "nanoswarm" / "node.key"
    monkeypatch.setenv("XDG_CONFIG_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_key_path() == tmp_path / "home" / ".config" / "nanoswarm" / "node.key"
    monkeypatch.setenv("NANOSWARM_KEY_FILE", str(tmp_path / "explicit.key"))
    assert default_key_path() == tmp_path / "explicit.key"


def test_load_or_create_first_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("NANOSWARM_KEY_FILE", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    with caplog.at_level("INFO", logger="nanoswarm.keys.identity"):
        first = load_or_create_identity()
    path = tmp_path / "cfg" / "nanoswarm" / "node.key"
    assert path.is_file() and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert first.peer_id in caplog.text and not [r for r in caplog.records if r.levelname == "WARNING"]
    assert load_or_create_identity().peer_id == first.peer_id
    assert load_or_create_identity(path).curve_public == first.curve_public
    # A --key-file given that names no file: a new identity, said as a warning (review191: a typo
    # made a new peer of an old one, said at INFO)
    caplog.clear()
    with caplog.at_level("INFO", logger="nanoswarm.keys.identity"):
        typo = load_or_create_identity(path.with_suffix(".kye"))
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warned == [f"no key file at {path.with_suffix('.kye')}: created a new node identity there (peer id "
                      f"{typo.peer_id}); if you meant an existing one, check the name"]


def test_describe_identity_has_public_parts_only(alice: Identity) -> None:
    info = describe_identity(alice)
    assert info == {
        "peer_id": alice.peer_id,
        "ed25519_public": alice.sign_public.hex(),
        "curve_public": alice.curve_public.decode(),
        "curve_public_hex": zmq.utils.z85.decode(alice.curve_public).hex(),
    }
    assert alice.curve_secret.decode() not in json.dumps(info) + repr(alice) + str(alice)


def test_read_allowed_keys(tmp_path: Path, alice: Identity, bob: Identity) -> None:
    path = tmp_path / "allowed"
    path.write_text(
        f"# trusted nodes\n\n{alice.curve_public.decode()}\n  {bob.curve_public.decode()}  bob's box\n"
    )
    assert read_allowed_keys(path) == {alice.curve_public, bob.curve_public}


def test_read_allowed_keys_takes_hex_keys_and_contacts(tmp_path: Path, alice: Identity, bob: Identity) -> None:
    # What nodes print is a contact with the key in hex; either part pasted whole must work.
    contact = format_contact("tcp://127.0.0.1:5555", bob.curve_public)
    path = tmp_path / "allowed"
    path.write_text(f"{z85.decode(alice.curve_public).hex().upper()} alice\n{contact}  bob's box\n")
    assert read_allowed_keys(path) == {alice.curve_public, bob.curve_public}
    # A contact with its key in z85 that is 64 characters long as a whole went down the hex path
    # and was refused (review83)
    z85_contact = f"tcp://node-abc.lan:5555#{alice.curve_public.decode()}"
    assert len(z85_contact) == 64
    path.write_text(z85_contact + "\n")
    assert read_allowed_keys(path) == {alice.curve_public}


@pytest.mark.parametrize("bad", [
    "short", "x" * 41, " " * 2 + "%" * 40, "é" * 40, "g" * 64, "é" * 64, "ab" * 33,
    "tcp://127.0.0.1:5555", "tcp://127.0.0.1:5555#" + "g" * 64, "tcp://127.0.0.1:5555#",
])
def test_read_allowed_keys_bad_line(tmp_path: Path, alice: Identity, bad: str) -> None:
    path = tmp_path / "allowed"
    path.write_text(f"# header\n{alice.curve_public.decode()}\n{bad}\n", encoding="utf-8")
    with pytest.raises(KeyFileError, match=r":3: not a CURVE public key") as info:
        read_allowed_keys(path)
    message = str(info.value)
    assert message.startswith(f"{path}:3:") and "64 hex digits" in message and "\n" not in message


# ---------------------------------------------------------------------------------------------
# Records


def test_signed_record_verifies(alice: Identity) -> None:
    wire = make_wire(alice, seq=7, heads=(0, 6), throughput=12.5, load=0.25, insecure=True)
    assert msgpack.unpackb(msgpack.packb(wire), raw=False) == wire  # wire form is msgpack-clean
    record = verify_record(wire, now=NOW)
    assert record.peer_id == alice.peer_id and record.sign_key == alice.sign_public
    assert record.curve_key == alice.curve_public
    assert (record.layers, record.heads, record.seq) == ((0, 6), (0, 6), 7)
    assert (record.throughput, record.load, record.insecure, record.departing) == (12.5, 0.25, True, False)
    assert verify_wire(wire, now=NOW).wire == wire


def test_sign_record_rejects_bad_local_fields(alice: Identity) -> None:
    with pytest.raises(ValueError, match="malformed"):
        make_wire(alice, layers=(6, 2))
    with pytest.raises(ValueError, match="malformed"):
        make_wire(alice, address="not an address")


@pytest.mark.parametrize("part", ["body", "sig"])
def test_flipped_byte_is_bad_signature(alice: Identity, part: str) -> None:
    wire = make_wire(alice)
    blob = bytearray(wire[part])
    # Flip the last byte of the expires float so the body still parses canonically.
    index = wire["body"].index(msgpack.packb(NOW + 60)) + 8 if part == "body" else 5
    blob[index] ^= 0x01
    forged = dict(wire, **{part: bytes(blob)})
    assert reason_of(forged) == "bad_signature"


def _forge(signer: Identity, record: Record) -> dict:
    body = encode_record(record)
    return {"body": body, "sig": signer.sign(body)}


def test_peer_id_mismatch_and_key_swap(alice: Identity, bob: Identity) -> None:
    genuine = verify_record(make_wire(alice), now=NOW)
    # Validly signed by A, with A's key, but claiming B's peer id.
    assert reason_of(_forge(alice, replace(genuine, peer_id=bob.peer_id))) == "peer_id_mismatch"
    # Claims B entirely (id and key) but signed by A: the signature cannot check out.
    impostor = replace(genuine, peer_id=bob.peer_id, sign_key=bob.sign_public)
    assert reason_of(_forge(alice, impostor)) == "bad_signature"


def test_expired_and_too_far_future(alice: Identity) -> None:
    assert reason_of(make_wire(alice, expires=NOW)) == "expired"
    assert reason_of(make_wire(alice, expires=NOW - 1)) == "expired"
    assert reason_of(make_wire(alice, expires=NOW + 301)) == "too_far_future"
    assert verify_record(make_wire(alice, expires=NOW + 300), now=NOW).expires == NOW + 300
    with pytest.raises(RecordRejected) as info:
        verify_record(make_wire(alice, expires=NOW + 100), now=NOW, max_ttl=50)
    assert info.value.reason == "too_far_future"


def test_departure_window(alice: Identity) -> None:
    last = verify_record(make_wire(alice, seq=3), now=NOW)
    departure = sign_departure(alice, last, now=NOW)
    record = verify_record(departure, now=NOW + 10)
    assert record.departing and record.seq == 4
    assert reason_of(departure, now=NOW + 301) == "expired"


MALFORMED_WIRES = [
    None, 42, b"bytes", [], {}, {"body": b"x"}, {"body": b"x", "sig": b"y" * 64, "extra": 1},
    {"body": "str", "sig": b"y" * 64}, {"body": b"\xc1", "sig": b"y" * 64},
    {"body": b"y" * 100_000, "sig": b"y" * 64}, {b"body": b"x", b"sig": b"y" * 64},
]  # fmt: skip


@pytest.mark.parametrize("junk", MALFORMED_WIRES)
def test_malformed_wire(junk: object) -> None:
    assert reason_of(junk) == "malformed"


BAD_FIELDS = {
    "peer_id": [1, "x" * 10_000, ""],
    "sign_key": [b"k" * 31, "k" * 32, None],
    "curve_key": [b"%" * 40, b"a" * 39, "a" * 40],
    "address": ["", "a" * 1000, "tcp://a b", 5, "no-scheme"],
    "model_id": ["", "m" * 10_000, b"gpt2", "a\nb"],
    "layers": [[0], [1, 1], [2, 1], [-1, 3], [0, True], (0, "6"), None, [0, 2**64 - 1]],
    "heads": [[3, 3], "0-6", [0, 1, 2]],
    "throughput": [1, -1.0, float("nan"), float("inf"), "fast", True],
    "load": [-0.5, None],
    "seq": [-1, 1.0, True, 2**64 - 1, "1"],
    "expires": [None, 1, float("inf")],
    "insecure": [0, None, "yes"],
    "departing": [1, None],
    "v": [2, True, None],
}


def _body_map(wire: dict) -> dict:
    return msgpack.unpackb(wire["body"], raw=False)


@pytest.mark.parametrize("name,value", [(k, v) for k, vs in BAD_FIELDS.items() for v in vs])
def test_malformed_fields_signed_by_real_key(alice: Identity, name: str, value: object) -> None:
    # Signed correctly, so only strict field validation can catch it.
    fields = _body_map(make_wire(alice))
    fields[name] = value
    body = msgpack.packb(fields, use_bin_type=True)
    assert reason_of({"body": body, "sig": alice.sign(body)}) == "malformed"


def test_missing_extra_and_noncanonical_bodies(alice: Identity) -> None:
    good = _body_map(make_wire(alice))
    missing = {k: v for k, v in good.items() if k != "load"}
    extra = dict(good, bonus=1)
    reordered = dict(reversed(list(good.items())))
    for fields in (missing, extra, reordered, [good], "text"):
        body = msgpack.packb(fields, use_bin_type=True)
        assert reason_of({"body": body, "sig": alice.sign(body)}) == "malformed"
    float32 = msgpack.packb(good, use_bin_type=True, use_single_float=True)
    assert reason_of({"body": float32, "sig": alice.sign(float32)}) == "malformed"
    trailing = make_wire(alice)["body"] + b"\x00"
    assert reason_of({"body": trailing, "sig": alice.sign(trailing)}) == "malformed"


_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=True),
    st.text(max_size=50),
    st.binary(max_size=80),
)
_junk = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5),
        st.dictionaries(st.one_of(st.text(max_size=10), st.integers(-(2**63), 2**63)), inner),
    ),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(
    junk=_junk,
    body=st.one_of(st.binary(max_size=300), _junk.map(lambda j: msgpack.packb(j, use_bin_type=True))),
    sig=st.one_of(st.binary(min_size=64, max_size=64), _junk),
)
def test_fuzz_only_record_rejected(junk: object, body: bytes, sig: object) -> None:
    for candidate in (junk, {"body": body, "sig": sig}, {"body": junk, "sig": sig}):
        with pytest.raises(RecordRejected) as info:
            verify_record(candidate, now=NOW)
        assert info.value.reason in REASONS
        assert RecordTable(clock=lambda: NOW).offer(candidate) == info.value.reason
        # What a client reads of a peer's table unverified (client/introduce.py): never raises,
        # and a record exactly where the signature check is what rejects it.
        assert (unverified_record(candidate) is None) == (info.value.reason == "malformed")


FIELD_NAMES = sorted(BAD_FIELDS)
_SIGNER = generate_identity()
_GOOD_FIELDS = _body_map(make_wire(_SIGNER))


@settings(max_examples=200, deadline=None)
@given(name=st.sampled_from(FIELD_NAMES), value=_junk, flip=st.integers(min_value=-1, max_value=400))
def test_fuzz_validly_signed_junk_fields(name: str, value: object, flip: int) -> None:
    # Correctly signed bodies reach the field validators, which random bytes rarely do.
    fields = dict(_GOOD_FIELDS, **{name: value})
    body = bytearray(msgpack.packb(fields, use_bin_type=True))
    if 0 <= flip < len(body):
        body[flip] ^= 0x5A
    wire = {"body": bytes(body), "sig": _SIGNER.sign(bytes(body))}
    try:
        record = verify_record(wire, now=NOW)
    except RecordRejected as e:
        assert e.reason in REASONS
        assert (unverified_record(wire) is None) == (e.reason == "malformed")
    else:
        assert record.peer_id == _SIGNER.peer_id and unverified_record(wire) == record
    assert RecordTable(clock=Clock()).offer(wire) in (*REASONS, "accepted", "departed")


# ---------------------------------------------------------------------------------------------
# Table


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def snapshot(table: RecordTable) -> tuple:
    return (table.records(), table.wires(), len(table))


def test_table_accepts_replaces_and_rejects_stale(alice: Identity, bob: Identity) -> None:
    table = RecordTable(clock=Clock())
    assert table.offer(make_wire(alice, seq=5)) == "accepted"
    assert table.offer(make_wire(bob, seq=1, model_id="other")) == "accepted"
    before = snapshot(table)
    assert table.offer(make_wire(alice, seq=4)) == "stale_seq"
    assert table.offer(make_wire(alice, seq=5)) == "stale_seq"  # exact replay
    assert snapshot(table) == before
    newer = make_wire(alice, seq=6, load=0.5)
    assert table.offer(newer) == "accepted"
    assert table.get(alice.peer_id).seq == 6 and table.get(alice.peer_id).load == 0.5
    assert len(table) == 2 and alice.peer_id in table
    assert [r.peer_id for r in table.records("gpt2")] == [alice.peer_id]
    assert newer in table.wires()
    assert (table.accepted, table.rejected["stale_seq"]) == (3, 2)


def test_a_peer_that_switches_model_under_its_identity_is_logged(alice: Identity,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    table = RecordTable(clock=Clock())
    refreshed = []
    table.on_refresh = lambda record, old: refreshed.append(record)
    table.offer(make_wire(alice, seq=1))
    with caplog.at_level("INFO", logger="nanoswarm.keys.table"):
        assert table.offer(make_wire(alice, seq=2, load=0.5)) == "accepted"  # a plain refresh: quiet
        assert "now serves model" not in caplog.text
        assert table.offer(make_wire(alice, seq=3, model_id="other")) == "accepted"
    assert f"peer {alice.peer_id} at tcp://127.0.0.1:5555 now serves model other (was gpt2)" in caplog.text
    assert [r.seq for r in refreshed] == [2, 3]  # still a refresh for gossip (GossipLinks.renewed)


def test_table_wire_is_exact_and_independent(alice: Identity) -> None:
    table = RecordTable(clock=Clock())
    wire = make_wire(alice)
    table.offer(wire)
    wire["body"] = b"mutated"
    [sent] = table.wires()
    assert verify_record(sent, now=NOW).peer_id == alice.peer_id
    assert RecordTable(clock=Clock()).offer(msgpack.unpackb(msgpack.packb(sent), raw=False)) == "accepted"


def test_departure_removes_and_blocks_replay(alice: Identity, bob: Identity) -> None:
    clock = Clock()
    table = RecordTable(clock=clock)
    old = make_wire(alice, seq=10)
    table.offer(old)
    table.offer(make_wire(bob, seq=1))
    departure = sign_departure(alice, verify_record(old, now=NOW), now=NOW + 1)
    clock.now = NOW + 2
    assert table.offer(departure) == "departed"
    assert table.get(alice.peer_id) is None and len(table) == 1
    assert departure in table.wires()  # departures gossip onward
    before = snapshot(table)
    assert table.offer(old) == "stale_seq"
    assert table.offer(departure) == "stale_seq"
    assert snapshot(table) == before
    # Other tables learn the departure from gossip too.
    other = RecordTable(clock=clock)
    other.offer(old)
    for wire in table.wires():
        other.offer(wire)
    assert other.get(alice.peer_id) is None
    # The peer may come back with a newer seq.
    assert table.offer(make_wire(alice, seq=12)) == "accepted"
    assert departure not in table.wires()


def test_expiry_and_remove(alice: Identity, bob: Identity) -> None:
    clock = Clock()
    table = RecordTable(clock=clock)
    table.offer(make_wire(alice, seq=1, expires=NOW + 10))
    bob_wire = make_wire(bob, seq=1, expires=NOW + 100)
    table.offer(bob_wire)
    clock.now = NOW + 20
    assert [r.peer_id for r in table.records()] == [bob.peer_id]
    assert table.get(alice.peer_id) is None and len(table.wires()) == 1
    assert table.expire() == 1
    assert table.remove(bob.peer_id) and not table.remove(bob.peer_id)
    assert table.offer(bob_wire) == "stale_seq"  # gossip echo does not re-add it
    assert table.offer(make_wire(bob, seq=2, expires=NOW + 100)) == "accepted"


def test_counters_count_each_reason(alice: Identity, bob: Identity) -> None:
    table = RecordTable(clock=Clock())
    genuine = verify_record(make_wire(alice), now=NOW)
    flipped = dict(make_wire(alice), sig=bytes(64))
    offers = {
        "malformed": [None, {"body": b"", "sig": b""}],
        "bad_signature": [flipped],
        "peer_id_mismatch": [_forge(alice, replace(genuine, peer_id=bob.peer_id))],
        "expired": [make_wire(alice, expires=NOW - 5)],
        "too_far_future": [make_wire(alice, expires=NOW + 1000)],
    }
    for reason, wires in offers.items():
        for wire in wires:
            assert table.offer(wire) == reason
    assert len(table) == 0 and table.accepted == 0
    assert table.offer(make_wire(alice, seq=3)) == "accepted"
    assert table.offer(make_wire(alice, seq=3)) == "stale_seq"
    assert dict(table.rejected) == {
        "malformed": 2,
        "bad_signature": 1,
        "peer_id_mismatch": 1,
        "expired": 1,
        "too_far_future": 1,
        "stale_seq": 1,
    }
    assert table.accepted == 1


# ---------------------------------------------------------------------------------------------
# Addresses and bounds: what anyone can sign with keys of their own


@pytest.mark.parametrize("address", ["bogus://x", "tcp://127.0.0.1:1#x", "ipc:///tmp/node", "inproc://node",
                                     "tcp://127.0.0.1:*", "tcp://127.0.0.1:0", "tcp://127.0.0.1:70000",
                                     "tcp://:5555", "tcp://127.0.0.1",
                                     # hosts ZeroMQ refuses (EINVAL): every node warned each round
                                     "tcp://_:5", "tcp://_a:5", "tcp://-a:5", "tcp://.a:5"])
def test_a_record_names_a_tcp_endpoint_peers_can_connect_to(alice: Identity, address: str) -> None:
    """A record whose address ZeroMQ cannot connect to would break every node and client that
    picks it: refused when signing, and when a body signed anyway arrives."""
    with pytest.raises(ValueError, match="malformed"):
        make_wire(alice, address=address)
    genuine = verify_record(make_wire(alice), now=NOW)
    assert reason_of(_forge(alice, replace(genuine, address=address))) == "malformed"


@pytest.mark.parametrize("address", ["tcp://127.0.0.1:5555", "tcp://[::1]:5555", "tcp://node-1.example.org:80",
                                     "tcp://node_1:5555", "tcp://a_:5", "tcp://a..b:5", "tcp://1:5"])
def test_tcp_endpoints_are_accepted(alice: Identity, address: str) -> None:
    assert verify_record(make_wire(alice, address=address), now=NOW).address == address


def test_the_table_is_bounded_and_keeps_serving_the_peers_it_holds() -> None:
    clock = Clock()
    table = RecordTable(clock=clock, max_peers=4)
    peers = [generate_identity() for _ in range(7)]

    def departure(p: Identity, seq: int) -> dict:
        return sign_departure(p, verify_record(make_wire(p, seq=seq - 1), now=NOW), seq=seq, now=clock.now)

    for p in peers[:4]:
        assert table.offer(make_wire(p, seq=1, expires=NOW + 30)) == "accepted"
    assert table.offer(make_wire(peers[4], seq=1)) == "table_full"  # a new peer: no room
    assert table.offer(make_wire(peers[0], seq=2, expires=NOW + 30)) == "accepted"  # a held peer still updates
    assert len(table) == 4 and table.rejected["table_full"] == 1
    # Every held peer leaves: four tombstones. The departure of a peer we never held would need
    # a fifth: refused.
    for p in peers[:4]:
        assert table.offer(departure(p, 5)) == "departed"
    assert len(table) == 0 and len(table._tombstones) == 4
    assert table.offer(departure(peers[6], 2)) == "table_full"
    # A held peer's departure is refused too, and pushes out no tombstone (a flood of throw-away
    # departures must not bring back a peer that left); its record stays until it expires.
    assert table.offer(make_wire(peers[4], seq=1, expires=NOW + 60)) == "accepted"
    stones = dict(table._tombstones)
    assert table.offer(departure(peers[4], 2)) == "table_full"
    assert table._tombstones == stones and peers[4].peer_id in table
    # Expired entries make room in a full table.
    for p in peers[:3]:
        assert table.offer(make_wire(p, seq=9, expires=NOW + 10)) == "accepted"
    assert table.offer(make_wire(peers[5], seq=1, expires=NOW + 60)) == "table_full"
    clock.now = NOW + 11
    assert table.offer(make_wire(peers[5], seq=1, expires=NOW + 60)) == "accepted"
    assert sorted(r.peer_id for r in table.records()) == sorted([peers[4].peer_id, peers[5].peer_id])


def test_sockets_take_ipv6_endpoints_when_the_contact_has_one():
    """`--listen tcp://[::1]:PORT` failed with 'No such device': ZeroMQ sockets are IPv4-only
    unless IPV6 is set. Binding only: no traffic leaves for any address."""
    ctx = zmq.Context.instance()
    v4, v6 = ctx.socket(zmq.ROUTER), ctx.socket(zmq.ROUTER)
    try:
        allow_ipv6(v4, "tcp://127.0.0.1:0")
        allow_ipv6(v6, "tcp://[::1]:0")
        assert v4.getsockopt(zmq.IPV6) == 0 and v6.getsockopt(zmq.IPV6) == 1
        v6.bind("tcp://[::1]:0")
        assert v6.getsockopt_string(zmq.LAST_ENDPOINT).startswith("tcp://[::1]:")
    finally:
        v4.close(linger=0)
        v6.close(linger=0)


def test_a_wildcard_bind_takes_ipv6_too_and_a_host_name_stays_ipv4():
    """`*` bound IPv4 only, so a node listening on it could not be reached at the IPv6 address it
    advertised (review94); now it takes both. A host name stays IPv4: with IPv6 on, ZeroMQ takes
    only a name's IPv6 addresses where it has any, and `localhost` is ::1 on some systems. No
    socket is bound here: nothing listens on any interface."""
    ctx = zmq.Context.instance()
    endpoints = ["tcp://*:5555", "tcp://[::]:5555", "tcp://0.0.0.0:5555", "tcp://localhost:5555", "tcp://node-a:5"]
    sockets = [ctx.socket(zmq.ROUTER) for _ in endpoints]
    try:
        for s, e in zip(sockets, endpoints):
            allow_ipv6(s, e)
        assert [s.getsockopt(zmq.IPV6) for s in sockets] == [1, 1, 0, 0, 0]
    finally:
        for s in sockets:
            s.close(linger=0)
    from nanoswarm.client.peer_errors import unreachable_why  # what a client is told of a name

    assert "no IPv4 address for the host name 'node-a' (a name is reached at its IPv4 address: for IPv6 " \
        "give the address in brackets" in unreachable_why("tcp://node-a:5")


def test_clock_offsets_from_replies_and_their_median(monkeypatch):
    """A reply's `now` is taken as of the middle of its round trip; anything but a finite float
    (a node from before `now`, a hostile value) is no time. Of two middle offsets the one nearer
    zero counts: one skewed peer of two must not put half its skew on this node's clock. Old
    offsets are not used, and the contacts kept are bounded."""
    import time

    import nanoswarm.keys.clock as clock
    from nanoswarm.keys.clock import ClockOffsets, reply_offset, skew_words
    from nanoswarm.node.clock_watch import node_clock_warning

    assert reply_offset(1070.0, sent=5.0, received=7.0, our_now=1001.0) == 70.0  # ours then: 1000
    for bad in (None, 1070, True, float("nan"), float("inf"), "1070"):
        assert reply_offset(bad, 5.0, 7.0, 1001.0) is None
    assert (skew_words(70.4), skew_words(-400)) == ("70 s behind", "400 s ahead of")
    offsets = ClockOffsets()
    assert offsets.median() is None
    offsets.add("a", -70.0)
    offsets.add("b", 0.5)
    assert offsets.median() == (0.5, 2)
    offsets.add("c", -69.0)
    assert offsets.median() == (-69.0, 3)
    offsets.add("a", 1.0)  # measured again: the latest counts
    assert offsets.median() == (0.5, 3)
    monkeypatch.setattr(clock, "MAX_SAMPLES", 2)
    offsets.add("d", 2.0)
    assert offsets.median() == (1.0, 2)  # b and c, the oldest, dropped
    later = time.monotonic() + clock.SAMPLE_SECONDS + 1
    assert offsets.median(now=later) is None
    assert "its peers' (the median of 3 measured)" in node_clock_warning(70.0, 3, 60.0)
    assert "one of the two machines' clocks is off" in node_clock_warning(-70.0, 1, 60.0)


def test_link_local_addresses_are_refused_with_the_reason():
    """fe80::/10 is reached only with a zone naming the connecting machine's interface, which no
    record or contact can know: refused as such, not as "not a TCP endpoint" (with a zone) or
    not at all (without one: every peer then found the node refused, review94)."""
    from nanoswarm.keys.records import check_endpoint

    for endpoint in ("tcp://[fe80::1]:5555", "tcp://[FE80::a:b]:5555", "tcp://[fe80::1%eth0]:5555"):
        with pytest.raises(ValueError, match="a link-local IPv6 address"):
            check_endpoint(endpoint)
    for endpoint in ("tcp://[fd77::1]:5555", "tcp://[::1]:5555", "tcp://[2001:db8::1]:5555", "tcp://10.0.0.1:5"):
        assert check_endpoint(endpoint) == endpoint
    with pytest.raises(ValueError, match="is not a TCP endpoint"):
        check_endpoint("tcp://fe80::1%eth0:5555")


def test_a_process_starting_while_another_writes_a_new_key_file_never_reads_it_half_written(tmp_path, monkeypatch):
    """Two nodes starting together on one new key file: while the first is still writing, the
    second must not find the file there half-written ("corrupt key file": the review's repro, 8
    of 240 processes). It is put in place whole, so the second makes its own and the first, whose
    write then loses, uses that one."""
    path = tmp_path / "node.key"
    writing, go_on = threading.Event(), threading.Event()
    real_fdopen = os.fdopen

    def slow_fdopen(fd, *args, **kwargs):  # the file is created, nothing is written to it yet
        if threading.current_thread().name == "first":
            writing.set()
            go_on.wait(10)
        return real_fdopen(fd, *args, **kwargs)

    monkeypatch.setattr(os, "fdopen", slow_fdopen)
    got = {}

    def start(name):
        try:
            got[name] = load_or_create_identity(path).peer_id
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            got[name] = repr(e)

    first = threading.Thread(target=start, args=("first",), name="first")
    first.start()
    assert writing.wait(10)
    start("second")
    go_on.set()
    first.join(10)
    assert got["first"] == got["second"] == load_identity(path).peer_id
    assert [p.name for p in tmp_path.iterdir()] == ["node.key"]  # no temporary file left


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
@pytest.mark.timeout(30)  # a regression would wait on the FIFO forever
def test_an_allowed_keys_file_that_is_not_a_regular_file_is_refused(tmp_path):
    fifo = tmp_path / "allowed"
    os.mkfifo(fifo)  # no writer: a plain open() would wait forever
    with pytest.raises(KeyFileError, match="not a regular file"):
        read_allowed_keys(fifo)
    with pytest.raises(KeyFileError, match="cannot read allowed-keys file .*: not a regular file"):
        read_allowed_keys(tmp_path)  # a directory opens on Linux: refused on its stat, no descriptor kept


def test_a_key_file_a_running_node_holds_is_not_replaced(tmp_path: Path, alice: Identity, bob: Identity) -> None:
    """`keys generate --force` swapped the file under a running node: the node's lock stayed on
    the old file (so a second node could start on the path) and its secret was gone."""
    from conftest import invoke_cli

    from nanoswarm.node.daemon import hold_key_file

    path = tmp_path / "node.key"
    save_identity(alice, path)
    fd = hold_key_file(path, alice)  # what a running node holds
    try:
        with pytest.raises(KeyFileError, match="is in use by a running node: stop it before replacing"):
            save_identity(bob, path, overwrite=True)
        out = invoke_cli("keys", "generate", "--force", "--out", str(path))
        assert out.returncode == 1 and "is in use by a running node" in out.stderr
        assert load_identity(path).peer_id == alice.peer_id
    finally:
        os.close(fd)
    save_identity(bob, path, overwrite=True)  # the node stopped: --force may replace it
    assert load_identity(path).peer_id == bob.peer_id


def test_a_key_file_that_cannot_be_created_says_why_in_one_line(tmp_path: Path, monkeypatch) -> None:
    """A file where the key's directory should be, or a directory that cannot take a file,
    gave Python's `[Errno 20] Not a directory: ...` or named a temporary file (a review)."""
    from conftest import invoke_cli

    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "afile"))
    monkeypatch.delenv("NANOSWARM_KEY_FILE", raising=False)
    with pytest.raises(KeyFileError, match="cannot create the directory of key file .*afile/nanoswarm/node.key"):
        load_or_create_identity()
    out = invoke_cli("keys", "generate", "--out", str(tmp_path / "afile" / "new.key"))
    assert out.returncode == 1
    assert out.stderr.strip().endswith("new.key: a file is in the way") and "Errno" not in out.stderr
    missing = tmp_path / "no" / "such" / "new.key"  # --out makes no directories (a typo would)
    out = invoke_cli("keys", "generate", "--out", str(missing))
    assert out.returncode == 1 and out.stderr.strip().endswith(f"there is no directory {missing.parent}")
    assert not (tmp_path / "no").exists()
    with pytest.raises(KeyFileError, match=r"^cannot write key file /proc/self/x\.key: ") as info:
        save_identity(generate_identity(), "/proc/self/x.key")  # no file can be made there, even by root
    assert ".tmp" not in str(info.value)


def test_a_new_key_file_goes_only_where_it_was_meant(tmp_path: Path, monkeypatch, tiny_model_dir) -> None:
    """`node --key-file` made every missing directory (0755 but the last) and a new identity in
    it, where `keys generate --out` refuses (a typo in a directory: a node serving as a peer id
    no one knew); `--out dir/` wrote the file `dir`; a link to nothing was "already exists" (a
    review). The default path's directory is still made."""
    from conftest import invoke_cli, run_cli

    missing = tmp_path / "no" / "such" / "n.key"
    with pytest.raises(KeyFileError, match=f"^cannot write key file {missing}: there is no directory"):
        load_or_create_identity(missing)
    out = run_cli("node", str(tiny_model_dir), "--layers", "0:4", "--listen", "tcp://127.0.0.1:*",
                  "--key-file", str(missing), timeout=60)  # (a subprocess: were it to serve, it is stopped)
    assert out.returncode == 1 and out.stderr.strip().endswith(f"there is no directory {missing.parent}")
    assert not (tmp_path / "no").exists()

    for args in (["keys", "generate", "--out", f"{tmp_path}/newdir/"], ["node", str(tmp_path), "--key-file",
                                                                       f"{tmp_path}/newdir/"]):
        out = invoke_cli(*args)
        assert out.returncode == 2 and "names a directory, not a file" in out.stderr, out.stderr
    assert not (tmp_path / "newdir").exists()

    link = tmp_path / "dangling.key"
    link.symlink_to(tmp_path / "gone.key")
    for make in (lambda: load_or_create_identity(link), lambda: save_identity(generate_identity(), link)):
        with pytest.raises(KeyFileError, match="is a symbolic link to .*gone.key, which does not exist"):
            make()
    out = invoke_cli("keys", "generate", "--out", str(link))
    assert out.returncode == 1 and "which does not exist" in out.stderr and "--force" not in out.stderr
    assert not (tmp_path / "gone.key").exists()
    assert invoke_cli("keys", "generate", "--out", str(link), "--force").returncode == 0  # the link replaced
    assert not link.is_symlink() and load_identity(link) and not (tmp_path / "gone.key").exists()
    from nanoswarm.cli.params import NEW_FILE

    assert NEW_FILE.convert("~/n.key", None, None) == Path.home() / "n.key"  # `--key-file=~/n.key`: unexpanded
    for args in (["keys", "generate", "--out", ""], ["node", str(tmp_path), "--key-file", ""]):
        out = invoke_cli(*args)
        assert out.returncode == 2 and "an empty path names no file" in out.stderr, out.stderr

    # $NANOSWARM_KEY_FILE is a path a user gave as well (a typo made a directory and a new
    # identity: review83); only the XDG default's directory is ours to make
    monkeypatch.setenv("NANOSWARM_KEY_FILE", str(tmp_path / "made" / "node.key"))
    with pytest.raises(KeyFileError, match="there is no directory"):
        load_or_create_identity()
    out = invoke_cli("keys", "generate")
    assert out.returncode == 1 and "there is no directory" in out.stderr and not (tmp_path / "made").exists()
    (tmp_path / "made").mkdir()
    assert load_or_create_identity().peer_id == load_identity(tmp_path / "made" / "node.key").peer_id
    # ending in '/': a directory meant, where a file had been written (Path() drops the slash)
    monkeypatch.setenv("NANOSWARM_KEY_FILE", f"{tmp_path}/envdir/")
    with pytest.raises(KeyFileError, match="names a directory, not a key file"):
        load_or_create_identity()
    assert "names a directory, not a key file" in invoke_cli("keys", "generate").stderr
    assert not (tmp_path / "envdir").exists()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_force_replaces_a_key_file_or_a_link_and_nothing_else(tmp_path: Path, monkeypatch) -> None:
    """`keys generate --out /dev/null --force` made /dev/null a 0600 file holding a secret (as
    root, review83); a FIFO and a directory were replaced or misnamed the same way."""
    from conftest import invoke_cli

    fifo, directory = tmp_path / "fifo", tmp_path / "dir"
    os.mkfifo(fifo)
    directory.mkdir()
    for force in ((), ("--force",)):
        out = invoke_cli("keys", "generate", "--out", str(fifo), *force)
        assert out.returncode == 1 and out.stderr.strip() == (
            f"error: {fifo} is not a regular file (a device, FIFO or socket): give a key file's path"), out.stderr
        assert "is a directory" in invoke_cli("keys", "generate", "--out", str(directory), *force).stderr  # (click's)
    for path, kind in ((fifo, "is not a regular file"), (directory, "is a directory")):
        with pytest.raises(KeyFileError, match=kind):
            save_identity(generate_identity(), path, overwrite=True)
    assert stat.S_ISFIFO(fifo.lstat().st_mode) and directory.is_dir()
    monkeypatch.setenv("NANOSWARM_KEY_FILE", str(directory))  # "already exists ... (--force replaces it)" was said
    assert "is a directory: give a key file's path" in invoke_cli("keys", "generate").stderr
    monkeypatch.chdir(tmp_path)
    out = invoke_cli("keys", "generate", "--out", "-")  # a file named "-" was written
    assert out.returncode == 2 and "'-' is not stdout here" in out.stderr and not (tmp_path / "-").exists()


def test_a_key_file_nested_too_deep_for_the_json_parser_is_named_corrupt(tmp_path: Path) -> None:
    """60,000 '[' (under the size limit) raised RecursionError through load_identity (review83)."""
    path = tmp_path / "deep.key"
    path.write_text("[" * 60_000)
    path.chmod(0o600)
    with pytest.raises(KeyFileError, match=f"^corrupt key file {path}: not a key file"):
        load_identity(path)
    path.chmod(0o644)  # (nothing secret in it: not told to chmod, review191)
    with pytest.raises(KeyFileError, match=f"^corrupt key file {path}: not a key file \\(no private key in it\\)$"):
        load_identity(path)


def test_a_readable_file_that_is_no_key_file_is_not_told_to_be_protected(tmp_path: Path, alice: Identity) -> None:
    """Review191: an --allow-keys list given as --key-file was told "UNPROTECTED PRIVATE KEY FILE
    ... (run: chmod 600)", and after that, that it was corrupt. A key file others can read still
    is refused so."""
    listing = tmp_path / "keys.txt"
    listing.write_text(curve_key_hex(alice.curve_public) + "\n")
    listing.chmod(0o644)
    with pytest.raises(KeyFileError, match=f"^corrupt key file {listing}: not a key file"):
        load_identity(listing)
    path = save_identity(alice, tmp_path / "a.key")
    path.chmod(0o644)
    with pytest.raises(KeyFileError, match="UNPROTECTED PRIVATE KEY FILE"):
        load_identity(path)


def test_an_empty_key_file_and_a_key_file_as_an_allow_list_are_named(tmp_path: Path, alice: Identity) -> None:
    path = tmp_path / "node.key"
    path.write_bytes(b"")
    path.chmod(0o600)
    with pytest.raises(KeyFileError, match=f"^corrupt key file {path}: the file is empty$"):
        load_identity(path)
    save_identity(alice, tmp_path / "a.key")
    with pytest.raises(KeyFileError, match="a.key:1: JSON, not a list of keys: give each node's curve public key"):
        read_allowed_keys(tmp_path / "a.key")


def test_options_holding_a_client_identity_do_not_show_its_secret(alice: Identity, tmp_path: Path) -> None:
    """Identity keeps its secrets out of repr; the options that carry its CURVE pair showed both
    (a log line or a traceback away from a leak: review83)."""
    from nanoswarm.client.load import LoadOptions
    from nanoswarm.client.swarm import SwarmOptions

    keys = (alice.curve_public, alice.curve_secret)
    for options in (SwarmOptions(client_keys=keys), LoadOptions(tmp_path, client_keys=keys)):
        assert options.client_keys == keys and alice.curve_secret.decode() not in repr(options)


def test_a_record_offered_again_is_counted_not_logged(alice: Identity, caplog) -> None:
    """Gossip re-offers what a node holds every round: with -vv an idle node logged "rejected
    record: stale_seq already held" ~12 times a second (a review). It is counted only."""
    table = RecordTable(clock=Clock())
    wire = make_wire(alice, seq=1, expires=NOW + 60)
    assert table.offer(wire) == "accepted"
    with caplog.at_level("DEBUG", logger="nanoswarm.keys.table"):
        assert [table.offer(wire) for _ in range(3)] == ["stale_seq"] * 3
    assert table.rejected["stale_seq"] == 3 and not caplog.records


def test_a_given_hosts_lookup_is_made_again_after_a_while(monkeypatch):
    """same_endpoint looks a given host up (keys/contact.py): once for LOOKUP_SECONDS, a failed
    lookup for LOOKUP_FAILED_SECONDS, keeping the last answer meanwhile. Before, a host that did
    not resolve once (DNS down) or that moved to another IP was held as it was for the process's
    life."""
    import socket
    import types

    from nanoswarm.keys import contact

    clock, answers, asked = [1000.0], {"example.test": []}, []

    def lookup(host, port, type=0):
        asked.append(host)
        if not answers[host]:
            raise socket.gaierror("no such host")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, 0)) for ip in answers[host]]

    monkeypatch.setattr(contact, "socket", types.SimpleNamespace(getaddrinfo=lookup, SOCK_STREAM=socket.SOCK_STREAM))
    monkeypatch.setattr(contact, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    monkeypatch.setattr(contact, "_lookups", {})
    given, record = "tcp://example.test:7000", "tcp://10.1.2.3:7000"

    def after(seconds: float) -> bool:
        clock[0] += seconds
        return contact.same_endpoint(given, record)

    assert not after(0) and asked == ["example.test"]  # DNS down
    answers["example.test"] = ["10.1.2.3"]
    assert not after(contact.LOOKUP_FAILED_SECONDS - 1) and len(asked) == 1  # held a while
    assert after(2) and len(asked) == 2
    answers["example.test"] = ["10.9.9.9"]  # the name moved
    assert after(contact.LOOKUP_SECONDS - 1) and len(asked) == 2
    assert not after(2) and len(asked) == 3
    answers["example.test"] = []  # DNS down again: the last answer holds (review119)
    record = "tcp://10.9.9.9:7000"
    assert after(contact.LOOKUP_SECONDS + 1) and len(asked) == 4
    assert after(contact.LOOKUP_FAILED_SECONDS - 1) and len(asked) == 4
    assert after(2) and len(asked) == 5  # asked again, still held
    assert after(2 * contact.LOOKUP_FAILED_SECONDS - 1) and len(asked) == 5  # twice the wait (review121)
    assert after(2) and len(asked) == 6
    # More hosts than are kept: the oldest gives way, the rest keep their answers (review121: all
    # were dropped, last answers too).
    for n in range(contact.LOOKUPS_KEPT):
        answers[f"h{n}.test"] = ["10.0.0.1"]
        assert contact.same_endpoint(f"tcp://h{n}.test:1", "tcp://10.0.0.1:1")
    assert "example.test" not in contact._lookups and len(contact._lookups) == contact.LOOKUPS_KEPT
    assert len(asked) == 6 + contact.LOOKUPS_KEPT
    assert contact.same_endpoint("tcp://h1.test:1", "tcp://10.0.0.1:1") and len(asked) == 6 + contact.LOOKUPS_KEPT


def test_a_record_may_not_name_a_small_order_key():
    """An Ed25519 "key" of small order is no one's: with it an all-zero signature verified for
    one body in four (review206: 9 of 40 forged records, no secret held). Every such point is
    refused `malformed` before the signature is looked at, in any encoding of it."""
    from nanoswarm.keys.records import _small_order

    p = 2**255 - 19
    y8 = 0x5FC536D880238B13933C6D305ACDFD5F098EFF289F4C345B027B2C28F95E826
    small = [y.to_bytes(32, "little") for y in (0, 1, p - 1, y8, p - y8, p, p + 1)]  # (p, p+1: 0 and 1 again)
    small += [k[:31] + bytes([k[31] | 0x80]) for k in small]  # x's sign bit set
    pub, _ = zmq.curve_keypair()
    for key in small:
        assert _small_order(key)
        for seq in range(1, 9):
            body = encode_record(Record(peer_id=peer_id_for(key), sign_key=key, curve_key=pub,
                                        address="tcp://127.0.0.1:9", model_id="m", layers=(0, 1), heads=None,
                                        throughput=0.0, load=0.0, seq=seq, expires=NOW + 60))
            with pytest.raises(RecordRejected) as e:
                verify_wire({"body": body, "sig": bytes(64)}, now=NOW)
            assert e.value.reason == "malformed" and "small order" in str(e.value)
    assert not any(_small_order(generate_identity().sign_public) for _ in range(20))


def test_records_and_contacts_refuse_inputs_a_mutation_each_let_through(alice):
    """Inputs each of which a mutation of the checks let through, unnoticed by the tests before
    (review206): every one is refused, or read, as its check says."""
    from nanoswarm.keys.clock import ClockOffsets
    from nanoswarm.keys.contact import host_and_port, same_endpoint, split_contact
    from nanoswarm.keys.records import check_endpoint

    def rec(**kw) -> dict:
        return sign_record(alice, **{"address": "tcp://127.0.0.1:9", "model_id": "m", "layers": (0, 1),
                                     "seq": 1, "expires": NOW + 60, **kw})

    with pytest.raises(ValueError, match="port"):
        check_endpoint("tcp://127.0.0.1:65536")
    with pytest.raises(ValueError, match="malformed"):
        rec(model_id="m" * 200)
    with pytest.raises(ValueError, match="malformed"):
        rec(layers=(0, 65537))
    assert verify_record(rec(seq=0), now=NOW).seq == 0  # seq 0 is a seq
    wire = rec()
    for bad in ({**wire, "x": 1}, {"body": wire["body"], "sig": wire["sig"][:63]}):
        with pytest.raises(RecordRejected) as e:
            verify_wire(bad, now=NOW)
        assert e.value.reason == "malformed"
    with pytest.raises(ValueError, match="expected a CURVE key"):
        split_contact("tcp://127.0.0.1:5555#")  # an empty key is no key-less contact
    assert not same_endpoint("tcp://localhost:5555", "tcp://127.0.0.1:6666")
    assert same_endpoint("tcp://localhost:5555", "tcp://127.0.0.1:5555")
    assert host_and_port("tcp://[::1]:5555") == ("::1", "5555")
    assert ClockOffsets().of("never asked") is None


def test_the_table_keeps_the_checks_a_mutation_each_passed(alice, bob):
    """The table's checks a mutation each passed unnoticed (review206): a held body with another
    signature is bad_signature, not the usual re-offer; `max_ttl` bounds what it takes; a peer
    that came back after its departure, then forgotten, is not taken back at the same seq; the
    departure count; and a map or a list asked about as a peer."""
    now = [NOW]
    table = RecordTable(max_ttl=60, clock=lambda: now[0])

    def rec(who, seq: int, expires: float = NOW + 60) -> dict:
        return sign_record(who, address="tcp://127.0.0.1:9", model_id="m", layers=(0, 1), seq=seq,
                           expires=expires)

    wire = rec(alice, 4)
    assert table.offer(wire) == "accepted"
    assert table.offer({"body": wire["body"], "sig": bytes(64)}) == "bad_signature"
    assert table.offer(rec(bob, 1, expires=NOW + 200)) == "too_far_future"
    assert table.offer(sign_departure(alice, verify_record(wire, now=NOW), seq=5, now=NOW)) == "departed"
    assert table.departed == 1
    back = rec(alice, 6)
    assert table.offer(back) == "accepted" and table.remove(alice.peer_id)
    assert table.offer(back) == "stale_seq"
    assert [1] not in table and "nobody" not in table
    assert table.offer(rec(bob, 2)) == "accepted"
    ours = table.live_wires("m")
    ours[0][1]["sig"] = bytes(64)  # a caller's copy: what the table gossips is unchanged
    assert all(len(w["sig"]) == 64 and any(w["sig"]) for w in table.wires())


def test_keys_generate_at_the_default_path_names_the_file_it_wrote(tmp_path: Path, monkeypatch) -> None:
    """Without --out, `keys generate` writes the node's default key file and names it (plain and
    --json), the identity `keys show` reads from it."""
    from conftest import invoke_cli

    path = tmp_path / "node.key"
    monkeypatch.setenv("NANOSWARM_KEY_FILE", str(path))
    out = invoke_cli("keys", "generate")
    assert out.returncode == 0 and out.stdout.splitlines()[-1] == f"key file        {path}", out.stderr
    shown = invoke_cli("keys", "show", str(path))
    assert shown.returncode == 0 and out.stdout.startswith(shown.stdout.rstrip("\n"))
    path.unlink()
    as_json = invoke_cli("keys", "generate", "--json")
    assert as_json.returncode == 0 and json.loads(as_json.stdout)["key_file"] == str(path)
    assert json.loads(as_json.stdout)["peer_id"] == load_identity(path).peer_id


# Review221: files.py's size limit on the small files a user hands us, at its bound.
def test_an_allowed_keys_file_is_read_up_to_its_size_limit_and_no_further(tmp_path: Path, alice: Identity) -> None:
    """A file of exactly SMALL_FILE_BYTES is read whole; one byte more is refused, not read
    (cut short, its last line would have been taken as a key, or memory filled)."""
    import re

    from nanoswarm.files import SMALL_FILE_BYTES

    line = f"{alice.curve_public.decode()} "
    path = tmp_path / "allowed"
    path.write_text(line + "x" * (SMALL_FILE_BYTES - len(line)))  # one key, a long label
    assert path.stat().st_size == SMALL_FILE_BYTES
    assert read_allowed_keys(path) == {alice.curve_public}
    with path.open("a") as f:
        f.write("y")
    why = f"cannot read allowed-keys file {path}: more than {SMALL_FILE_BYTES} bytes: not a file of this kind"
    with pytest.raises(KeyFileError, match=f"^{re.escape(why)}$"):
        read_allowed_keys(path)


# Review223: the table's paths a second mutation review found untested (each test fails under
# the mutation its docstring names; checked both ways).
def _rec(who: Identity, seq: int, expires: float = NOW + 60, model_id: str = "m") -> dict:
    return sign_record(who, address="tcp://127.0.0.1:9", model_id=model_id, layers=(0, 1), seq=seq,
                       expires=expires)


def test_a_peer_back_after_its_record_expired_joins_again(alice: Identity) -> None:
    """A record of a peer whose last one expired (still in the table until `expire()`) is a join,
    not a refresh: nodes log joins, and gossip takes a refresh as a sign of life of a live peer
    (mutation: `old is None or old.record.is_expired(now)` -> `old is None`)."""
    clock = Clock()
    table = RecordTable(max_ttl=60, clock=clock)
    joined, refreshed = [], []
    table.on_join = lambda record: joined.append(record.seq)
    table.on_refresh = lambda record, old: refreshed.append(record.seq)
    assert table.offer(_rec(alice, 1, expires=NOW + 10)) == "accepted"
    assert table.offer(_rec(alice, 2, expires=NOW + 10)) == "accepted"
    assert (joined, refreshed) == ([1], [2])
    clock.now = NOW + 11  # expired, not yet dropped
    assert alice.peer_id not in table
    assert table.offer(_rec(alice, 3, expires=NOW + 60)) == "accepted"
    assert (joined, refreshed) == ([1, 3], [2])


def test_a_peers_seq_floor_is_the_highest_seq_held(alice: Identity) -> None:
    """A peer back after its departure holds a live record above its tombstone's seq: the floor is
    the record's, so an older record of it, signed between the two, is stale and does not roll it
    back (mutation: `max(seqs)` -> `min(seqs)`)."""
    table = RecordTable(max_ttl=60, clock=Clock())
    assert table.offer(_rec(alice, 4)) == "accepted"
    assert table.offer(sign_departure(alice, verify_record(_rec(alice, 4), now=NOW), seq=5, now=NOW)) == "departed"
    newest = _rec(alice, 8)
    assert table.offer(newest) == "accepted"
    assert table.held_seq(alice.peer_id) == 8
    assert table.offer(_rec(alice, 7)) == "stale_seq"
    assert table.get(alice.peer_id).seq == 8 and table.wires() == [newest]


def test_a_peer_that_came_back_departs_again_with_the_tombstones_full(alice: Identity, bob: Identity) -> None:
    """A departure of a peer that holds a tombstone already replaces it, also when the tombstones
    are full: a peer that left, came back and left again is gone, not listed until its record
    expires (mutation: `peer_id in self._tombstones or` dropped from `_has_room`)."""
    table = RecordTable(max_ttl=60, clock=Clock(), max_peers=1)
    assert table.offer(_rec(alice, 1)) == "accepted"
    assert table.offer(sign_departure(alice, verify_record(_rec(alice, 1), now=NOW), seq=2, now=NOW)) == "departed"
    assert table.offer(_rec(alice, 3)) == "accepted"  # back
    again = sign_departure(alice, verify_record(_rec(alice, 3), now=NOW), seq=4, now=NOW)
    assert table.offer(again) == "departed"
    assert alice.peer_id not in table and table.held_seq(alice.peer_id) == 4 and table.wires() == [again]
    assert table.offer(_rec(alice, 3)) == "stale_seq"


def test_a_departure_from_a_clock_ahead_blocks_its_records_until_they_expire(alice: Identity) -> None:
    """A departure signed on a clock ahead of ours (its `expires` in our future) keeps its
    tombstone for max_ttl past that moment, not past ours: a record the peer signed just before
    leaving, on that clock, lives that long and must not bring it back when gossiped late
    (mutation: `max(now, record.expires) + max_ttl` -> `now + max_ttl`)."""
    clock = Clock()
    table = RecordTable(max_ttl=60, clock=clock)
    last = _rec(alice, 1, expires=NOW + 30 + 60)  # signed at NOW + 30 on its clock, ttl 60: too far ahead for us now
    assert table.offer(last) == "too_far_future"
    assert table.offer(sign_departure(alice, verify_record(last, now=NOW + 30), seq=2, now=NOW + 30)) == "departed"
    clock.now = NOW + 61  # past our now + max_ttl; the record lives until NOW + 90
    assert table.offer(last) == "stale_seq"
    assert alice.peer_id not in table
    clock.now = NOW + 91
    assert table.offer(last) == "expired"


def test_a_seq_floor_lapses_with_what_held_it(alice: Identity, bob: Identity) -> None:
    """Review206's survivor in `_held_seq`: the floor is what blocks older records, and it lapses
    with what holds it, before `expire()` drops it: an expired record (a node restarted with its
    clock stepped back, signing lower seqs, is taken at once; the other side of it, left by
    review206, is that an older record with a longer ttl still held by a peer is taken again too),
    and a tombstone past its `until`. Mutations: `not entry.record.is_expired(now)` dropped, and
    `stone.until > now` dropped."""
    clock = Clock()
    table = RecordTable(max_ttl=60, clock=clock)
    assert table.offer(_rec(alice, 20, expires=NOW + 10)) == "accepted"
    assert table.offer(_rec(alice, 10, expires=NOW + 50)) == "stale_seq"
    clock.now = NOW + 11
    assert table.held_seq(alice.peer_id) is None
    assert table.offer(_rec(alice, 10, expires=NOW + 50)) == "accepted"  # the stepped-back restart
    assert table.get(alice.peer_id).seq == 10
    # A departure's tombstone: it blocks until `until` (max_ttl past the departure), then not.
    assert table.offer(_rec(bob, 5)) == "accepted"
    assert table.offer(sign_departure(bob, verify_record(_rec(bob, 5), now=NOW), seq=6, now=NOW + 11)) == "departed"
    clock.now = NOW + 11 + 60 - 1
    assert table.held_seq(bob.peer_id) == 6 and table.offer(_rec(bob, 3, expires=clock.now + 30)) == "stale_seq"
    clock.now = NOW + 11 + 60 + 1
    assert table.held_seq(bob.peer_id) is None
    assert table.offer(_rec(bob, 3, expires=clock.now + 30)) == "accepted"


def test_gossip_splits_wires_by_model_and_leaves_out_departures_peers_reject(alice: Identity, bob: Identity) -> None:
    """`wires_split(model)`: that model's records and departures first, the rest apart; a
    departure is gossiped only while receivers still take it (expires within max_ttl), though its
    tombstone lasts longer. Mutations: the split's two lists swapped, and the departure's window
    dropped."""
    clock = Clock()
    table = RecordTable(max_ttl=60, clock=clock)
    carol = generate_identity()
    ours, theirs = _rec(alice, 1), _rec(bob, 1, model_id="other")
    assert table.offer(ours) == "accepted" and table.offer(theirs) == "accepted"
    assert table.offer(_rec(carol, 1)) == "accepted"
    late = sign_departure(carol, verify_record(_rec(carol, 1), now=NOW), seq=2, now=NOW - 30)  # heard late
    assert table.offer(late) == "departed"
    assert table.wires_split("m") == ([ours, late], [theirs]) or table.wires_split("m") == ([late, ours], [theirs])
    assert table.wires_split("other")[0] == [theirs]
    clock.now = NOW + 31  # the departure expired 61 s ago: receivers refuse it, its tombstone holds
    assert RecordTable(max_ttl=60, clock=clock).offer(late) == "expired"
    assert table.held_seq(carol.peer_id) == 2
    assert table.wires_split("m") == ([ours], [theirs])


# Review228: inputs of keys/contact.py that a mutation of its checks got wrong, unnoticed before.
def test_contact_keys_are_refused_or_read_as_their_checks_say(monkeypatch):
    """A contact pasted with blanks around it is read (mutation: no strip()); a key of 72 hex
    digits is no key (mutation: `len(key) >= 64` made it a 45-character "key"); a look-alike
    letter in a hex key is "not valid hex" (mutation: `except binascii.Error` let a bare
    ValueError out) and in a z85 key is refused (a bug, review228: `encode("ascii", "replace")`
    made it "?", a z85 character, and the contact named another node's key); a given host whose
    name IDNA cannot encode is no match (mutation: `except OSError` let UnicodeError out)."""
    from nanoswarm.keys import contact
    from nanoswarm.keys.contact import endpoint_of, same_endpoint, split_contact

    pub = zmq.curve_keypair()[0]
    hexed = format_contact("tcp://127.0.0.1:5555", pub)
    assert split_contact(f"  {hexed}\n") == ("tcp://127.0.0.1:5555", pub)
    assert endpoint_of(f" {hexed} ") == "tcp://127.0.0.1:5555"
    with pytest.raises(ValueError, match="expected a CURVE key"):
        split_contact(hexed + "00" * 4)
    with pytest.raises(ValueError, match="not valid hex"):
        split_contact(hexed[:-1] + "é")
    z = pub.decode()
    assert split_contact(f"tcp://127.0.0.1:5555#{z}") == ("tcp://127.0.0.1:5555", pub)
    with pytest.raises(ValueError, match="expected a CURVE key"):
        split_contact(f"tcp://127.0.0.1:5555#{z[:10]}é{z[11:]}")
    with pytest.raises(ValueError, match="expected a CURVE key"):  # a byte not UTF-8 in argv (surrogateescape)
        split_contact(f"tcp://127.0.0.1:5555#{z[:10]}\udcff{z[11:]}")
    monkeypatch.setattr(contact, "_lookups", {})
    assert not same_endpoint(f"tcp://{'a' * 64}.test:1", "tcp://10.0.0.1:1")


def test_a_hosts_failed_lookups_wait_at_most_lookup_seconds(monkeypatch):
    """The wait after failed lookups doubles up to LOOKUP_SECONDS, no further (mutation: without
    the `min`, the sixth failure in a row held the name for 960 s)."""
    import socket
    import types

    from nanoswarm.keys import contact

    clock = [1000.0]

    def lookup(host, port, type=0):
        raise socket.gaierror("no such host")

    monkeypatch.setattr(contact, "socket", types.SimpleNamespace(getaddrinfo=lookup, SOCK_STREAM=socket.SOCK_STREAM))
    monkeypatch.setattr(contact, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    monkeypatch.setattr(contact, "_lookups", {})
    waits = []
    for _ in range(8):
        assert not contact.same_endpoint("tcp://down.test:1", "tcp://10.0.0.1:1")
        waits.append(contact._lookups["down.test"][0] - clock[0])
        clock[0] += waits[-1]
    assert waits == [30.0, 60.0, 120.0, 240.0] + [contact.LOOKUP_SECONDS] * 4


def test_a_host_looked_up_again_is_the_last_to_give_way(monkeypatch):
    """When more hosts than LOOKUPS_KEPT are given, the one looked up longest ago gives way, not
    the one first given (mutation: without the `pop` before the entry is set again, a host looked
    up again kept its first place and was dropped first, to be asked of DNS again)."""
    import socket
    import types

    from nanoswarm.keys import contact

    clock = [1000.0]

    def lookup(host, port, type=0):
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.1", 0))]

    monkeypatch.setattr(contact, "socket", types.SimpleNamespace(getaddrinfo=lookup, SOCK_STREAM=socket.SOCK_STREAM))
    monkeypatch.setattr(contact, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    monkeypatch.setattr(contact, "_lookups", {})

    def given(n: int) -> bool:
        return contact.same_endpoint(f"tcp://h{n}.test:1", "tcp://10.0.0.1:1")

    assert given(0) and given(1)
    clock[0] += contact.LOOKUP_SECONDS + 1
    assert given(0)  # looked up again: now the latest
    assert all(given(n) for n in range(2, contact.LOOKUPS_KEPT + 1))
    assert "h0.test" in contact._lookups and "h1.test" not in contact._lookups
    assert len(contact._lookups) == contact.LOOKUPS_KEPT
