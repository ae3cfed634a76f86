"""The `nanoswarm` command as a user runs it: real subprocesses, stdout and exit codes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import CLI, TINY, all_gone, children_of, invoke_cli, pid_alive, run_cli, run_clis

from nanoswarm.client.api import SwarmModel
from nanoswarm.client.generate import SamplingParams
from nanoswarm.client.transport import PeerConnection
from nanoswarm.node.cluster import NodeSpec
from nanoswarm.shards.model import GPT
from nanoswarm.shards.writers import save_nanogpt_checkpoint


def test_shard_command_writes_a_model_dir(tmp_path):
    torch.manual_seed(0)
    model = GPT(TINY)
    ckpt = tmp_path / "ckpt.pt"
    save_nanogpt_checkpoint(TINY, model.flat_state_dict(), ckpt)
    out = run_cli("shard", str(ckpt), str(tmp_path / "m"), "--layers-per-shard", "2", "--json")
    assert out.returncode == 0, out.stderr
    manifest = json.loads(out.stdout)
    roles = sorted(f["role"] for f in manifest["files"])
    assert roles == ["blocks", "blocks", "embeddings", "head"]
    assert (tmp_path / "m" / "manifest.json").exists()
    # progress on stderr without -v: long work shows it
    assert "reading checkpoint" in out.stderr and "[4/4] wrote" in out.stderr
    # A weight float16 cannot hold: the line names the checkpoint too, not only the weight
    big = model.flat_state_dict()
    big["h.1.mlp.c_fc.weight"][0, 0] = 1e5
    save_nanogpt_checkpoint(TINY, big, tmp_path / "big.pt")
    out = invoke_cli("shard", str(tmp_path / "big.pt"), str(tmp_path / "half"), "--dtype", "float16")
    assert out.returncode == 1 and out.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'big.pt'}: h.1.mlp.c_fc.weight holds 100000, which float16 cannot hold: "
        "shard it as float32 or bfloat16"), out.stderr
    assert not (tmp_path / "half").exists()


@pytest.mark.slow
def test_cluster_generate_and_clean_stop(tiny_model_dir, tmp_path):
    proc = subprocess.Popen([*CLI, "cluster", str(tiny_model_dir), "--nodes", "3"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env={**os.environ, "TMPDIR": str(tmp_path)})
    try:
        lines = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline().strip()
            if line == "ready" or not line and proc.poll() is not None:
                break
            lines.append(line)
        assert len(lines) == 3, lines
        addresses = [line.split()[0] for line in lines]
        pids = [int(line.split("pid")[1].split()[0]) for line in lines]
        assert all(pid_alive(p) for p in pids)

        local = SwarmModel.local(tiny_model_dir).generate("To be", 12, SamplingParams(temperature=0))
        args = ["generate", "To be", "--model", str(tiny_model_dir), "--peers", ",".join(addresses),
                "--temperature", "0", "--max-new-tokens", "12"]
        # plain: relayed (the default); --json: each stage answers the client
        out, *json_outs = run_clis(args, [*args, "--json", "--no-relay"])
        alone = invoke_cli("generate", "To be", "--model", str(tiny_model_dir), "--local",
                           "--temperature", "0", "--max-new-tokens", "12")
        assert alone.returncode == 0 and alone.stdout == out.stdout, alone.stderr  # the reference, from the CLI
        assert out.returncode == 0, out.stderr
        assert out.stdout == "To be" + local.text + "\n"  # stdout carries only the text
        assert "route:" in out.stderr

        for out in json_outs:
            assert out.returncode == 0, out.stderr
            result = json.loads(out.stdout)
            assert result["ids"] == local.ids and result["text"] == local.text
            assert [s["layers"] for s in result["route"]] == [[0, 2], [2, 3], [3, 4]]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    assert all_gone(pids), "a node process was left behind"
    assert list(tmp_path.iterdir()) == []  # the nodes' key files are removed (SIGTERM: as Ctrl-C)


def test_cluster_json_is_one_object_once_every_node_serves(tiny_model_dir):
    """One span served by a head group of two (--head-groups): each node holds half the heads.
    Started as a script's background job is (SIGINT ignored), it still stops on SIGINT: Python
    left SIGINT ignored, and `kill -INT` did nothing (a review)."""
    proc = subprocess.Popen([*CLI, "cluster", str(tiny_model_dir), "--nodes", "1", "--head-groups", "2", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        ready = json.loads(proc.stdout.readline())
        assert [(n["layers"], n["heads"]) for n in ready["nodes"]] == [([0, 4], [0, 2]), ([0, 4], [2, 4])]
        assert all(pid_alive(n["pid"]) and "#" in n["contact"] for n in ready["nodes"])
        out = invoke_cli("peers", "--bootstrap", ready["nodes"][0]["contact"], "--json")
        assert len(json.loads(out.stdout)["models"][0]["peers"]) == 2
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()  # its nodes follow: they watch their parent
            raise
    assert code == 0


def _cluster(model_dir, tmp: Path, *args: str) -> tuple[subprocess.Popen, dict]:
    """`nanoswarm cluster --json` with its own TMPDIR (where its nodes' key files go), once ready."""
    tmp.mkdir()
    proc = subprocess.Popen([*CLI, "cluster", str(model_dir), "--json", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "TMPDIR": str(tmp)})
    return proc, json.loads(proc.stdout.readline())


def test_a_signal_a_destructor_swallowed_is_raised_again_at_the_next_token(monkeypatch):
    """pyzmq checks for signals as it frees a message frame, and the Interrupted our handler
    raises there is only printed ("Exception ignored in Frame.__dealloc__"): a SIGHUP left a
    generation running to its end, exit code 0 (the suite met it once). generate's loop raises
    it again at its next token, once."""
    import nanoswarm.cli as cli
    from nanoswarm.cli.client import run_generation

    monkeypatch.setattr(cli, "_raised", [])
    cli.raise_swallowed()  # no signal: nothing
    with pytest.raises(cli.Interrupted):
        cli._interrupt(signal.SIGHUP, None)  # (in a destructor, this exception goes nowhere)

    class Model:  # a stream of tokens, and what its closing did
        closed = False

        def stream(self, *args, **kwargs):
            try:
                yield "x"
                cli._raised.append(signal.SIGHUP)  # as the handler does, in a destructor that swallows it
                yield from "xxxx"
            finally:
                Model.closed = True

    for as_json in (False, True):
        cli._raised[:] = [signal.SIGTERM]  # an earlier command's, in the same process: forgotten
        Model.closed = False
        with pytest.raises(cli.Interrupted) as raised:
            run_generation(Model(), "p", 10, None, as_json)
        assert raised.value.signum == signal.SIGHUP and Model.closed and cli._raised == []
        cli.raise_swallowed()  # once


def test_signals_end_commands_as_ctrl_c_does(tmp_path):
    """SIGTERM or SIGHUP (kill, timeout, a closed terminal) skipped every command's cleanup but
    cluster's and demo's: key files and bench's models were left, and generate's sessions stayed
    open on the nodes (a review). Now each ends as Ctrl-C does, exit code 128 + the signal."""
    from dataclasses import replace

    from conftest import make_model_dir

    # A context of 2,048 positions: the tiny model's 128 ended a generation within a fraction of
    # a second, and on a loaded machine one ended before the signal came (exit 0, twice in CI).
    model_dir = make_model_dir(tmp_path / "long", replace(TINY, block_size=2048), layers_per_shard=4)
    proc, ready = _cluster(model_dir, tmp_path / "a", "--nodes", "1")
    contact, pids = ready["nodes"][0]["contact"], [n["pid"] for n in ready["nodes"]]
    probe = PeerConnection(contact, timeout=10)
    errors = tmp_path / "generate.err"  # what generate said, for a failure's message

    def said() -> str:
        return f"generate's stderr: {errors.read_text()!r}"

    try:
        gen = subprocess.Popen([*CLI, "generate", "To be", "--model", str(model_dir), "--peers", contact,
                                "--max-new-tokens", "100000", "--temperature", "0"],
                               stdout=subprocess.PIPE, stderr=errors.open("w"), text=True)
        gen.stdout.read(20)  # generating
        # Frozen where it is, mid-generation: the signal waits for SIGCONT, and the handler runs
        # at once then.
        gen.send_signal(signal.SIGSTOP)
        assert probe.request("info").fields["sessions"] == 1, said()
        gen.send_signal(signal.SIGHUP)
        gen.send_signal(signal.SIGCONT)
        assert gen.wait(30) == 128 + signal.SIGHUP, said()
        assert gen.stdout.read().endswith("\n")  # the text's line ends
        # closed on the way out, not in 300 s (queued as it exits: the node may read it a moment later)
        deadline = time.monotonic() + 5
        while probe.request("info").fields["sessions"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert probe.request("info").fields["sessions"] == 0
        # --json prints what came so far, with an empty stop_reason (it printed nothing)
        before = probe.request("info").fields["stats"]["tokens"]  # (the node's count since it started)
        gen = subprocess.Popen([*CLI, "generate", "To be", "--model", str(model_dir), "--peers", contact,
                                "--max-new-tokens", "100000", "--temperature", "0", "--json"],
                               stdout=subprocess.PIPE, stderr=errors.open("w"), text=True)
        # Stopped once it has generated (the prompt's 2 positions and 2 more), seconds before
        # the context would end it.
        deadline = time.monotonic() + 30
        while probe.request("info").fields["stats"]["tokens"] < before + 4 and time.monotonic() < deadline:
            time.sleep(0.002)
        gen.send_signal(signal.SIGSTOP)
        gen.send_signal(signal.SIGTERM)
        gen.send_signal(signal.SIGCONT)
        assert gen.wait(30) == 128 + signal.SIGTERM, said()
        partial = json.loads(gen.stdout.read())
        assert partial["stop_reason"] == "" and partial["ids"] and partial["text"] and "error" not in partial
    finally:
        probe.close()
        children = children_of(proc.pid)  # the node launcher among them (node/launcher.py)
        proc.kill()  # nothing can clean up after SIGKILL; its nodes still go (they watch it)
        proc.wait()
    assert children and all_gone(pids + children)


def test_a_cluster_whose_node_dies_says_so_and_stops(tiny_model_dir, tmp_path):
    proc, ready = _cluster(tiny_model_dir, tmp_path / "a", "--nodes", "2")
    pids = [n["pid"] for n in ready["nodes"]]
    os.kill(pids[1], signal.SIGKILL)
    assert proc.wait(30) == 1
    assert f"error: node layers 2:4 (pid {pids[1]}) was killed by SIGKILL" in proc.stderr.read()
    assert all_gone(pids) and list((tmp_path / "a").iterdir()) == []


def test_harness_nodes_outlive_the_thread_that_started_them_not_the_process(tiny_model_dir, tmp_path):
    """Linux's parent-death signal fires when the starting *thread* ends: a LocalCluster started
    from a worker thread lost every node with it (a review). Nodes watch the harness's pid now,
    so they still go when the harness process does, even by SIGKILL (test_signals_end_...)."""
    import threading

    from nanoswarm.node.cluster import LocalCluster

    harness = LocalCluster(tiny_model_dir, [NodeSpec((0, 4))])
    starter = threading.Thread(target=harness.start)
    starter.start()
    starter.join(60)
    try:
        time.sleep(2)
        assert harness.nodes[0].proc.poll() is None
        model = SwarmModel.connect(tiny_model_dir, peers=harness.addresses)
        try:
            assert len(model.generate("To be", 3, SamplingParams(temperature=0)).ids) == 3
        finally:
            model.close()
    finally:
        harness.stop()


def test_generate_names_uncovered_layers(tiny_model_dir, cluster_factory):
    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 2))])
    out = invoke_cli("generate", "x", "--model", str(tiny_model_dir), "--peers", swarm.addresses[0])
    assert out.returncode != 0
    # A peer slow to answer the refresh (Swarm.refresh) would add "; not used: ..." to the line.
    assert out.stderr.strip().splitlines()[-1].startswith("error: no peer serves layers 2:4")
    # --peers uses only the contacts given, even where they know the rest (review115)
    assert out.stderr.strip().splitlines()[-1].endswith("--bootstrap learns the rest from their tables)")


