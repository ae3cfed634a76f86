"""The local multi-node harness: N real node processes on 127.0.0.1, for demos and tests."""

from __future__ import annotations

import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from nanoswarm import runtime_defaults

from .affinity import bind_openmp, child_cpus
from .launcher import ForkedNode, launcher_for, settle_launchers

log = logging.getLogger(__name__)


@dataclass
class NodeSpec:
    layers: tuple[int, int] | None = None
    heads: tuple[int, int] | None = None
    args: list[str] = field(default_factory=list)  # further `nanoswarm node` options


def span_of(spec: NodeSpec) -> str:
    """'layers 0:2 heads 0:6', half-open like the CLI; 'auto' for a node that chooses."""
    if spec.layers is None:
        return "auto"
    text = f"layers {spec.layers[0]}:{spec.layers[1]}"
    return text if spec.heads is None else f"{text} heads {spec.heads[0]}:{spec.heads[1]}"


def even_split(n_layer: int, n_nodes: int, what: str = "blocks") -> list[tuple[int, int]]:
    """Blocks (or heads) 0..n_layer split into n_nodes contiguous ranges whose sizes differ by at
    most 1."""
    if not 1 <= n_nodes <= n_layer:
        raise ValueError(f"cannot split {n_layer} {what} over {n_nodes} nodes")
    base, extra = divmod(n_layer, n_nodes)
    out, start = [], 0
    for i in range(n_nodes):
        stop = start + base + (1 if i < extra else 0)
        out.append((start, stop))
        start = stop
    return out


def swarm_specs(n_layer: int, n_head: int, spans: int, head_groups: int = 1) -> list[NodeSpec]:
    """A local swarm: the blocks split evenly into `spans` layer ranges, each served whole, or
    with `head_groups` > 1 by that many nodes that split its heads evenly (a head group)."""
    if not 1 <= spans <= n_layer:
        raise ValueError(f"--nodes {spans}: the model has {n_layer} blocks, so from 1 to {n_layer}")
    if not 1 <= head_groups <= n_head:
        raise ValueError(f"--head-groups {head_groups}: the model has {n_head} heads, so from 1 to {n_head}")
    heads = [None] if head_groups == 1 else even_split(n_head, head_groups, "heads")
    return [NodeSpec(r, h) for r in even_split(n_layer, spans) for h in heads]


def _child_setup(cpus: frozenset[int] | None) -> Callable[[], None]:
    """What a node's process runs after the fork, before exec: start on `cpus` if given
    (node/affinity.py `child_cpus`). (Linux's PR_SET_PDEATHSIG, used before to stop nodes with
    the harness, fires when the *thread* that started the node ends: a cluster started from a
    worker thread lost every node with it. Nodes watch the harness's pid instead: HARNESS_ENV.)"""
    def setup() -> None:
        if cpus:
            try:
                os.sched_setaffinity(0, cpus)
            except OSError:
                pass
    return setup


def threads_of(cmd: list[str]) -> int | None:
    """The torch threads a node command asks for: its last --threads (click keeps the last)."""
    threads = None
    for i, arg in enumerate(cmd):
        value = cmd[i + 1] if arg == "--threads" and i + 1 < len(cmd) else (
            arg.split("=", 1)[1] if arg.startswith("--threads=") else None)
        if value is not None:
            try:
                threads = int(value)
            except ValueError:  # click refuses the node's command anyway
                threads = None
    return threads


@dataclass
class NodeProcess:
    spec: NodeSpec
    proc: subprocess.Popen | ForkedNode  # a process of its own, or forked by the launcher
    address: str = ""  # the node's contact string: endpoint#curvekey (keys/contact.py)
    lines: queue.Queue = field(default_factory=queue.Queue)
    key_file: Path | None = None  # the identity the harness made for it, if any

    @property
    def pid(self) -> int:
        return self.proc.pid


