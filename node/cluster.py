"""The local multi-node harness: N real node processes on 127.0.0.1, for demos and tests."""

from __future__ import annotations

import ctypes
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass
class NodeSpec:
    layers: tuple[int, int] | None = None
    heads: tuple[int, int] | None = None
    args: list[str] = field(default_factory=list)  # further `nanoswarm node` options


def even_split(n_layer: int, n_nodes: int) -> list[tuple[int, int]]:
    """Blocks 0..n_layer split into n_nodes contiguous ranges whose sizes differ by at most 1."""
    if not 1 <= n_nodes <= n_layer:
        raise ValueError(f"cannot split {n_layer} blocks over {n_nodes} nodes")
    base, extra = divmod(n_layer, n_nodes)
    out, start = [], 0
    for i in range(n_nodes):
        stop = start + base + (1 if i < extra else 0)
        out.append((start, stop))
        start = stop
    return out


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the harness dies, even by SIGKILL (Linux prctl)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


@dataclass
class NodeProcess:
    spec: NodeSpec
    proc: subprocess.Popen
    address: str = ""
    lines: queue.Queue = field(default_factory=queue.Queue)

    @property
    def pid(self) -> int:
        return self.proc.pid


class LocalCluster:
    def __init__(self, model_dir: str | Path, specs: list[NodeSpec], threads: int | None = 1,
                 args: list[str] | None = None, env: dict[str, str] | None = None,
                 stderr=None):
        self.model_dir = Path(model_dir)
        self.specs = specs
        self.threads = threads
        self.args = args or []
        self.env = env or {}
        self.stderr = stderr
        self.nodes: list[NodeProcess] = []

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
        # Idle OpenMP threads must sleep, not spin: several nodes share two cores here
        # (docs/performance.md measured 0.63 of local speed with spinning threads).
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONUNBUFFERED": "1", **self.env}
        proc = subprocess.Popen(self.command(spec), stdout=subprocess.PIPE, stderr=self.stderr,
                                stdin=subprocess.DEVNULL, env=env, text=True,
                                preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        node = NodeProcess(spec, proc)
        threading.Thread(target=self._pump, args=(node,), daemon=True).start()
        self.nodes.append(node)
        return node

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
                raise TimeoutError(f"node {node.spec.layers} did not start within {timeout:.0f}s") from None
            if line is None:
                raise RuntimeError(f"node {node.spec.layers} exited with code {node.proc.wait()} "
                                   "before listening")
            if line.startswith("listening "):
                return line.split(" ", 1)[1].strip()

    def start(self, timeout: float = 120.0) -> LocalCluster:
        try:
            # Start every process first, then wait: nodes load their shards in parallel.
            for node in [self._spawn(spec) for spec in self.specs]:
                node.address = self._wait_listening(node, timeout)
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Every node answers `info` (the same request a client starts with)."""
        from nanoswarm.client.transport import PeerConnection, PeerError
        for node in self.nodes:
            conn = PeerConnection(node.address, timeout=timeout, **self._conn_kwargs(node))
            try:
                conn.request("info")
            except PeerError as e:
                raise RuntimeError(f"node at {node.address} is not answering: {e}") from e
            finally:
                conn.close()

    def _conn_kwargs(self, node: NodeProcess) -> dict:
        return {}

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
        for node in self.nodes:
            try:
                node.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                node.proc.kill()
                node.proc.wait()

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