def test_node_refuses_a_tampered_shard(tiny_model_dir, tmp_path):
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    victim = sorted(copy.glob("blocks-1-2.safetensors"))[0]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    for _ in range(2):  # the second: the key file's lock went with the first failure (same process)
        out = invoke_cli("node", str(copy), "--layers", "0:2", "--key-file", str(tmp_path / "k.key"))
        assert out.returncode != 0
        last = out.stderr.strip().splitlines()[-1]
        assert last.startswith("error:") and "blocks-1-2.safetensors" in last


def test_node_refuses_a_zero_limit(tiny_model_dir):
    """0 is a limit, not "not given": the node refuses it rather than fall back to the default."""
    options = ("--kv-budget-mb", "--max-message-mb", "--max-sessions")
    outs = run_clis(*(["node", str(tiny_model_dir), "--layers", "0:4", "--insecure", option, "0"]
                      for option in options), timeout=60)
    for option, out in zip(options, outs):
        assert one_error_line(out) == f"error: Invalid value for '{option}': 0 is not in the range 1<=x<=2147483647."


@pytest.mark.parametrize("command", ["node", "cluster", "train", "bench"])
def test_numbers_no_node_could_use_are_refused_before_anything_loads(tiny_model_dir, tmp_path, command):
    """A million torch threads crashed libgomp (SIGSEGV, no word said) in node, train, bench and
    cluster's nodes; a limit past a C long failed after the blocks had loaded, with a line that
    named no option (a review). Each is a usage error now."""
    cases = [("--threads", "1025", "1025 is not in the range 1<=x<=1024")]
    if command == "node":
        cases += [("--max-sessions", str(2**31), f"{2**31} is not in the range 1<=x<=2147483647"),
                  ("--max-message-mb", str(2**50), f"{2**50} is not in the range 1<=x<=2147483647"),
                  ("--max-inflight", str(2**20 + 1), f"{2**20 + 1} is not in the range 1<=x<=1048576"),
                  ("--gossip-interval", "1e-9", "'1e-9' is too small: at least 0.05")]
    first = {"node": [str(tiny_model_dir), "--key-file", str(tmp_path / "k.key")], "cluster": [str(tiny_model_dir)],
             "train": ["--out", str(tmp_path / "ckpt.pt")], "bench": ["--quick"]}[command]
    for option, value, why in cases:
        out = invoke_cli(command, *first, option, value)
        assert out.returncode == 2 and why in one_error_line(out) and out.stdout == "", out.stderr
    assert not (tmp_path / "k.key").exists() and not (tmp_path / "ckpt.pt").exists()


def test_node_help_shows_the_limits_defaults():
    """The options default to None (NodeLimits decides); their help states NodeLimits' values."""
    import re

    from click.testing import CliRunner

    from nanoswarm import cli
    from nanoswarm.node.sessions import NodeLimits

    shown = dict(re.findall(r"--([a-z-]+) [A-Z ]+(?:(?!--).)*?\[default: \((\d+)", " ".join(
        CliRunner().invoke(cli.main, ["node", "--help"], terminal_width=1000).output.split())))
    limits = NodeLimits()
    assert {k: int(v) for k, v in shown.items()} == {
        "max-sessions": limits.max_sessions, "kv-budget-mb": limits.kv_budget_bytes >> 20,
        "max-session-length": limits.max_session_length, "max-tokens-per-step": limits.max_tokens_per_step,
        "max-message-mb": limits.max_message_bytes >> 20, "max-inflight": limits.max_inflight_per_peer,
        "idle-timeout": limits.idle_timeout, "max-batch-seconds": limits.max_batch_seconds}


def test_a_nodes_limit_options_reach_its_limits(tiny_model_dir, cluster_factory):
    """Each limit option given to `nanoswarm node` is the limit the node states in `info`, the
    MiB options in bytes (no test had given --kv-budget-mb to a node)."""
    args = ["--max-sessions", "5", "--kv-budget-mb", "3", "--max-session-length", "64", "--max-tokens-per-step", "32",
            "--max-message-mb", "2", "--max-inflight", "7", "--idle-timeout", "30", "--max-batch-seconds", "2.5"]
    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 4), args=args)])
    conn = PeerConnection(swarm.addresses[0], 10.0)
    try:
        fields = conn.request("info").fields
    finally:
        conn.close()
    assert fields["limits"] == {"max_sessions": 5, "kv_budget_bytes": 3 * 2**20, "max_session_length": 64,
                                "max_tokens_per_step": 32, "max_message_bytes": 2 * 2**20, "max_inflight_per_peer": 7,
                                "idle_timeout": 30.0, "max_batch_seconds": 2.5}
    assert fields["kv_budget"] == 3 * 2**20


def test_info_takes_exactly_one_contact():
    """`nanoswarm info` with no contact in CONTACT, or two, is a usage error in one line."""
    for contact in ("", ",", "tcp://127.0.0.1:9,tcp://127.0.0.1:10"):
        out = invoke_cli("info", contact, "--timeout", "1")
        assert out.returncode == 2 and "CONTACT: give one node's contact" in one_error_line(out) and not out.stdout


def one_error_line(out: subprocess.CompletedProcess, logs: bool = False) -> str:
    """The failure's one line, last on stderr: no traceback, no usage block. With `logs`, log
    lines may come before it (a node logs that it created its key file)."""
    lines = out.stderr.strip().splitlines()
    assert out.returncode != 0 and lines and lines[-1].startswith("error: "), out.stderr
    before = [line for line in lines[:-1] if not logs or line.startswith(("error", "Traceback", "Usage"))]
    assert not before, out.stderr
    return lines[-1]


def test_bad_ranges_fail_in_one_line(tiny_model_dir, tmp_path):
    cases = (("8:4", "is empty or negative"), ("-1:2", "is empty or negative"),
             ("0:0", "is empty or negative"), ("0:2:1", "must look like START:STOP"))
    outs = [invoke_cli("node", str(tiny_model_dir), "--layers", value, "--insecure", "--key-file",
                       str(tmp_path / f"k{i}.key")) for i, (value, _) in enumerate(cases)]
    for (value, why), out in zip(cases, outs):
        assert one_error_line(out) == f"error: --layers {value} {why}" + (
            ", e.g. 4:8" if "look" in why else " (START:STOP, half-open like a Python slice: 0 <= START < STOP)")


def test_generate_checks_its_settings_before_connecting(tiny_model_dir):
    """One line and nothing else: connecting would log about the (keyless) peer first."""
    cases = (("--max-new-tokens", "-1", "'--max-new-tokens': -1 is not in the range"),
             ("--temperature", "nan", "--temperature must be a finite number >= 0, got nan"),
             ("--top-p", "inf", "--top-p must be in (0, 1], got inf"),
             ("--top-k", "-1", "'--top-k': -1 is not in the range x>=0"),
             ("--seed", "-1", "--seed must be a whole number from 0 to 2**64 - 1, got -1"),
             # ZeroMQ's poll takes milliseconds as a C int: this overflowed it (a review)
             ("--timeout", "2200000", "'2200000' is too large: at most 1000000"))
    outs = [invoke_cli("generate", "x", "--model", str(tiny_model_dir), "--peers", "tcp://127.0.0.1:9", option, value)
            for option, value, _ in cases]
    for (_, _, message), out in zip(cases, outs):
        assert message in one_error_line(out) and out.returncode == 2  # a usage error, as click's own are
    out = invoke_cli("peers", "--bootstrap", "", "--timeout", "1")
    assert one_error_line(out) == "error: --bootstrap: no contact given" and out.returncode == 2
    out = invoke_cli("generate", "x", "--model", str(tiny_model_dir), "--peers", "tcp://127.0.0.1:9", "--verify", "nan")
    assert "--verify must be a share of steps from 0 to 1, got nan" in one_error_line(out) and out.returncode == 2
    # --local has no peers: options of the swarm are refused, not silently ignored (a review)
    out = invoke_cli("generate", "x", "--model", str(tiny_model_dir), "--local", "--wire", "q80", "--no-relay")
    assert one_error_line(out) == "error: --local runs without a swarm: --wire, --relay/--no-relay do not apply"
    out = invoke_cli("generate", "x", "--model", str(tiny_model_dir), "--local", "--verify", "0")
    assert one_error_line(out) == "error: --local runs without a swarm: --verify does not apply"
    with_k, off = (invoke_cli("generate", "x", "--model", str(tiny_model_dir), "--local", "--seed", "1",
                              "--max-new-tokens", "8", "--top-k", k) for k in ("1", "0"))
    assert with_k.returncode == off.returncode == 0 and with_k.stdout != off.stdout  # 0: no top-k, as in demo
    out = invoke_cli("demo", "x", "--model", str(tiny_model_dir), "--top-p", "2")
    assert one_error_line(out) == "error: --top-p must be in (0, 1], got 2.0" and out.returncode == 2
    # A prompt past the context: refused before any node starts (review82: the swarm started, two
    # error lines came, and the nodes' log was kept)
    out = invoke_cli("demo", " a" * 129, "--model", str(tiny_model_dir))
    assert out.stderr.strip() == "error: prompt is 129 tokens; the model's context is 128" and out.returncode == 1
    # stdout is the prompt and the text exactly, escape sequences too (click drops them from a
    # stdout that is no terminal, as here)
    out = invoke_cli("generate", "\x1b[31mred", "--model", str(tiny_model_dir), "--local", "--max-new-tokens", "2")
    assert out.returncode == 0 and out.stdout.startswith("\x1b[31mred"), out.stdout


