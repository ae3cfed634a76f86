"""The harness's launcher: nodes forked from one process that has loaded torch already
(node/launcher.py), with the exit codes, output and departure of nodes started on their own."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import all_gone, children_of, pid_alive

from nanoswarm import START_CPUS, runtime_defaults
from nanoswarm.client.api import SwarmModel
from nanoswarm.client.generate import SamplingParams
from nanoswarm.node.cluster import HARNESS_ENV, LocalCluster, NodeSpec
from nanoswarm.node.launcher import ForkedNode, Launcher, launcher_for

NODE = [sys.executable, "-m", "nanoswarm", "node"]


def _default_env() -> dict:
    return runtime_defaults({**os.environ, "PYTHONUNBUFFERED": "1"})


def test_only_nodes_that_would_start_the_same_are_forked():
    default = _default_env()

    def forked(cmd: list[str], **changes: str) -> bool:
        return launcher_for(cmd, {**default, **changes}, default, HARNESS_ENV) is not None

    # What is read later, from the node's own environment, may differ.
    assert forked(NODE, **{HARNESS_ENV: "1", "TMPDIR": "/elsewhere", "PYTEST_CURRENT_TEST": "x"})
    # What Python, libgomp or oneDNN read as the process starts or torch loads may not.
    assert not forked(NODE, GOMP_SPINCOUNT="5")
    assert not forked(NODE, PYTHONHASHSEED="7")
    assert not forked(NODE, ONEDNN_PRIMITIVE_CACHE_CAPACITY="2")
    assert not forked(NODE, OMP_PLACES="{0},{1}", OMP_PROC_BIND="close")  # a node bound to cores
    assert not forked(NODE, NANOSWARM_FORK="0")
    assert not forked([sys.executable, "tests/dishonest_node.py"])  # not `python -m nanoswarm`


# Review216: a mutation of node/launcher.py that no test caught before.
def test_a_launcher_that_died_is_replaced_for_the_next_node():
    """A harness whose launcher died (killed, say: out of memory) gets a new one for the next
    node it starts, not the dead one, whose spawn() could only fail."""
    default = {**_default_env(), "NANOSWARM_REVIEW216": "own"}  # a launcher of this test's own
    first = launcher_for(NODE, default, default, HARNESS_ENV)
    again = None
    try:
        assert first is not None and first.alive and launcher_for(NODE, default, default, HARNESS_ENV) is first
        first.proc.kill()
        first.proc.wait(10)
        deadline = time.monotonic() + 10
        while first.alive and time.monotonic() < deadline:  # till its reader sees the socket end
            time.sleep(0.02)
        assert not first.alive
        again = launcher_for(NODE, default, default, HARNESS_ENV)
        assert again is not None and again is not first and again.alive and again.proc.poll() is None
    finally:
        for launcher in (first, again):
            if launcher is not None and launcher.proc.poll() is None:
                launcher.proc.kill()
                launcher.proc.wait(10)


def test_bound_and_other_nodes_start_on_their_own(tiny_model_dir, cluster_factory):
    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 2)), NodeSpec((2, 4), args=["--threads", "2"])],
                            threads=None)
    forked, bound = (n.proc for n in swarm.nodes)
    assert isinstance(forked, ForkedNode)
    assert isinstance(bound, subprocess.Popen) == (len(START_CPUS) >= 2)  # bound where it can be
    model = SwarmModel.connect(tiny_model_dir, peers=swarm.addresses)
    try:
        assert len(model.generate("To be", 3, SamplingParams(temperature=0)).ids) == 3
    finally:
        model.close()


def test_forked_nodes_report_exit_codes_and_output(tiny_model_dir):
    swarm = LocalCluster(tiny_model_dir, [NodeSpec((0, 4)), NodeSpec((0, 4))]).start()
    try:
        left, killed = (n.proc for n in swarm.nodes)
        assert isinstance(left, ForkedNode) and isinstance(killed, ForkedNode)
        assert left.poll() is None
        with pytest.raises(subprocess.TimeoutExpired):
            left.wait(0.2)
        killed.kill()
        assert killed.wait(10) == -signal.SIGKILL and killed.returncode == -signal.SIGKILL
        left.terminate()  # SIGTERM: the node leaves the swarm gracefully
        assert left.wait(15) == 0
        for node in swarm.nodes:  # their stdout pipes end with them (no copy of a write end kept)
            while node.lines.get(timeout=10) is not None:
                pass
    finally:
        swarm.stop()


def test_forked_nodes_leave_when_their_launcher_is_gone(tiny_model_dir, tmp_path):
    """Nodes watch their parent: for a forked node the launcher, which exits with the harness
    (test_cli.py test_signals_end_commands_as_ctrl_c_does kills a cluster with SIGKILL)."""
    launcher = Launcher(_default_env())  # not the shared one: other tests' nodes use it
    cmd = [*NODE, str(tiny_model_dir), "--layers", "0:4", "--listen", "tcp://127.0.0.1:*", "--insecure",
           "--key-file", str(tmp_path / "node.key")]
    with open(os.devnull, "w") as devnull:
        node = launcher.spawn(cmd, {**launcher.env, HARNESS_ENV: str(launcher.pid)}, devnull.fileno())
    try:
        assert node.stdout.readline().startswith("listening ")
        assert node.poll() is None
        launcher.proc.kill()
        launcher.proc.wait(10)
        assert node.wait(15) == 1  # its code is lost with the launcher; that it ended is not
        assert all_gone([node.pid])
    finally:
        if pid_alive(node.pid):
            os.kill(node.pid, signal.SIGKILL)
        node.stdout.close()


def test_a_request_the_launcher_cannot_serve_is_refused_and_it_serves_on(tiny_model_dir, tmp_path):
    """A request it cannot fork for (here malformed; a fork refused for want of processes takes
    the same path) is answered with the reason instead of ending the launcher and every node."""
    launcher = Launcher(_default_env())
    read_end, write_end = os.pipe()
    try:
        socket.send_fds(launcher._sock, [b'{"no": "request number"}'], [write_end, write_end])
        socket.send_fds(launcher._sock, [b'{"request": 1000}'], [write_end])  # one descriptor, not 2
        cmd = [*NODE, str(tiny_model_dir), "--layers", "0:4", "--listen", "tcp://127.0.0.1:*", "--insecure",
               "--key-file", str(tmp_path / "node.key")]
        with open(os.devnull, "w") as devnull:
            node = launcher.spawn(cmd, {**launcher.env, HARNESS_ENV: str(launcher.pid)}, devnull.fileno())
        assert node.stdout.readline().startswith("listening ")
        with launcher._cond:  # (reports come in order: that of request 1000 came before the node's)
            assert launcher._spawned.pop(1000) == "1 descriptors with the request, not 2"
        node.terminate()
        assert node.wait(15) == 0 and launcher.proc.poll() is None
    finally:
        os.close(read_end)
        os.close(write_end)
        launcher.proc.kill()
        launcher.proc.wait(10)


# Review216: mutations of node/launcher_process.py that no test caught before.
def test_a_forked_command_has_its_own_environment_and_exit_code(tmp_path):
    """A forked command sees the environment it was given, not what the launcher's has beside it
    (XDG_CONFIG_HOME, read as it runs, places the default key file), and its exit code is its
    own: 2 for a usage error, as a process of its own would end."""
    launcher = Launcher({**_default_env(), "XDG_CONFIG_HOME": str(tmp_path / "launchers")})
    env = {k: v for k, v in launcher.env.items() if k != "XDG_CONFIG_HOME"}
    env.update({"HOME": str(tmp_path / "home"), HARNESS_ENV: str(launcher.pid)})
    generate = [*NODE[:3], "keys", "generate", "--json"]
    refused = [*NODE[:3], "keys", "generate", "--out", str(tmp_path) + "/"]  # a directory: a usage error
    try:
        with open(os.devnull, "w") as devnull:
            made, bad = (launcher.spawn(cmd, env, devnull.fileno()) for cmd in (generate, refused))
        with made.stdout, bad.stdout:
            assert made.wait(30) == 0 and bad.wait(30) == 2
            key_file = tmp_path / "home" / ".config" / "nanoswarm" / "node.key"
            assert json.loads(made.stdout.read())["key_file"] == str(key_file) and key_file.exists()
            assert not (tmp_path / "launchers").exists()
    finally:
        launcher.proc.kill()
        launcher.proc.wait(10)


HARNESS_THAT_FORKS = """
import os, sys, time
from nanoswarm.node.cluster import LocalCluster, NodeSpec
swarm = LocalCluster(sys.argv[1], [NodeSpec((0, 4))]).start()
child = os.fork()
if child == 0:  # a child of the harness (a multiprocessing worker, say) outlives it
    time.sleep(60)
    os._exit(0)