# A node started by the harness watches that its parent is still this process, or the launcher
# that forked it (node/daemon.py, node/launcher.py).
HARNESS_ENV = "NANOSWARM_HARNESS_PID"
# What the harness sets for each node (command() below), and --json, which would hide the plain
# "listening" line it waits for: not for callers' args (load's --node-args).
HARNESS_OPTIONS = ("--listen", "--layers", "--heads", "--key-file", "--json")


class LocalCluster:
    def __init__(self, model_dir: str | Path, specs: list[NodeSpec], threads: int | None = 1,
                 args: list[str] | None = None, env: dict[str, str] | None = None,
                 stderr: IO[str] | int | None = None, bootstrap: bool = True):
        self.model_dir = Path(model_dir)
        self.specs = specs
        self.threads = threads
        self.args = args or []
        self.env = env or {}
        self.stderr = stderr
        # Nodes started together are introduced to each other once they listen; a node added
        # later bootstraps from the first one.  Gossip takes it from there.
        self.bootstrap = bootstrap
        self.nodes: list[NodeProcess] = []
        self._key_dir: str | None = None
        self._keys_made = 0  # (not len(self.nodes): a start that failed after its key was made
        # would have left the next one the same name, "key file ... already exists")

    @property
    def addresses(self) -> list[str]:
        return [n.address for n in self.nodes]

    def command(self, spec: NodeSpec) -> list[str]:
        cmd = [sys.executable, "-m", "nanoswarm", "node", str(self.model_dir),
               "--listen", "tcp://127.0.0.1:*"]
        if spec.layers:
            cmd += ["--layers", f"{spec.layers[0]}:{spec.layers[1]}"]
        if spec.heads:
            cmd += ["--heads", f"{spec.heads[0]}:{spec.heads[1]}"]
        if self.threads:
            cmd += ["--threads", str(self.threads)]
        return cmd + self.args + spec.args

    def start_node(self, spec: NodeSpec, timeout: float = 60.0) -> NodeProcess:
        node = self._spawn(spec)
        node.address = self._wait_listening(node, timeout)
        return node

    def _spawn(self, spec: NodeSpec) -> NodeProcess:
        # Idle OpenMP threads spin only briefly, then sleep: several nodes share the cores
        # (nanoswarm.runtime_defaults, docs/performance.md).
        default_env = runtime_defaults({**os.environ, "PYTHONUNBUFFERED": "1"})
        env = runtime_defaults({**default_env, **self.env})
        cmd = self.command(spec)
        # Each OpenMP thread of a node on a core of its own (node/affinity.py).
        env = bind_openmp(env, len(self.nodes), threads_of(cmd))
        key_file, ours = None, []
        if "--key-file" not in cmd:  # every node needs its own identity (peer id, CURVE key)
            key_file = self._new_key_file()
            ours += ["--key-file", str(key_file)]
        if self.bootstrap and self.nodes and self.nodes[0].address and "--bootstrap" not in cmd:
            ours += ["--bootstrap", self.nodes[0].address]  # a node added to a running swarm
        # Before the caller's options, so that one of them missing its value gets click's
        # "requires an argument", not ours as its value.
        at = cmd.index("--listen") if "--listen" in cmd else len(cmd)
        cmd[at:at] = ours
        node = NodeProcess(spec, self._fork(cmd, env, default_env) or self._exec(cmd, env),
                           key_file=key_file)
        self.nodes.append(node)  # first: stop() must find it, should Ctrl-C come next
        threading.Thread(target=self._pump, args=(node,), daemon=True).start()
        return node

    def _fork(self, cmd: list[str], env: dict, default_env: dict) -> ForkedNode | None:
        """The node forked from the launcher, which has torch loaded already (node/launcher.py),
        or None where it must start as a process of its own."""
        stderr = self.stderr
        if stderr is None:  # as a process of its own: this process's fd 2, where there is one
            try:
                os.fstat(2)
                stderr = 2
            except OSError:
                stderr = subprocess.DEVNULL
        if stderr == subprocess.DEVNULL:
            with open(os.devnull, "w") as devnull:
                return self._fork_to(cmd, env, default_env, devnull.fileno())
        if not isinstance(stderr, int):
            try:
                stderr = stderr.fileno()
            except (AttributeError, OSError, ValueError):  # a stream with no descriptor
                return None
        return self._fork_to(cmd, env, default_env, stderr) if stderr >= 0 else None

    @staticmethod
    def _fork_to(cmd: list[str], env: dict, default_env: dict, stderr: int) -> ForkedNode | None:
        launcher = launcher_for(cmd, env, default_env, HARNESS_ENV)
        if launcher is None:
            return None
        return launcher.spawn(cmd, {**env, HARNESS_ENV: str(launcher.pid)}, stderr)  # its parent

    def _exec(self, cmd: list[str], env: dict) -> subprocess.Popen:
        env = {**env, HARNESS_ENV: str(os.getpid())}  # the node leaves when we are gone
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.stderr,
                                stdin=subprocess.DEVNULL, env=env, text=True,
                                preexec_fn=_child_setup(child_cpus(env)) if sys.platform == "linux" else None)

    def _new_key_file(self) -> Path:
        from nanoswarm.keys.identity import generate_identity, save_identity

        if self._key_dir is None:
            self._key_dir = tempfile.mkdtemp(prefix="nanoswarm-keys-")
        self._keys_made += 1
        return save_identity(generate_identity(), Path(self._key_dir) / f"node{self._keys_made - 1}.key")

    @staticmethod
    def _pump(node: NodeProcess) -> None:
        for line in node.proc.stdout:  # keep reading so a chatty node never blocks on its pipe
            node.lines.put(line.rstrip("\n"))
        node.lines.put(None)

    @staticmethod
    def _wait_listening(node: NodeProcess, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = node.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"node {span_of(node.spec)} did not start within {timeout:.0f}s") from None
            if line is None:
                raise RuntimeError(f"node {span_of(node.spec)} exited with code {node.proc.wait()} "
                                   "before listening")
            if line.startswith("listening "):
                return line.split(" ", 1)[1].strip()

    def start(self, timeout: float = 120.0) -> LocalCluster:
        try:
            # Start every process first, then wait: nodes load their shards in parallel.
            for node in [self._spawn(spec) for spec in self.specs]:
                node.address = self._wait_listening(node, timeout)
            self.wait_ready(timeout)
            if self.bootstrap:
                self.introduce()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Every node answers `info` (the same request a client starts with)."""
        from nanoswarm.client.peer_errors import PeerError
        from nanoswarm.client.transport import PeerConnection
        for node in self.nodes:
            conn = PeerConnection(node.address, timeout=timeout)
            try:
                conn.request("info")
            except PeerError as e:
                raise RuntimeError(f"node at {node.address} is not answering: {e}") from e
            finally:
                conn.close()

    def introduce(self, timeout: float = 10.0) -> None:
        """Hand every node the signed records of all the others (relayed unchanged, as gossip
        does), so nodes started in parallel form one swarm at once."""
        from nanoswarm.client.transport import PeerConnection
        conns = [PeerConnection(n.address, timeout=timeout) for n in self.nodes]
        try:
            wires = [w for c in conns for w in c.request("records", {"want": True}).fields["records"]]
            for conn in conns:
                conn.request("records", {"records": wires, "want": False})
        finally:
            for conn in conns:
                conn.close()

    def kill(self, index: int, sig: int = signal.SIGKILL) -> None:
        os.kill(self.nodes[index].pid, sig)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM every node, wait, SIGKILL stragglers: no process is left behind."""
        for node in self.nodes:
            if node.proc.poll() is None:
                try:
                    node.proc.send_signal(signal.SIGCONT)  # a frozen node cannot act on SIGTERM
                    node.proc.terminate()
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + timeout
        try:
            for node in self.nodes:
                try:
                    node.proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    node.proc.kill()
                    node.proc.wait()
        finally:  # a second Ctrl-C while waiting: the nodes still go (they watch us), the keys too
            settle_launchers(2.0)  # a node whose start was interrupted is forked and stopped first
            if self._key_dir is not None:
                shutil.rmtree(self._key_dir, ignore_errors=True)
                self._key_dir = None

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