def test_the_route_line_names_head_ranges_as_the_options_do():
    from nanoswarm.cli.client import _route_line

    route = [{"layers": [0, 2], "peers": ["tcp://127.0.0.1:1#k", "tcp://127.0.0.1:2#k"], "heads": [[0, 2], [2, 4]],
              "all_reduce": True},
             {"layers": [2, 4], "peers": ["tcp://127.0.0.1:3#k"], "heads": None}]
    assert _route_line(route) == ("route: 0:2 @ tcp://127.0.0.1:1,tcp://127.0.0.1:2 heads 0:2,2:4 (all-reduce) -> "
                                  "2:4 @ tcp://127.0.0.1:3")
    route[0]["all_reduce"] = False  # met by the client (fan-out)
    assert _route_line(route).startswith("route: 0:2 @ tcp://127.0.0.1:1,tcp://127.0.0.1:2 heads 0:2,2:4 -> ")


def test_a_bad_contact_fails_in_one_line_without_a_log_line_repeating_it(tiny_model_dir):
    """The error names each contact and why; the same reason is not logged above it as well."""
    model = ["--model", str(tiny_model_dir)]
    cases = (["generate", "x", *model, "--bootstrap", "garbage"], ["generate", "x", *model, "--peers", "garbage"],
             ["peers", "--bootstrap", "garbage", "--json"])
    for args in cases:
        out = invoke_cli(*args)  # (its log lines go to its stderr too)
        assert "garbage" in one_error_line(out) and out.stdout == "", (args, out.stderr)


def test_verbose_after_the_command_says_where_it_goes(tiny_model_dir):
    """`-v` is the program's option, not a command's: the error says where it goes (review163)."""
    for flag in ("-v", "-vv"):
        out = invoke_cli("generate", flag, "x", "--model", str(tiny_model_dir))
        assert one_error_line(out) == ("error: No such option '-v'. (it is the program's: put it before the "
                                       "command, `nanoswarm -v generate ...`)") and out.returncode == 2


def test_generate_refuses_a_keyless_bootstrap_without_insecure_at_once(tiny_model_dir):
    out = invoke_cli("generate", "x", "--model", str(tiny_model_dir), "--bootstrap", "tcp://127.0.0.1:9")
    assert one_error_line(out).startswith("error: no bootstrap contact could be used (tcp://127.0.0.1:9: insecure: "
                                          "no CURVE key for this bootstrap")


def test_generate_for_another_model_than_the_swarm_s_says_so(tiny_model_dir, small12_model_dir, cluster_factory):
    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 4))])
    out = invoke_cli("generate", "x", "--model", str(small12_model_dir), "--bootstrap", swarm.addresses[0])
    line = one_error_line(out)
    assert "no peer serves layers 0:12" in line and f"{swarm.addresses[0]}: knows no peer of model" in line


def test_generate_zero_new_tokens_asks_no_peer(tiny_model_dir):
    # no node listens there: any session would fail
    args = ["generate", "To be", "--model", str(tiny_model_dir), "--peers", "tcp://127.0.0.1:9",
            "--max-new-tokens", "0", "--timeout", "2"]
    out, out_json = invoke_cli(*args), invoke_cli(*args, "--json")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "To be\n"
    out = out_json
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["ids"] == []


def test_generate_takes_a_file_of_prompts_at_once(tiny_model_dir, cluster_factory, tmp_path):
    """--prompts-file: every non-empty line a prompt, generated in step (generate_batch); with
    --json one object a line in the file's order, each as the prompt alone gives it; without,
    each prompt and its text, an empty line between two. PROMPT and the file, or neither, or a
    file of no prompt, are usage errors before any peer is asked."""
    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 2)), NodeSpec((2, 4))])
    prompts = ["ROMEO:", "JULIET: O Romeo", "To be"]
    path = tmp_path / "prompts.txt"
    path.write_text(prompts[0] + "\n\n" + "\n".join(prompts[1:]) + "\n")
    common = ["--model", str(tiny_model_dir), "--peers", ",".join(swarm.addresses), "--temperature", "0",
              "--max-new-tokens", "6"]
    out, text = run_clis(["generate", "--prompts-file", str(path), "--at-once", "2", "--json", *common],
                         ["generate", "--prompts-file", str(path), *common])
    assert out.returncode == 0, out.stderr
    results = [json.loads(line) for line in out.stdout.splitlines()]
    local = SwarmModel.local(tiny_model_dir)
    alone = [local.generate(p, 6, SamplingParams(temperature=0)) for p in prompts]
    assert [r["prompt"] for r in results] == prompts
    assert [r["ids"] for r in results] == [a.ids for a in alone] and all(r["route"] for r in results)
    assert "3 prompts, 18 tokens" in out.stderr
    assert [n for n in range(1, 4) if f"[{n}/3 prompts done]" in out.stderr] == [1, 2, 3]  # progress
    assert text.returncode == 0, text.stderr
    assert text.stdout == "\n\n".join(p + a.text for p, a in zip(prompts, alone)) + "\n"
    for args, said in [(["generate", "ROMEO:", "--prompts-file", str(path)], "one of them"),
                       (["generate"], "one of them"),
                       (["generate", "ROMEO:", "--at-once", "2"], "--at-once goes with --prompts-file")]:
        refused = invoke_cli(*args, "--model", str(tiny_model_dir), "--peers", "tcp://127.0.0.1:9")
        assert refused.returncode == 2 and said in refused.stderr, refused.stderr
    (tmp_path / "empty.txt").write_text("\n  \n")
    refused = invoke_cli("generate", "--prompts-file", str(tmp_path / "empty.txt"), "--model", str(tiny_model_dir),
                         "--peers", "tcp://127.0.0.1:9")
    assert refused.returncode == 2 and "holds no prompt" in refused.stderr
    (tmp_path / "long.txt").write_text("ROMEO:\n\n" + "word " * 200 + "\n")  # which prompt (review185)
    for where in (["--local"], ["--bootstrap", "tcp://127.0.0.1:9", "--timeout", "1"]):
        # checked before a swarm is asked: a peer that is not there is not what is reported
        refused = invoke_cli("generate", "--prompts-file", str(tmp_path / "long.txt"), "--model",
                             str(tiny_model_dir), *where)
        assert one_error_line(refused) == ("error: --prompts-file line 3: prompt is 201 tokens; the model's "
                                           "context is 128")
        assert refused.returncode == 1 and refused.stdout == ""
    refused = invoke_cli("generate", " ".join(["word"] * 129), "--model", str(tiny_model_dir), "--bootstrap",
                         "tcp://127.0.0.1:9", "--timeout", "1")
    assert one_error_line(refused) == "error: prompt is 129 tokens; the model's context is 128"
    assert refused.returncode == 1 and refused.stdout == ""
    (tmp_path / "latin1.txt").write_bytes(b"ROMEO:\ncaf\xe9\n")
    refused = invoke_cli("generate", "--prompts-file", str(tmp_path / "latin1.txt"), "--model", str(tiny_model_dir),
                         "--local")
    assert one_error_line(refused).startswith(f"error: --prompts-file {tmp_path / 'latin1.txt'}: not UTF-8 text")
    assert refused.returncode == 2


def test_generate_prints_each_prompts_result_as_soon_as_those_before_it_are_done(tiny_model_dir, cluster_factory,
                                                                                 tmp_path):
    """--prompts-file with --at-once 1 through a slow node: the first prompt's result is on
    stdout while the later ones still run (it waited for every prompt), each as alone; a
    SIGTERM then ends the command (143), the results printed standing."""
    from conftest import SwarmWithALiar

    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 2)), NodeSpec((2, 4), args=[
        "--dishonest", "--slow", "0.1"])], cluster=SwarmWithALiar)
    prompts = ["ROMEO:", "JULIET: O Romeo", "To be", "Once upon"]
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(prompts) + "\n")
    gen = subprocess.Popen([*CLI, "generate", "--prompts-file", str(path), "--at-once", "1", "--json", "--model",
                            str(tiny_model_dir), "--peers", ",".join(swarm.addresses), "--temperature", "0",
                            "--max-new-tokens", "8"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = json.loads(gen.stdout.readline())  # each prompt takes ~0.8 s at the slow node
        running = gen.poll() is None
        gen.send_signal(signal.SIGTERM)
        rest, err = gen.communicate(timeout=60)
    finally:
        gen.kill()
    assert running and gen.returncode == 143, err
    local = SwarmModel.local(tiny_model_dir)
    printed = [first] + [json.loads(line) for line in rest.splitlines()]
    assert 1 <= len(printed) < len(prompts)
    assert [r["ids"] for r in printed] == [local.generate(p, 8, SamplingParams(temperature=0)).ids
                                           for p in prompts[:len(printed)]]


def test_generate_with_its_stdout_full_still_stops_on_sigterm(tiny_model_dir, cluster_factory, tmp_path):
    """Review181: --prompts-file writing into a small pipe nobody reads: once the writes block,
    SIGTERM still ends the command (143) within seconds; the results were written from a batch
    thread, which no signal cuts, and the command waited for it for good."""
    import fcntl

    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 2)), NodeSpec((2, 4))])
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(f"Prompt number {i} says" for i in range(40)) + "\n")
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)
    err_path = tmp_path / "stderr"
    with open(err_path, "w") as err:
        gen = subprocess.Popen([*CLI, "generate", "--prompts-file", str(path), "--at-once", "4", "--json", "--model",
                                str(tiny_model_dir), "--peers", ",".join(swarm.addresses), "--temperature", "0",
                                "--max-new-tokens", "24"], stdout=write_end, stderr=err, stdin=subprocess.DEVNULL)
    os.close(write_end)
    try:
        said, still = "", 0.0
        deadline = time.monotonic() + 60
        while still < 1.5 and time.monotonic() < deadline:  # its writes blocked: nothing more said
            time.sleep(0.25)
            now = err_path.read_text()
            still = still + 0.25 if now == said and "prompts done]" in now else 0.0
            said = now
        assert gen.poll() is None and "[40/40 prompts done]" not in said, said[-300:]
        gen.send_signal(signal.SIGTERM)
        assert gen.wait(timeout=20) == 143
    finally:
        gen.kill()
        os.close(read_end)


def generate_into_a_full_stderr(model_dir, swarm, tmp_path, timeout: str) -> tuple[subprocess.Popen, int, int]:
    """`generate --prompts-file` (3,000 prompts, 4 at once) with stderr a 4 KiB pipe nobody
    reads, once its progress lines have filled it: the process, the pipe's read end, and the
    bytes waiting in it."""
    import fcntl
    import termios

    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(f"Prompt number {i} says" for i in range(3000)) + "\n")
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)
    gen = subprocess.Popen([*CLI, "generate", "--prompts-file", str(path), "--at-once", "4", "--model", str(model_dir),
                            "--peers", ",".join(swarm.addresses), "--temperature", "0", "--max-new-tokens", "4",
                            "--timeout", timeout], stdout=subprocess.DEVNULL, stderr=write_end,
                           stdin=subprocess.DEVNULL)
    os.close(write_end)
    deadline, waiting = time.monotonic() + 60, 0
    while waiting < 4000 and time.monotonic() < deadline:
        time.sleep(0.2)
        waiting = int.from_bytes(fcntl.ioctl(read_end, termios.FIONREAD, b"\0" * 4), "little")
    return gen, read_end, waiting