print(swarm.nodes[0].pid, swarm.nodes[0].proc.launcher.pid, child, flush=True)
time.sleep(60)
"""


def test_the_launcher_goes_with_the_harness_even_while_a_child_of_the_harness_lives(tiny_model_dir, tmp_path):
    """The child holds a copy of the harness's end of the launcher's socket, so the launcher saw
    no end of it and kept its nodes for as long as the child lived (a review). (Its own TMPDIR:
    a harness killed so leaves its key directory.)"""
    harness = subprocess.Popen([sys.executable, "-c", HARNESS_THAT_FORKS, str(tiny_model_dir)],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               env={**os.environ, "TMPDIR": str(tmp_path)})
    *pids, child = (int(p) for p in harness.stdout.readline().split())
    try:
        assert len(pids) == 2 and all(pid_alive(p) for p in pids)
        harness.kill()
        harness.wait(10)
        assert all_gone(pids) and pid_alive(child)
    finally:
        os.kill(child, signal.SIGKILL)
        for p in pids:
            if pid_alive(p):
                os.kill(p, signal.SIGKILL)



HARNESS_THAT_DIES_AT_ONCE = """
import os, signal, sys, threading, time
from nanoswarm import runtime_defaults
from nanoswarm.node.cluster import HARNESS_ENV
from nanoswarm.node.launcher import Launcher
launcher = Launcher(runtime_defaults({**os.environ, "PYTHONUNBUFFERED": "1"}))
cmd = [sys.executable, "-m", "nanoswarm", "node", sys.argv[1], "--layers", "0:4", "--insecure",
       "--listen", "tcp://127.0.0.1:*", "--key-file", sys.argv[2]]