def test_generate_with_its_stderr_full_still_stops_on_sigterm(tiny_model_dir, cluster_factory, tmp_path):
    """Review182: --prompts-file with stderr a small pipe nobody reads, and a node killed under
    the batch, so its generations fail over and log warnings from their threads: SIGTERM still
    ends the command (143). A batch thread blocked writing into the full pipe held the stream's
    lock and itself, and the command outlived every signal but SIGKILL; the records now wait for
    the main thread."""
    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 4)), NodeSpec((0, 4))])
    gen, read_end, waiting = generate_into_a_full_stderr(tiny_model_dir, swarm, tmp_path, timeout="5")
    try:
        assert waiting >= 4000 and gen.poll() is None
        from conftest import sessions_on

        busiest = max(range(2), key=lambda i: sessions_on(swarm.addresses[i]))
        swarm.kill(busiest, signal.SIGKILL)  # its sessions fail over: warnings from the batch's threads
        time.sleep(2)
        gen.send_signal(signal.SIGTERM)
        assert gen.wait(timeout=20) == 143
    finally:
        gen.kill()
        os.close(read_end)


def test_a_second_ctrl_c_in_a_batch_says_what_it_waits_for(tiny_model_dir, cluster_factory, tmp_path):
    """Review183: --prompts-file stopped by Ctrl-C while its node is frozen (its steps wait for
    the timeout): a second Ctrl-C is told, at once, that the command waits for the steps under
    way (the warning waited in the queue of other threads' records, and was dropped), and the
    command ends with 130 once they time out."""
    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 4))])
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(f"Prompt {i} says" for i in range(500)) + "\n")
    err_path = tmp_path / "stderr"
    with open(err_path, "w") as err:
        gen = subprocess.Popen([*CLI, "generate", "--prompts-file", str(path), "--at-once", "4", "--model",
                                str(tiny_model_dir), "--peers", ",".join(swarm.addresses), "--temperature", "0",
                                "--max-new-tokens", "20", "--timeout", "4"], stdout=subprocess.DEVNULL, stderr=err)
    node = swarm.nodes[0].proc.pid
    try:
        deadline = time.monotonic() + 60
        while "prompts done" not in err_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        os.kill(node, signal.SIGSTOP)
        time.sleep(0.3)
        gen.send_signal(signal.SIGINT)
        time.sleep(0.5)
        gen.send_signal(signal.SIGINT)
        time.sleep(1.0)
        assert "stopping: waiting for the batch's steps under way" in err_path.read_text()
        assert gen.poll() is None  # (the steps under way wait for their timeout)
        assert gen.wait(timeout=30) == 130
    finally:
        os.kill(node, signal.SIGCONT)
        gen.kill()


def test_a_second_ctrl_c_in_a_batch_with_stderr_full_ends_it_still(tiny_model_dir, cluster_factory, tmp_path):
    """Review184: the same with stderr a small pipe nobody reads: the second Ctrl-C's warning,
    written by the main thread, blocked in the full pipe after the batch had ended (a third was
    needed); it is queued, and dropped, when a stream is full."""
    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 4))])
    gen, read_end, waiting = generate_into_a_full_stderr(tiny_model_dir, swarm, tmp_path, timeout="4")
    node = swarm.nodes[0].proc.pid
    try:
        assert waiting >= 4000 and gen.poll() is None
        os.kill(node, signal.SIGSTOP)
        time.sleep(0.3)
        gen.send_signal(signal.SIGINT)
        time.sleep(0.5)
        gen.send_signal(signal.SIGINT)
        assert gen.wait(timeout=30) == 130
    finally:
        os.kill(node, signal.SIGCONT)
        gen.kill()
        os.close(read_end)


def test_shard_refuses_bad_input_in_one_line(tmp_path):
    import pickle

    from nanoswarm.shards.model import ModelConfig

    (tmp_path / "text.pt").write_text("{}")
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "code.pt").write_bytes(pickle.dumps(os.system, protocol=2))  # unpickled: a callable
    os.mkfifo(tmp_path / "fifo.pt")  # reading it would wait forever
    chars = ModelConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=65, block_size=16, gelu="exact")
    save_nanogpt_checkpoint(chars, GPT(chars).flat_state_dict(), tmp_path / "chars.pt")
    torch.manual_seed(0)
    save_nanogpt_checkpoint(TINY, GPT(TINY).flat_state_dict(), tmp_path / "ckpt.pt")
    cases = {"text.pt": "not a torch checkpoint (torch.save writes a zip archive)",
             "empty.pt": "empty file", "fifo.pt": "fifo.pt: not a regular file or a directory",
             "code.pt": "not a checkpoint of plain tensors and settings (Trying to load unsupported GLOBAL",
             "chars.pt": "vocab_size 65 is smaller than the GPT-2 tokenizer's 50257 ids"}
    for name, why in cases.items():
        line = one_error_line(invoke_cli("shard", str(tmp_path / name), str(tmp_path / "m")), logs=True)
        assert why in line and "weights_only=False" not in line, line
    # option errors name the option and exit 2, as click's own do; the last in a process of its
    # own, as a user runs it (its stderr holds the progress lines)
    heads = invoke_cli("shard", str(tmp_path / "ckpt.pt"), str(tmp_path / "m"), "--head-groups", "5")
    overlap = invoke_cli("shard", str(tmp_path / "ckpt.pt"), str(tmp_path / "m"), "--heads", "1:4,0:2")
    syntax = run_cli("shard", str(tmp_path / "ckpt.pt"), str(tmp_path / "m"), "--heads", "0:2,x")
    assert [o.returncode for o in (heads, overlap, syntax)] == [2, 2, 2]
    assert "'--head-groups': head groups must be from 1 to 4, got 5" in one_error_line(heads, logs=True)
    assert ("'--heads': head splits 1:4,0:2 must partition 0:4 into non-empty ranges"  # as given
            in one_error_line(overlap, logs=True))
    assert "'--heads': head splits '0:2,x' must look like 0:6,6:12" in one_error_line(syntax, logs=True)
    assert "reading checkpoint" not in syntax.stderr  # refused before the checkpoint is read
    empty = invoke_cli("shard", str(tmp_path / "ckpt.pt"), str(tmp_path / "m"), "--heads", " ")  # was: none given
    assert empty.returncode == 2 and "'--heads': names no head range" in one_error_line(empty, logs=True)
    assert not (tmp_path / "m").exists()


def test_shard_checks_heads_and_vocabulary_against_the_config_before_reading_weights(tmp_path):
    """A Hugging Face directory's config.json is enough to refuse a head split or a vocabulary:
    the weights (gigabytes for a large GPT-2) are not read first. Here they are junk, so a check
    made after reading them would fail on the junk instead."""
    hf = tmp_path / "hf"
    hf.mkdir()
    config = {"model_type": "gpt2", "n_layer": 2, "n_head": 4, "n_embd": 64, "vocab_size": 50257, "n_positions": 32}
    (hf / "config.json").write_text(json.dumps(config))
    (hf / "model.safetensors").write_bytes(b"not safetensors at all")
    heads = invoke_cli("shard", str(hf), str(tmp_path / "m"), "--heads", "0:2,2:6")
    groups = invoke_cli("shard", str(hf), str(tmp_path / "m"), "--head-groups", "5")
    assert [heads.returncode, groups.returncode] == [2, 2]
    assert "'--heads': head splits 0:2,2:6 must cover all heads 0:4" in one_error_line(heads, logs=True)
    assert "'--head-groups': head groups must be from 1 to 4, got 5" in one_error_line(groups, logs=True)
    (hf / "config.json").write_text(json.dumps({**config, "vocab_size": 65}))
    vocab = invoke_cli("shard", str(hf), str(tmp_path / "m"))
    assert "vocab_size 65 is smaller than the GPT-2 tokenizer's 50257 ids" in one_error_line(vocab, logs=True)
    (hf / "config.json").write_text(json.dumps(config))  # the weights are read only now
    assert "not a readable safetensors file" in one_error_line(invoke_cli("shard", str(hf), str(tmp_path / "m")),
                                                              logs=True)
    assert not (tmp_path / "m").exists()


def test_shard_writes_into_a_full_directory_only_when_asked(tmp_path):
    """OUT_DIR is checked before the checkpoint is read: a file, or a directory with anything in
    it, is refused without --overwrite (an earlier model's files would go, or shards would land
    beside the checkpoint); with it, the earlier model's shard files go and the others stay."""
    torch.manual_seed(0)
    save_nanogpt_checkpoint(TINY, GPT(TINY).flat_state_dict(), tmp_path / "ckpt.pt")
    (tmp_path / "afile").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    (tmp_path / "full" / "blocks-0-9.safetensors").write_bytes(b"an earlier model's")
    (tmp_path / "empty").mkdir()
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    refusals = {"afile": "afile is not a directory: give a new or empty directory as OUT_DIR",
                "dangling": "dangling is a symbolic link to nothing",
                "full": "full is not empty: pass --overwrite to write the model there",
                "ckpt.pt/m": "ckpt.pt is not a directory"}
    for out_dir, why in refusals.items():
        out = invoke_cli("shard", str(tmp_path / "ckpt.pt"), str(tmp_path / out_dir))
        line = one_error_line(out, logs=True)
        assert why in line and "reading checkpoint" not in out.stderr, out.stderr
    assert sorted(os.listdir(tmp_path / "full")) == ["blocks-0-9.safetensors", "notes.txt"]
    for out_dir, extra in (("empty", ()), ("new/m", ()), ("full", ("--overwrite",))):
        out = invoke_cli("shard", str(tmp_path / "ckpt.pt"), str(tmp_path / out_dir), *extra)
        assert out.returncode == 0, out.stderr
        assert (tmp_path / out_dir / "manifest.json").is_file()
    assert (tmp_path / "full" / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "full" / "blocks-0-9.safetensors").exists()
    again = invoke_cli("shard", str(tmp_path / "ckpt.pt"), str(tmp_path / "empty"))  # now holds a model
    assert "empty is not empty: pass --overwrite" in one_error_line(again, logs=True)
    assert not [p for p in tmp_path.rglob("*.probe")]


def test_node_names_a_shard_with_wrong_tensors(tiny_model_dir, tmp_path):
    import shutil

    from safetensors.torch import load, save
    from test_shards import rewrite_file

    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    sd = load((copy / "blocks-1-2.safetensors").read_bytes())
    sd["h.1.attn.c_attn.weight"] = torch.zeros(10, 64)
    rewrite_file(copy, "blocks-1-2.safetensors", save(sd))  # the hash matches, the tensors do not
    out = invoke_cli("node", str(copy), "--layers", "0:2", "--insecure", "--key-file", str(tmp_path / "k.key"))
    line = one_error_line(out, logs=True)
    assert line.startswith("error: blocks-1-2.safetensors: tensors do not match the manifest")
    assert "h.1.attn.c_attn.weight has shape (10, 64)" in line


def test_node_refuses_a_shard_linked_to_dev_zero(tiny_model_dir, tmp_path):
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    (copy / "blocks-1-2.safetensors").unlink()
    os.symlink("/dev/zero", copy / "blocks-1-2.safetensors")
    # the memory limit keeps a regression (reading /dev/zero without end) from hurting the machine
    out = subprocess.run(["bash", "-c", 'ulimit -v 4000000; exec "$@"', "_", *CLI, "node", str(copy),
                          "--layers", "0:2", "--insecure", "--key-file", str(tmp_path / "k.key")],
                         capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    line = one_error_line(out, logs=True)
    assert "blocks-1-2.safetensors" in line and "not a regular file" in line


def test_an_error_without_a_message_still_says_something(tmp_path, monkeypatch):
    """MemoryError() has an empty str: the line names the type rather than say nothing."""
    from nanoswarm.shards import loaders

    def out_of_memory(*_args, **_kwargs):
        raise MemoryError()

    monkeypatch.setattr(loaders, "load_checkpoint", out_of_memory)
    (tmp_path / "ckpt.pt").write_bytes(b"")
    result = invoke_cli("shard", str(tmp_path / "ckpt.pt"), str(tmp_path / "m"))
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == "error: MemoryError"  # (after shard's progress lines)


def test_option_errors_of_the_top_level_command_fail_in_one_line():
    """Parsed before any subcommand runs: click's own handler would print its usage block."""
    out = run_cli("--bogus", timeout=60)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().splitlines() == ["error: No such option '--bogus'. Did you mean '--verbose'?"]
    cases = (["--help"], [], ["keys"])  # help is no failure, asked for or not
    for args, out in zip(cases, run_clis(*cases, timeout=60)):
        assert out.returncode == 0 and "Commands:" in out.stdout and out.stderr == "", args


def test_the_command_line_imports_torch_only_for_a_command_that_uses_it():
    """`nanoswarm --help`, `keys` and every option error took ~2.5 s here: cli/params.py took two
    bounds from modules that import torch (protocol/bounds.py holds them now)."""
    code = "import sys, nanoswarm.cli; print(sorted(m for m in ('torch', 'numpy', 'zmq') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "torch" not in out.stdout, out.stdout + out.stderr


def test_harness_counts_are_checked_before_any_node_starts(tiny_model_dir):
    """--threads 0 was passed on to each node, which refused it: cluster then blamed the node."""
    model = str(tiny_model_dir)
    cases = ((["cluster", model, "--nodes", "0"], "'--nodes': 0 is not in the range x>=1"),
             (["cluster", model, "--threads", "0"], "'--threads': 0 is not in the range 1<=x<=1024"),
             (["demo", "--model", model, "--nodes", "0"], "'--nodes': 0 is not in the range x>=1"))
    for (_, why), out in zip(cases, run_clis(*(args for args, _ in cases), timeout=60)):
        assert why in one_error_line(out) and out.stdout == "", out.stderr


def test_a_second_node_with_the_same_key_file_is_refused(tiny_model_dir, cluster_factory, tmp_path):
    """One identity at two endpoints: each record would replace the other's in every table."""
    from nanoswarm.node.cluster import NodeSpec

    key = tmp_path / "node.key"
    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 2), args=["--key-file", str(key)])])
    out = run_cli("node", str(tiny_model_dir), "--layers", "2:4", "--key-file", str(key), timeout=60)
    line = one_error_line(out, logs=True)
    assert line.startswith(f"error: key file {key} (peer id ") and "give each node its own --key-file" in line
    assert swarm.nodes[0].proc.poll() is None  # the first node serves on


def test_generate_says_why_the_peers_it_was_given_were_not_used(tiny_model_dir):
    key = "ab" * 32
    from nanoswarm.client.route import RouteError

    model = SwarmModel.connect(tiny_model_dir, peers=["garbage", f"tcp://127.0.0.1:99999#{key}", "tcp://127.0.0.1:9"])
    with pytest.raises(RouteError) as info, model:  # the library uses what it can, and says why not the rest
        model.generate("x", 1)
    line = str(info.value)
    assert line.startswith("no peer serves layers 0:4; not used: garbage: bad_contact: 'garbage' is not")
    assert f"tcp://127.0.0.1:99999#{key}: bad_contact: 'tcp://127.0.0.1:99999': the port must be 1-65535" in line
    assert "tcp://127.0.0.1:9: insecure: no CURVE key" in line
    out = invoke_cli("generate", "x", "--model", str(tiny_model_dir), "--timeout", "2", "--peers", "tcp://127.0.0.1:9")
    assert "not used: tcp://127.0.0.1:9: insecure: no CURVE key" in one_error_line(out, logs=True)
    # The command refuses a contact that is no contact at once, before the model loads (review83:
    # a look-alike letter pasted into a key was found late, in Python's words)
    for contact, why in (("garbage", "'garbage' is not a TCP endpoint tcp://HOST:PORT"),
                         (f"tcp://127.0.0.1:99999#{key}", "the port must be 1-65535"),
                         ("tcp://127.0.0.1:9#" + "\u0435" * 64, "the key after '#' is not valid hex")):
        for option in ("--peers", "--bootstrap"):
            out = invoke_cli("generate", "x", "--model", str(tiny_model_dir), option, f"tcp://127.0.0.1:9,{contact}")
            line = one_error_line(out)
            assert out.returncode == 2 and line.startswith(f"error: Invalid value for '{option}': ") and why in line
    for args in (["peers", "--bootstrap"], ["load", str(tiny_model_dir), "--peers"]):
        out = invoke_cli(*args, "tcp://127.0.0.1:9#" + "\u0435" * 64)
        assert out.returncode == 2 and "the key after '#' is not valid hex" in one_error_line(out)
    for bad in ("0", "-1", "nan", "inf"):
        out = invoke_cli("generate", "x", "--model", str(tiny_model_dir), "--peers", "tcp://127.0.0.1:9",
                         "--timeout", bad)
        assert "must be a positive, finite number of seconds" in one_error_line(out)