threading.Thread(target=launcher.spawn, daemon=True,
                 args=(cmd, {**launcher.env, HARNESS_ENV: str(launcher.pid)}, 2)).start()
child = os.fork()
if child == 0:  # holds the harness's end of the socket open
    time.sleep(30)
    os._exit(0)
print(launcher.pid, child, flush=True)
time.sleep(0.3)
os.kill(os.getpid(), signal.SIGKILL)  # while the launcher still imports torch
"""


def test_a_harness_gone_before_its_launcher_started_gets_no_node(tiny_model_dir, tmp_path):
    """The launcher took its parent's pid after importing torch: a harness already gone by then
    left it serving under init, forking the node asked for (a review)."""
    key_file = tmp_path / "node.key"  # what the node would make first thing
    harness = subprocess.Popen([sys.executable, "-c", HARNESS_THAT_DIES_AT_ONCE, str(tiny_model_dir), str(key_file)],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    launcher, child = (int(p) for p in harness.stdout.readline().split())
    try:
        harness.wait(10)
        assert all_gone([launcher], 15)
        time.sleep(1)
        assert not key_file.exists(), "the launcher forked a node for a harness that was gone"
    finally:
        os.kill(child, signal.SIGKILL)


def test_a_node_the_harness_stopped_waiting_for_is_stopped_once_forked(tiny_model_dir, tmp_path, monkeypatch):
    """spawn() given up (Ctrl-C or SIGTERM to a starting cluster; here its timeout) while the
    launcher forks: the harness then stopped the nodes it knew of and removed their key files,
    and that node loaded, bound a port and served on (a review). It is stopped when it is forked,
    and settle() waits for that."""
    import nanoswarm.node.launcher as launcher_module

    terminated: list[int] = []
    real_terminate = launcher_module._terminate
    monkeypatch.setattr(launcher_module, "_terminate", lambda pid: (terminated.append(pid), real_terminate(pid)))
    launcher = Launcher(_default_env())  # a fresh one: it imports torch for ~2 s before it forks
    cmd = [*NODE, str(tiny_model_dir), "--layers", "0:4", "--listen", "tcp://127.0.0.1:*", "--insecure",
           "--key-file", str(tmp_path / "node.key")]
    try:
        with open(os.devnull, "w") as devnull, pytest.raises(TimeoutError):
            launcher.spawn(cmd, {**launcher.env, HARNESS_ENV: str(launcher.pid)}, devnull.fileno(), timeout=0.05)
        assert launcher._unforked, "the request given up on before its fork is not waited for"
        launcher.settle(30)  # what LocalCluster.stop() waits for before it removes the key files
        assert not launcher._unforked and len(terminated) == 1, "settle() returned before the node was stopped"
        deadline = time.monotonic() + 30
        while launcher._abandoned and time.monotonic() < deadline:  # until its exit is reported
            time.sleep(0.1)
        assert not launcher._abandoned, "the node given up on was not stopped"
        assert not [p for p in children_of(launcher.pid) if pid_alive(p)] and not launcher._exits
    finally:
        for p in children_of(launcher.pid):
            os.kill(p, signal.SIGKILL)
        launcher.proc.kill()
        launcher.proc.wait(10)


# Review216: a mutation of node/launcher.py that no test caught before.
def test_a_node_forked_as_the_harness_is_interrupted_is_stopped(tiny_model_dir, tmp_path, monkeypatch):
    """Ctrl-C (KeyboardInterrupt) in spawn() once the launcher has reported the node forked, but
    before spawn() returned it: no caller will stop that node, so spawn() does, at once."""
    import nanoswarm.node.launcher as launcher_module

    forked: list[int] = []

    def interrupted(launcher, args, number, pid, stdout):
        forked.append(pid)
        raise KeyboardInterrupt

    monkeypatch.setattr(launcher_module, "ForkedNode", interrupted)
    launcher = Launcher(_default_env())
    cmd = [*NODE, str(tiny_model_dir), "--layers", "0:4", "--listen", "tcp://127.0.0.1:*", "--insecure",
           "--key-file", str(tmp_path / "node.key")]
    try:
        with open(os.devnull, "w") as devnull, pytest.raises(KeyboardInterrupt):
            launcher.spawn(cmd, {**launcher.env, HARNESS_ENV: str(launcher.pid)}, devnull.fileno())
        assert len(forked) == 1 and all_gone(forked, 15), "the node spawn() was interrupted for serves on"
        deadline = time.monotonic() + 15
        while launcher._abandoned and time.monotonic() < deadline:  # its exit, no one's to read
            time.sleep(0.05)
        assert not launcher._abandoned and not launcher._exits
    finally:
        for p in children_of(launcher.pid):
            os.kill(p, signal.SIGKILL)
        launcher.proc.kill()
        launcher.proc.wait(10)


HARNESS_GONE_WHILE_ITS_NODE_STARTS = """
import os, subprocess, sys, time
from nanoswarm.node.cluster import HARNESS_ENV
model, bootstrap, out, err, key = sys.argv[1:]
with open(out, "w") as stdout, open(err, "w") as stderr:
    node = subprocess.Popen([sys.executable, "-m", "nanoswarm", "node", model, "--layers", "0:4",
                             "--listen", "tcp://127.0.0.1:*", "--key-file", key, "--bootstrap", bootstrap],
                            stdout=stdout, stderr=stderr, env={**os.environ, HARNESS_ENV: str(os.getpid())})