def test_a_route_that_fails_for_a_peer_it_could_not_use_says_so_once(tmp_path, cluster_factory):
    """A peer left out while the others do not cover every block is named in the error line only:
    it was also logged as a warning before, two lines saying the same (a walkthrough review)."""
    from dataclasses import replace

    from conftest import make_model_dir

    from nanoswarm.keys.contact import endpoint_of

    # A context of 2,048 positions, so that the generation killed midway below is still running
    # when its node dies: the tiny model's 128 took well under a second (review127; the same
    # race failed test_signals_end_commands_as_ctrl_c_does twice in CI).
    model_dir = make_model_dir(tmp_path / "long", replace(TINY, block_size=2048), layers_per_shard=2)
    swarm = cluster_factory(model_dir, [NodeSpec((0, 2)), NodeSpec((2, 4))])
    keyless = endpoint_of(swarm.addresses[0])
    out = invoke_cli("generate", "x", "--model", str(model_dir), "--timeout", "5",
                     "--peers", f"{keyless},{swarm.addresses[1]}")  # (its log lines go to its stderr too)
    line = one_error_line(out)
    assert line.startswith("error: no peer serves layers 0:2") and f"{keyless}: insecure: no CURVE key" in line
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    # --json prints a generation's partial result only once it began: not for a bad prompt
    out = invoke_cli("generate", "x " * 2100, "--model", str(model_dir), "--json",
                     "--peers", ",".join(swarm.addresses))
    assert "tokens; the model's context is" in one_error_line(out) and out.stdout == ""
    # Failed midway (the only peer of blocks 2:4 killed): what came so far, and why it ended
    probe = PeerConnection(swarm.addresses[1], timeout=10)
    try:
        before = probe.request("info").fields["stats"]["tokens"]
        gen = subprocess.Popen([*CLI, "generate", "To be", "--model", str(model_dir), "--json", "--peers",
                                ",".join(swarm.addresses), "--max-new-tokens", "100000", "--temperature", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while probe.request("info").fields["stats"]["tokens"] < before + 3 and time.monotonic() < deadline:
            time.sleep(0.002)
    finally:
        probe.close()
    swarm.kill(1, signal.SIGKILL)
    out, err = gen.communicate(timeout=60)
    assert out, err
    failed = json.loads(out)
    assert gen.returncode == 1 and failed["stop_reason"] == "" and failed["ids"]
    assert "no peer serves layers 2:4" in failed["error"] and err.splitlines()[-1] == f"error: {failed['error']}"

def test_node_refuses_addresses_no_peer_could_use(tiny_model_dir, tmp_path):
    """Checked before anything loads: the listen address is advertised in the node's record, and a
    bootstrap that cannot work would be retried every gossip round."""
    cases = ((["--listen", "tcp://127.0.0.1:99999"], "error: --listen: 'tcp://127.0.0.1:99999': the port"),
             (["--listen", "tcp://0.0.0.0:5555"], "error: --listen tcp://0.0.0.0:5555: peers connect to"),
             (["--listen", "tcp://127.0.0.1:0x1"], "error: --listen: 'tcp://127.0.0.1:0x1' is not a TCP"),
             (["--bootstrap", "garbage"], "error: --bootstrap: 'garbage' is not a TCP endpoint"),
             (["--bootstrap", "tcp://h:1#zz"], "error: --bootstrap: contact 'tcp://h:1#zz': expected a"))
    outs = [invoke_cli("node", str(tiny_model_dir), "--layers", "0:2", "--key-file", str(tmp_path / f"k{i}.key"), *args)
            for i, (args, _) in enumerate(cases)]
    for (_, why), out in zip(cases, outs):
        assert one_error_line(out, logs=True).startswith(why) and out.returncode == 2, out.stderr  # usage errors


def test_a_directory_that_is_not_a_model_is_named_so_with_what_to_do(tmp_path):
    """Every command that takes a model directory says the same of one without a manifest, with
    the command that makes one, and exits 1 (review163: the bare file error, and bench exited 2)."""
    empty = tmp_path / "empty"
    empty.mkdir()
    why = (f"error: {empty} is not a model directory (it has no manifest.json): make one from a checkpoint "
           "with `nanoswarm shard CHECKPOINT DIR`")
    for args in (["node", str(empty), "--layers", "0:2", "--key-file", str(tmp_path / "k.key")],
                 ["cluster", str(empty), "--nodes", "2"], ["bench", "--model", str(empty), "--quick"],
                 ["generate", "--model", str(empty), "--peers", "tcp://127.0.0.1:9#" + "0" * 64, "hi"]):
        out = invoke_cli(*args)
        assert one_error_line(out, logs=True) == why and out.returncode == 1, (args, out.stderr)


def test_node_refuses_a_device_or_span_it_cannot_use_before_anything_else(tiny_model_dir, tmp_path):
    """Checked first: no key file is made and no shard is read for a node that cannot run."""
    import torch

    cases = [(["--device", "meta"], "error: --device 'meta': expected cpu, cuda or cuda:N"),
             (["--device", "cpu:1"], "error: --device 'cpu:1': expected cpu, cuda or cuda:N"),
             (["--layers", "0:9"], "error: block range 0:9 is outside 0:4"),
             (["--heads", "2:8"], "error: head range 2:8 is outside 0:4")]
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        cases.append((["--device", f"cuda:{n}"], f"error: --device cuda:{n}: torch sees {n} CUDA device"))
    else:
        cases.append((["--device", "cuda:0"], "error: --device cuda:0 was asked for, but torch sees no CUDA device"))
    key = tmp_path / "k.key"
    # the first in a process of its own, as a user runs it; the others in this one (faster)
    outs = [run_cli("node", str(tiny_model_dir), "--layers", "0:2", "--key-file", str(key), *cases[0][0], timeout=60),
            *(invoke_cli("node", str(tiny_model_dir), "--layers", "0:2", "--key-file", str(key), *args)
              for args, _ in cases[1:])]
    for (args, why), out in zip(cases, outs):
        assert one_error_line(out).startswith(why), out.stderr
        assert out.returncode == (2 if args[0] in ("--layers", "--heads") else 1)  # ranges: usage errors
    assert not key.exists()


@pytest.mark.slow
def test_train_prints_one_line_or_json(tmp_path):
    from nanoswarm.shards.train import DEFAULT_TEXT

    text = tmp_path / "text.txt"
    text.write_text(DEFAULT_TEXT.read_text()[:20_000])
    args = ["train", "--text", str(text), "--out", str(tmp_path / "ckpt.pt"), "--n-layer", "1", "--n-head", "1",
            "--n-embd", "16", "--block-size", "16", "--max-iters", "2", "--batch-size", "2"]
    out = invoke_cli(*args)  # (in this process; the --json run below in one of its own)
    assert out.returncode == 0 and out.stdout.startswith(f"{tmp_path / 'ckpt.pt'}: ") and out.stdout.count("\n") == 1
    out = invoke_cli(*args, "--json")  # a second run must not silently replace the first one's model
    assert one_error_line(out) == (f"error: {tmp_path / 'ckpt.pt'} exists: pass --resume to continue it or "
                                   "--overwrite to replace it")
    out = run_cli(*args, "--json", "--overwrite")
    assert out.returncode == 0 and json.loads(out.stdout)["out_path"] == str(tmp_path / "ckpt.pt")
    # progress on stderr without -v: each eval point, and the end
    assert "iter     0 | eval: " in out.stderr and "done in " in out.stderr.splitlines()[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "text.txt"]  # no partial file left
    cases = ((["--max-iters", "-1"], "--max-iters"), (["--batch-size", "0"], "--batch-size"),
             (["--lr", "inf"], "--lr"), (["--n-embd", "0"], "--n-embd"))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 100)
    latin1_args = [*args[:1], "--text", str(tmp_path / "latin1.txt"), "--out", str(tmp_path / "x.pt"), *args[5:]]
    outs = [invoke_cli(*args, "--overwrite", *bad) for bad, _ in cases]
    latin1 = invoke_cli(*latin1_args)
    for (_, why), out in zip(cases, outs):
        assert out.returncode == 2 and why in one_error_line(out)
    assert one_error_line(latin1).startswith(f"error: {tmp_path / 'latin1.txt'}: not UTF-8 text")


def test_node_takes_every_address_form_peers_can_use(tmp_path, caplog):
    from nanoswarm.node.options import NodeOptions, check_contacts

    key = "ab" * 32
    with socket.socket() as s:  # a port nothing listens on (checked forms bind it for a moment)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for listen in ("tcp://127.0.0.1:*", "tcp://127.0.0.1:0", f"tcp://[::1]:{port}", f"tcp://localhost:{port}",
                   "tcp://localhost:*"):
        check_contacts(NodeOptions(tmp_path, listen=listen))
    # the node binds it now: an address of another machine failed only after the blocks had loaded
    # (a name that does not resolve likewise; not tried here: resolving it would ask a DNS server)
    with pytest.raises(ValueError, match="--listen: 192.0.2.1 is not an address of this machine"):
        check_contacts(NodeOptions(tmp_path, listen="tcp://192.0.2.1:*"))
    check_contacts(NodeOptions(tmp_path, bootstrap=[f"tcp://node_1:5555#{key}", f"tcp://[::1]:1#{key}"]))
    caplog.clear()
    check_contacts(NodeOptions(tmp_path, bootstrap=["tcp://127.0.0.1:5555"]))  # as an --insecure node prints it
    assert "gossip with it is not encrypted" in caplog.text


def test_node_refuses_an_advertise_its_listen_cannot_take(tmp_path, monkeypatch):
    """A node on 0.0.0.0 advertising an IPv6 address started without a word, and every peer found
    it refused (review94): an --advertise of one address family on a --listen that takes only the
    other is refused before anything loads. `*` and [::] take both; a name's family is not known
    here. A link-local --listen and any bind error are refused before the blocks load too."""
    import errno
    import re

    from nanoswarm.node.options import NodeOptions, check_contacts

    for listen, advertise, family in [("tcp://0.0.0.0:*", "tcp://[::1]:5555", 6),
                                      ("tcp://127.0.0.1:*", "tcp://[fd77::1]", 6),
                                      ("tcp://localhost:*", "tcp://[::1]", 6),
                                      ("tcp://[::1]:*", "tcp://127.0.0.1:5555", 4)]:
        with pytest.raises(ValueError, match=re.escape(f"--advertise {advertise} is an IPv{family} address, but "
                                                       f"--listen {listen} takes IPv{10 - family} connections only")):
            check_contacts(NodeOptions(tmp_path, listen=listen, advertise=advertise))
    for listen, advertise in [("tcp://*:*", "tcp://[::1]:5555"), ("tcp://[::]:*", "tcp://127.0.0.1:5555"),
                              ("tcp://0.0.0.0:*", "tcp://node-a:5555"), ("tcp://[::1]:*", "tcp://[::1]:5555"),
                              ("tcp://127.0.0.1:*", "tcp://192.0.2.7")]:
        check_contacts(NodeOptions(tmp_path, listen=listen, advertise=advertise))
    for listen in ("tcp://[fe80::1]:*", "tcp://[fe80::1%lo]:*"):
        with pytest.raises(ValueError, match="--listen: .* a link-local IPv6 address"):
            check_contacts(NodeOptions(tmp_path, listen=listen))

    def refused(sock, address):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(socket.socket, "bind", refused)
    with pytest.raises(ValueError, match=r"--listen tcp://127.0.0.1:0: cannot bind it \(Invalid argument\)"):
        check_contacts(NodeOptions(tmp_path, listen="tcp://127.0.0.1:*"))


def test_advertised_address_is_what_records_and_contacts_name(tiny_model_dir, cluster_factory, tmp_path):
    from nanoswarm.node.cluster import NodeSpec
    from nanoswarm.node.options import NodeOptions, advertised_address, check_contacts

    bound = "tcp://127.0.0.1:40001"
    assert advertised_address(None, bound) == bound
    assert advertised_address("tcp://203.0.113.5", bound) == "tcp://203.0.113.5:40001"
    assert advertised_address("tcp://203.0.113.5:*", bound) == "tcp://203.0.113.5:40001"
    assert advertised_address("tcp://node_1:7000", bound) == "tcp://node_1:7000"
    assert advertised_address("tcp://[2001:db8::1]", bound) == "tcp://[2001:db8::1]:40001"
    check_contacts(NodeOptions(tmp_path, listen="tcp://0.0.0.0:*", advertise="tcp://203.0.113.5"))
    for bad in ("tcp://0.0.0.0", "203.0.113.5", "tcp://a:b:c", "tcp://h:99999"):
        with pytest.raises(ValueError, match="--advertise"):
            check_contacts(NodeOptions(tmp_path, advertise=bad))
    for bad, why in (("203.0.113.5", r"tcp://HOST:PORT \(tcp:// is missing\)$"),  # (review191: "not a wildcard")
                     ("tcp://0.0.0.0", r"tcp://HOST:PORT: HOST not a wildcard, which no peer can reach$"),
                     ("tcp://a:b:c", r"tcp://HOST:PORT$")):
        with pytest.raises(ValueError, match=why):
            advertised_address(bad, bound)

    # a real node: it binds 127.0.0.1 and advertises the same machine by name
    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 4), args=["--advertise", "tcp://localhost"])])
    contact = swarm.addresses[0]
    assert contact.startswith("tcp://localhost:")
    peers = invoke_cli("peers", "--bootstrap", contact, "--json")
    out = invoke_cli("generate", "To be", "--model", str(tiny_model_dir), "--bootstrap", contact,
                     "--max-new-tokens", "4", "--temperature", "0")
    assert [p["address"] for p in json.loads(peers.stdout)["models"][0]["peers"]] == [contact.partition("#")[0]]
    assert out.returncode == 0 and out.stdout.startswith("To be"), out.stderr


def test_node_placement_and_gossip_options_are_checked(tiny_model_dir, tmp_path):
    """-1 s between rebalance checks made an idle node spin a core; 0 blocks served one."""
    cases = (("--rebalance-interval", "-1", "must be a positive, finite number of seconds"),
             ("--gossip-interval", "0", "must be a positive, finite number of seconds"),
             ("--ttl", "nan", "must be a positive, finite number of seconds"),
             ("--ttl", "1000", "--ttl must be in (0, 300] seconds"),
             ("--ttl", "2", "--ttl 2 is shorter than three --gossip-interval 1 (3 s)"),
             ("--gossip-interval", "30", "--ttl 60 is shorter than three --gossip-interval 30 (90 s)"),
             ("--gossip-interval", "0.01", "'0.01' is too small: at least 0.05"),
             ("--num-blocks", "0", "0 is not in the range 1<=x<=2147483647"),
             ("--num-blocks", "5", "--num-blocks 5: the model has 4 blocks, so from 1 to 4"),  # (review185)
             ("--memory-budget-mb", "0", "0 is not in the range 1<=x<=2147483647"))
    outs = [invoke_cli("node", str(tiny_model_dir), "--key-file", str(tmp_path / "k.key"), option, value)
            for option, value, _ in cases]
    for (_, _, why), out in zip(cases, outs):
        assert why in one_error_line(out) and out.returncode == 2, out.stderr  # usage errors (review191: 1)
    assert not (tmp_path / "k.key").exists()  # refused before a key file was made or blocks loaded


# Review216: mutations of cli/params.py that no test caught before.
def test_the_bounds_an_option_names_are_values_it_takes(tiny_model_dir, tmp_path):
    """'at least 0.05' takes 0.05 and 'at most 1000000' takes 1000000 (the refusals name them as
    bounds), and a half-open range may start at block 0: each gets past its option's parser, to
    the next check or to the command's work."""
    out = invoke_cli("node", str(tiny_model_dir), "--key-file", str(tmp_path / "k.key"), "--layers", "0:4",
                     "--gossip-interval", "0.05", "--ttl", "0.1")
    assert out.returncode == 2 and "--ttl 0.1 is shorter than three --gossip-interval 0.05" in one_error_line(out)
    assert not (tmp_path / "k.key").exists()
    out = invoke_cli("generate", "To be", "--model", str(tiny_model_dir), "--peers", "tcp://127.0.0.1:9",
                     "--max-new-tokens", "0", "--timeout", "1000000")
    assert out.returncode == 0 and out.stdout == "To be\n", out.stderr


def test_node_json_ready_line_and_an_ipv6_listen_address(tiny_model_dir, tmp_path):
    """`node --json` prints one JSON object once serving; `--listen tcp://[::1]:*` binds (ZeroMQ
    needs IPV6 set for it). Nothing connects to it: no traffic goes to any address."""
    proc = subprocess.Popen([*CLI, "node", str(tiny_model_dir), "--layers", "1:3", "--json", "--listen",
                             "tcp://[::1]:*", "--key-file", str(tmp_path / "k.key")],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        ready = json.loads(proc.stdout.readline())
        assert ready["listening"].startswith("tcp://[::1]:") and "#" in ready["listening"]
        assert ready["contact"] == ready["listening"]  # the field `cluster --json` has
        assert ready["layers"] == [1, 3] and ready["heads"] is None
        assert ready["peer_id"].startswith("ns-") and len(ready["model_id"]) == 64
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def test_node_refuses_a_port_in_use_before_making_a_key_or_loading_blocks(tiny_model_dir, tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = run_cli("node", str(tiny_model_dir), "--layers", "0:4", "--listen", f"tcp://127.0.0.1:{port}",
                      "--key-file", str(tmp_path / "k.key"), timeout=60)
    assert one_error_line(out) == f"error: --listen tcp://127.0.0.1:{port}: the port is in use by another process"
    assert not (tmp_path / "k.key").exists()


def test_a_node_takes_the_hard_open_file_limit(tiny_model_dir, tmp_path):
    """Each connection is a descriptor: at a soft limit of 1024, a thousand idle TCP connections
    left new clients unanswered. A node raises its soft limit to the hard one."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(256, soft)
    proc = subprocess.Popen([*CLI, "node", str(tiny_model_dir), "--layers", "0:4", "--json",
                             "--key-file", str(tmp_path / "k.key")], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True,
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard)))
    try:
        json.loads(proc.stdout.readline())  # serving
        line = next(x for x in open(f"/proc/{proc.pid}/limits") if x.startswith("Max open files"))
        soft_now = line.split()[3]
        assert (int(soft_now) >= 1 << 20 if hard == resource.RLIM_INFINITY else soft_now == str(hard)), line
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def test_generate_device_is_checked_before_any_peer_is_asked(tiny_model_dir):
    """`generate --device` puts the client's head there; one that does not exist fails in one line
    before connecting (here nothing listens at the contact: the check comes first)."""
    contact = "tcp://127.0.0.1:9#" + "ab" * 32
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    missing = (f"cuda:{gpus}", f"torch sees {gpus} CUDA device") if gpus else ("cuda", "torch sees no CUDA device")
    cases = (missing, ("tpu", "expected cpu, cuda or cuda:N"))
    outs = [invoke_cli("generate", "--model", str(tiny_model_dir), "--peers", contact, "--device", device, "hi")
            for device, _ in cases]
    for (_, why), out in zip(cases, outs):
        assert why in one_error_line(out)


@pytest.mark.parametrize("bad, why", [(["--max-sessions", "0"], "--max-sessions"), (["--layers", "0:99"], "0:99")],
                         ids=["refused by click", "refused after torch's import"])
def test_a_signal_while_a_command_exits_ends_it_without_a_traceback(tiny_model_dir, tmp_path, bad, why):
    """A node that load stopped (SIGTERM) while it was exiting by itself after a bad option
    printed a traceback: our handler raised Interrupted inside torch's atexit finalizers (a
    review). Here the signal comes in an exit hook that runs just before the first one the
    command registered (torch's, at its import) or, if it registered none, before ours."""
    script = ("import atexit, os, signal, time, sys\n"
              "import nanoswarm.cli\n"
              "kill = lambda: (os.kill(os.getpid(), signal.SIGTERM), time.sleep(2))\n"
              "register, armed = atexit.register, []\n"
              "def wrapped(f, *a, **k):\n"
              "    register(f, *a, **k)\n"
              "    if f is not nanoswarm.cli._quiet_exit and not armed:\n"
              "        armed.append(register(kill))\n"
              "    return f\n"
              "atexit.register = wrapped\n"
              "register(kill)\n"
              "sys.argv = ['nanoswarm', 'node', *sys.argv[1:]]\n"
              "nanoswarm.cli.main()\n")
    out = subprocess.run([sys.executable, "-c", script, str(tiny_model_dir), "--key-file", str(tmp_path / "k.key"),
                          *bad], capture_output=True, text=True, timeout=60)
    assert out.returncode == -signal.SIGTERM, (out.returncode, out.stderr)
    assert "Traceback" not in out.stderr and "Interrupted" not in out.stderr, out.stderr
    assert why in out.stderr.strip().splitlines()[-1], out.stderr


@contextlib.contextmanager
def _stdout_closed(*args: str):
    """`nanoswarm ARGS` whose stdout no one reads, until it warns so; yields (process, stderr
    lines so far), then SIGTERMs it, which must end it with code 0. The stderr lines grow by the
    rest of its stderr. (A watchdog: a command that serves without that warning hangs no run.)"""
    read_end, write_end = os.pipe()
    os.close(read_end)
    proc = subprocess.Popen([*CLI, *args], stdout=write_end, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            text=True)
    os.close(write_end)
    watchdog = threading.Timer(60, proc.kill)
    watchdog.start()
    err: list[str] = []
    try:
        for line in proc.stderr:
            err.append(line)
            if "stdout is closed" in line:
                break
        yield proc, err
    finally:
        proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    watchdog.cancel()
    err.append(proc.stderr.read())
    assert "Broken pipe" not in "".join(err)


def test_a_node_whose_stdout_is_closed_serves_on_quietly(tiny_model_dir, tmp_path):
    """A harness stopped by Ctrl-C while its nodes started closed the pipe a node was about to
    print its contact to: the node ended with "error: [Errno 32] Broken pipe" (a review). The
    line goes nowhere now, with a warning, and the node serves."""
    with _stdout_closed("node", str(tiny_model_dir), "--layers", "0:4", "--key-file", str(tmp_path / "k"),
                        "--listen", "tcp://127.0.0.1:*") as (_, err):
        contact = next(x.split("listening ")[1].strip() for x in err if "daemon: listening " in x)  # its log has it
        probe = PeerConnection(contact, timeout=30)
        try:
            assert probe.request("info").fields["layers"] == [0, 4]  # serving
        finally:
            probe.close()
    assert "stdout is closed: the line with the node's contact went nowhere" in "".join(err)
    # every log line names its level (an operator greps a long-running node's log for WARNING)
    assert any(" WARNING nanoswarm." in x and "stdout is closed" in x for x in err)
    assert any(" INFO nanoswarm.node.daemon: listening " in x for x in err)


def test_a_cluster_whose_stdout_is_closed_serves_on(tiny_model_dir):
    """`cluster | head -1`: the reader gone, the cluster ended with "error: [Errno 32] Broken
    pipe" and stopped every node, where a node serves on (a review). It serves on too."""
    with _stdout_closed("cluster", str(tiny_model_dir), "--nodes", "2") as (proc, err):
        time.sleep(1.0)
        assert proc.poll() is None, "".join(err)
    assert "stdout is closed: the lines with the nodes' contacts went nowhere" in "".join(err)


def test_generate_with_stdout_gone_says_so_in_one_line_or_writes_to_nowhere(tiny_model_dir):
    """A reader gone (`| head -c 3`) ends generate with one line that says so; stdout closed
    (`>&-`) is /dev/null. Each had failed in Python's words: "[Errno 32] Broken pipe" and "'NoneType'
    object has no attribute 'flush'"."""
    args = [*CLI, "generate", "x", "--model", str(tiny_model_dir), "--local", "--max-new-tokens", "4"]
    read_end, write_end = os.pipe()
    os.close(read_end)  # gone before the first word, so the test does not race the generation
    try:
        gone = subprocess.run(args, stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert gone.returncode == 1, gone.stderr
    assert gone.stderr.splitlines()[-1] == "error: stdout's reader has gone (broken pipe): output stopped"
    assert "Exception ignored" not in gone.stderr and gone.stderr.count("error:") == 1
    closed = subprocess.run(args, stdout=None, stderr=subprocess.PIPE, text=True, timeout=120,
                            preexec_fn=lambda: os.close(1))
    assert closed.returncode == 0 and "error" not in closed.stderr, closed.stderr
    assert closed.stderr.splitlines()[-1].startswith("[4 tokens, first after"), closed.stderr


def test_generates_summary_line_says_why_it_stopped_short(tiny_model_dir):
    """126 prompt tokens and 3 new ones fill a context of 128 (the last is sampled, not fed)."""
    out = invoke_cli("generate", " a" * 126, "--model", str(tiny_model_dir), "--local", "--max-new-tokens", "9")
    assert out.returncode == 0 and out.stderr.splitlines()[-1].startswith("[3 tokens, first after")
    assert out.stderr.splitlines()[-1].endswith(" tokens/s, the context is full]"), out.stderr
    out = invoke_cli("generate", "x", "--model", str(tiny_model_dir), "--local", "--max-new-tokens", "3")
    assert out.returncode == 0 and out.stderr.splitlines()[-1].endswith(" tokens/s]"), out.stderr


def test_generate_prints_a_file_of_prompts_run_locally(tiny_model_dir, tmp_path):
    """--prompts-file with --local runs the prompts one after another (no swarm to batch them on):
    each prompt and its text is printed still, in the file's order, with the progress lines."""
    prompts = ["ROMEO:", "To be"]
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(prompts) + "\n")
    out = invoke_cli("generate", "--prompts-file", str(path), "--model", str(tiny_model_dir), "--local",
                     "--temperature", "0", "--max-new-tokens", "4")
    assert out.returncode == 0, out.stderr
    local = SwarmModel.local(tiny_model_dir)
    alone = [local.generate(p, 4, SamplingParams(temperature=0)) for p in prompts]
    assert out.stdout == "\n\n".join(p + a.text for p, a in zip(prompts, alone)) + "\n"
    assert "[1/2 prompts done]" in out.stderr and "[2 prompts, 8 tokens" in out.stderr


# Mutation review213: gossip, its links, the harness, the daemon's start-up and options.
def test_spans_are_checked_at_their_bounds(tiny_model_dir):
    """check_span takes the whole model and refuses one past it or an empty range, before anything loads."""
    from nanoswarm.node.options import NodeOptions, check_span

    check_span(NodeOptions(tiny_model_dir, layers=(0, 4), heads=(0, 4)))
    check_span(NodeOptions(tiny_model_dir, num_blocks=4))  # every block: allowed
    for opts, why in ((NodeOptions(tiny_model_dir, layers=(0, 5)), "block range 0:5 is outside 0:4"),
                      (NodeOptions(tiny_model_dir, layers=(2, 2)), "block range 2:2 is outside 0:4"),
                      (NodeOptions(tiny_model_dir, heads=(0, 5)), "head range 0:5 is outside 0:4"),
                      (NodeOptions(tiny_model_dir, heads=(3, 3)), "head range 3:3 is outside 0:4"),
                      (NodeOptions(tiny_model_dir, num_blocks=5), "--num-blocks 5: the model has 4 blocks")):
        with pytest.raises(ValueError, match=why):
            check_span(opts)


def test_a_keyless_bootstrap_is_warned_about_only_on_a_node_that_encrypts(tmp_path, caplog):
    """An --insecure node's bootstraps print no key either: no warning for them."""
    import logging

    from nanoswarm.node.options import NodeOptions, check_contacts

    with caplog.at_level(logging.WARNING, logger="nanoswarm.node.options"):
        check_contacts(NodeOptions(tmp_path, bootstrap=["tcp://127.0.0.1:5555"], insecure=True))
        assert caplog.records == []  # an --insecure node's peers print no key
        check_contacts(NodeOptions(tmp_path, bootstrap=["tcp://127.0.0.1:5555"]))
    [warning] = caplog.records
    assert "--bootstrap tcp://127.0.0.1:5555 has no key" in warning.getMessage()


def test_local_refuses_a_bootstrap_as_it_refuses_peers(tiny_model_dir):
    """--local runs no swarm: a --bootstrap given with it is refused, not silently ignored (the
    text would come from this process while the user believed a swarm made it)."""
    for where in (["--bootstrap", "tcp://127.0.0.1:9"], ["--peers", "tcp://127.0.0.1:9"]):
        out = invoke_cli("generate", "x", "--model", str(tiny_model_dir), "--local", "--max-new-tokens", "1", *where)
        assert one_error_line(out) == "error: --local runs without a swarm: give it no --peers or --bootstrap"
        assert out.returncode == 2 and out.stdout == ""


def test_a_cluster_interrupted_while_starting_exits_as_interrupted(tiny_model_dir, monkeypatch):
    """Ctrl-C before every node serves: the nodes started so far are stopped and the command ends
    as interrupted (130), not with 0 as a cluster that ran and was stopped does."""
    from nanoswarm.node import cluster as node_cluster

    real, started = node_cluster.LocalCluster.start, []

    def start_then_ctrl_c(self):
        real(self)
        started.extend(n.pid for n in self.nodes)
        raise KeyboardInterrupt

    monkeypatch.setattr(node_cluster.LocalCluster, "start", start_then_ctrl_c)
    out = invoke_cli("cluster", str(tiny_model_dir), "--nodes", "2", "--json")
    assert out.returncode == 130 and out.stdout == "", out.stderr
    assert len(started) == 2 and all_gone(started)


def test_how_a_node_ended_is_said_from_its_return_code():
    """The cluster's line for a node that ended: an exit code (0 too: a node that left), or the
    signal that killed it, by name where it has one."""
    from nanoswarm.cli.harness import _ended

    assert [_ended(c) for c in (0, 1, -signal.SIGKILL, -signal.SIGRTMIN - 1)] == [
        "exited with code 0", "exited with code 1", "was killed by SIGKILL",
        f"was killed by signal {signal.SIGRTMIN + 1}"]


def test_train_json_is_the_summary_without_the_per_eval_history(tmp_path):
    """`train --json`: one object, the run's summary (paths, losses, settings), not the history of
    every eval point, which the progress lines on stderr already show."""
    from nanoswarm.shards.train import DEFAULT_TEXT

    text = tmp_path / "text.txt"
    text.write_text(DEFAULT_TEXT.read_text()[:20_000])
    out = invoke_cli("train", "--text", str(text), "--out", str(tmp_path / "ckpt.pt"), "--n-layer", "1", "--n-head",
                     "1", "--n-embd", "16", "--block-size", "16", "--max-iters", "2", "--batch-size", "2",
                     "--eval-interval", "1", "--json")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert "history" not in summary and out.stdout.count("\n") == 1
    assert summary["out_path"] == str(tmp_path / "ckpt.pt") and summary["max_iters"] == 2
    assert {"val_loss", "train_loss", "best_iter", "settings", "n_params"} <= set(summary)
    assert out.stderr.count("| eval: ") == 3  # iters 0, 1 and 2, on stderr


# Review221: mutations of the command line's top level and of files.py that no test caught.
def test_a_shard_that_cannot_be_written_whole_leaves_no_partial_file_and_says_why(tmp_path):
    """A write that fails part-way (a full disk; here the file-size limit) removes the
    temporary file it had begun, and the one error line names the file, not Python's
    "[Errno 27]"."""
    import resource

    torch.manual_seed(0)
    ckpt = tmp_path / "ckpt.pt"
    save_nanogpt_checkpoint(TINY, GPT(TINY).flat_state_dict(), ckpt)
    out_dir = tmp_path / "m"

    def small_files() -> None:  # (SIGXFSZ ignored: the write fails with EFBIG instead of killing it)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, resource.RLIM_INFINITY))

    out = subprocess.run([*CLI, "shard", str(ckpt), str(out_dir)], capture_output=True, text=True, timeout=120,
                         stdin=subprocess.DEVNULL, preexec_fn=small_files)
    last = out.stderr.strip().splitlines()[-1]
    assert out.returncode == 1 and last.startswith(f"error: cannot write {out_dir}/"), out.stderr
    assert last.endswith(": File too large") and "Errno" not in last and ".tmp" not in last, last
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == [ckpt]  # the part written went with the failure


def test_an_errors_line_is_one_line_its_shortage_first_and_a_traceback_only_when_debugging(tmp_path, monkeypatch):
    """A message of several lines (torch's are) is joined into one; an error a shortage of
    descriptors caused is told so first (it began "no peer serves ..." or "cannot read"); with
    NANOSWARM_DEBUG set the traceback is what comes out."""
    import errno

    from nanoswarm import descriptors
    from nanoswarm.shards import loaders

    def fails(*_args, **_kwargs):
        try:
            raise OSError(errno.EMFILE, "Too many open files")
        except OSError as e:
            raise RuntimeError("cannot read the checkpoint:\n    its second line\n") from e

    monkeypatch.setattr(descriptors, "_noted", -float("inf"))  # (no shortage seen lately in this process)
    monkeypatch.setattr(loaders, "load_checkpoint", fails)
    (tmp_path / "ckpt.pt").write_bytes(b"")
    result = invoke_cli("shard", str(tmp_path / "ckpt.pt"), str(tmp_path / "m"))
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == ("error: this process ran out of file descriptors: raise its limit "
                                              "(ulimit -n); cannot read the checkpoint: its second line")
    debug = subprocess.run([*CLI, "shard", str(tmp_path / "ckpt.pt"), str(tmp_path / "m")], capture_output=True,
                           text=True, timeout=120, stdin=subprocess.DEVNULL, env={**os.environ, "NANOSWARM_DEBUG": "1"})
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr, debug.stderr
    assert "empty file" in debug.stderr and "error:" not in debug.stderr


def test_every_command_takes_the_hard_open_file_limit_and_vv_says_so(tmp_path):
    """Not a node's alone: a client's links are descriptors too (review141). -vv logs it at
    debug level; -v (info) and no -v do not."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(256, soft)
    want = hard if hard != resource.RLIM_INFINITY else None
    outs = {}
    for i, flags in enumerate(([], ["-v"], ["-vv"])):
        out = subprocess.run([*CLI, *flags, "keys", "generate", "--out", str(tmp_path / f"k{i}.key")],
                             capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
                             preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard)))
        assert out.returncode == 0, out.stderr
        outs[" ".join(flags)] = [x for x in out.stderr.splitlines() if "file descriptor limit raised" in x]
    assert outs[""] == outs["-v"] == [] and len(outs["-vv"]) == 1, outs
    [line] = outs["-vv"]
    assert " DEBUG nanoswarm.cli: file descriptor limit raised from " in line, line
    assert line.endswith(f" from {low} to {want}") if want is not None else f" from {low} to " in line, line


def test_python_m_nanoswarm_cli_is_the_command_too():
    """`python -m nanoswarm.cli` (its docstring: the same as `nanoswarm`) runs the command."""
    outs = run_clis(["--version"], ["--bogus"])
    cli = [sys.executable, "-m", "nanoswarm.cli"]
    for args, out in zip((["--version"], ["--bogus"]), outs):
        again = subprocess.run([*cli, *args], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert (again.returncode, again.stdout, again.stderr) == (out.returncode, out.stdout, out.stderr), args
    assert outs[0].returncode == 0 and "nanoswarm, version " in outs[0].stdout and outs[1].returncode == 2


def test_a_commands_own_help_is_no_failure():
    """`nanoswarm node --help` ends in click's Exit(0), which the top level lets through: it was
    no "error: Exit" with exit code 1."""
    for command in ("node", "bench", "keys generate"):
        out = invoke_cli(*command.split(), "--help")
        assert (out.returncode, out.stderr) == (0, "") and out.stdout.startswith("Usage: "), (command, out)


def test_a_swallowed_signal_is_raised_again_once_whatever_came_before_it(monkeypatch):
    """Two signals recorded (a SIGTERM, then a SIGHUP a destructor swallowed): the last is
    raised again, and only once; what was left of the others is forgotten with it."""
    import nanoswarm.cli as cli

    monkeypatch.setattr(cli, "_raised", [signal.SIGTERM, signal.SIGHUP])
    with pytest.raises(cli.Interrupted) as raised:
        cli.raise_swallowed()
    assert raised.value.signum == signal.SIGHUP and str(raised.value) == "SIGHUP"
    cli.raise_swallowed()  # nothing left to raise
    cli._raised[:] = [signal.SIGTERM]
    cli.forget_signals()
    cli.raise_swallowed()