while "loaded blocks" not in open(err).read():  # it now waits up to 3 s for the silent bootstrap
    time.sleep(0.02)
print(node.pid, flush=True)
os._exit(0)  # the harness is gone, its node still starting
"""


def test_a_node_whose_harness_goes_while_it_starts_never_serves(tiny_model_dir, tmp_path):
    """A node looked for its harness only once serving: one forked as the harness was being
    stopped loaded its blocks, bound a port and served under init until then (a review). It
    watches from its first step; here the harness goes while the node waits for a bootstrap
    that never answers."""
    from nanoswarm.keys.contact import format_contact
    from nanoswarm.keys.identity import generate_identity

    with socket.socket() as silent:  # takes connections, never speaks
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        bootstrap = format_contact(f"tcp://127.0.0.1:{silent.getsockname()[1]}", generate_identity().curve_public)
        out, err = tmp_path / "out", tmp_path / "err"
        harness = subprocess.run([sys.executable, "-c", HARNESS_GONE_WHILE_ITS_NODE_STARTS, str(tiny_model_dir),
                                  bootstrap, str(out), str(err), str(tmp_path / "node.key")],
                                 capture_output=True, text=True, timeout=60)
        node = int(harness.stdout)
        try:
            assert all_gone([node], 10)
        finally:
            if pid_alive(node):
                os.kill(node, signal.SIGKILL)
    assert "listening" not in out.read_text()
    assert "is gone: not starting" in err.read_text() and "Traceback" not in err.read_text()


def test_the_harness_puts_its_own_options_before_the_caller_s(tiny_model_dir):
    """A caller's option missing its value (`--node-args '--max-sessions'`) took the harness's
    `--key-file` that followed it as its value: "'--key-file' is not a valid integer range" (a
    review). The harness's options now come first, so click says the value is missing."""
    from nanoswarm.node.cluster import LocalCluster, NodeSpec

    class Captured(Exception):
        pass

    class Recorder(LocalCluster):
        def _fork(self, cmd, env, default_env):
            raise Captured(cmd)

    harness = Recorder(tiny_model_dir, [NodeSpec((0, 4))], args=["--max-sessions"])
    try:
        harness._spawn(harness.specs[0])
    except Captured as e:
        cmd = e.args[0]
    finally:
        harness.stop()
    assert cmd[-1] == "--max-sessions" and "--key-file" in cmd


# Mutation review213: gossip, its links, the harness, the daemon's start-up and options.
def test_the_harness_bootstraps_a_later_node_from_the_first_unless_told_otherwise(tiny_model_dir):
    """A node added to a running harness bootstraps from its first node; one given its own
    --bootstrap gets that one only."""
    from types import SimpleNamespace

    class Captured(Exception):
        pass

    class Recorder(LocalCluster):
        def _fork(self, cmd, env, default_env):
            raise Captured(cmd)

    harness = Recorder(tiny_model_dir, [])
    harness.nodes.append(SimpleNamespace(address="tcp://127.0.0.1:5", proc=SimpleNamespace(poll=lambda: 0,
                                                                                           wait=lambda *a: 0)))
    cmds = []
    try:
        for args in ([], ["--bootstrap", "tcp://127.0.0.1:6"]):
            with pytest.raises(Captured) as e:
                harness._spawn(NodeSpec((0, 4), args=[*args, "--key-file", "unused.key"]))
            cmds.append(e.value.args[0])
    finally:
        harness.stop()
    first, given = cmds
    assert first[first.index("--bootstrap") + 1] == "tcp://127.0.0.1:5"
    assert given.count("--bootstrap") == 1 and given[given.index("--bootstrap") + 1] == "tcp://127.0.0.1:6"


def test_a_node_that_failed_to_start_leaves_the_next_one_a_key_file_of_its_own(tiny_model_dir):
    """A start that failed once its key file was made (the process could not be made) leaves the
    next start its real error, not "key file ... already exists" (review213)."""
    class Refused(Exception):
        pass

    class Failing(LocalCluster):
        def _fork(self, cmd, env, default_env):
            raise Refused(cmd[cmd.index("--key-file") + 1])

    harness = Failing(tiny_model_dir, [])
    try:
        made = []
        for _ in range(2):
            with pytest.raises(Refused) as e:
                harness._spawn(NodeSpec((0, 4)))
            made.append(e.value.args[0])
        assert made[0] != made[1] and all(os.path.exists(k) for k in made)
    finally:
        harness.stop()
    assert not any(os.path.exists(k) for k in made)  # the harness's keys go with it


def test_stopping_a_harness_with_a_frozen_node_is_quick_and_lets_it_leave(tiny_model_dir, cluster_factory):
    """A stopped (SIGSTOP) node is continued and leaves on SIGTERM, not killed after the whole wait."""
    nodes = cluster_factory(tiny_model_dir, [NodeSpec((0, 4))])
    nodes.kill(0, signal.SIGSTOP)
    t0 = time.monotonic()
    nodes.stop(timeout=10.0)
    assert nodes.nodes[0].proc.poll() == 0  # it left (a node that could not act on SIGTERM is killed: -9)
    assert time.monotonic() - t0 < 9.0  # and not at the end of the 10 s wait
