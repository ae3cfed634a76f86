"""Shared fixtures: random-weight model directories and real local swarms."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nanoswarm  # noqa: F401  (first: its OpenMP defaults must precede torch's import)

# isort: split
import pytest
import torch
import zmq

from nanoswarm.node.cluster import LocalCluster, NodeSpec
from nanoswarm.shards.cut import write_model_dir
from nanoswarm.shards.model import GPT, ModelConfig

TINY = ModelConfig(n_layer=4, n_head=4, n_embd=64, vocab_size=50257, block_size=128, gelu="tanh")
SMALL12 = ModelConfig(n_layer=12, n_head=12, n_embd=96, vocab_size=50257, block_size=256, gelu="exact")
GPT2_SMALL = ModelConfig(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, block_size=1024)
# 4 blocks, 4 heads: the shard-file tests' model (tests/test_shards.py, test_shard_checks.py).
SMALL = ModelConfig(n_layer=4, n_head=4, n_embd=64, vocab_size=1000, block_size=64, gelu="tanh")
CLI = [sys.executable, "-m", "nanoswarm"]
DISHONEST = str(Path(__file__).with_name("dishonest_node.py"))


class SwarmWithALiar(LocalCluster):
    """Nodes whose spec's args hold "--dishonest" run tests/dishonest_node.py."""

    def command(self, spec: NodeSpec) -> list[str]:
        cmd = super().command(spec)
        if "--dishonest" in cmd:
            cmd.remove("--dishonest")
            cmd[:3] = [sys.executable, DISHONEST]
        return cmd


def make_gpt(config: ModelConfig, seed: int = 0, attention_too: bool = False) -> GPT:
    """A random GPT whose every weight matters: non-zero biases (so slicing them is tested),
    LayerNorm gains off 1 and MLP pre-activations of order 1 (so the GELU form changes the
    output); `attention_too`, attention scores of order 1 as well (tests/test_model.py)."""
    torch.manual_seed(seed)
    model = GPT(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.05)
            elif "ln_" in name:
                p.normal_(1.0, 0.1)
            elif "c_fc.weight" in name or (attention_too and "c_attn.weight" in name):
                p.normal_(0.0, 0.15)
    return model.eval()


def sessions_on(address: str) -> int:
    """The sessions a node holds, from its `info`."""
    from nanoswarm.client.transport import PeerConnection

    conn = PeerConnection(address, timeout=5.0)
    try:
        return conn.request("info").fields["sessions"]
    finally:
        conn.close()


def wait_for_sessions(address: str, n: int, seconds: float) -> float:
    """Seconds until the node holds `n` sessions; fails after `seconds`."""
    start = time.monotonic()
    while (held := sessions_on(address)) != n:
        assert time.monotonic() - start < seconds, f"the node still holds {held} sessions, not {n}"
        time.sleep(0.1)
    return time.monotonic() - start


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`nanoswarm ARGS` as a user runs it: a subprocess, its output and exit code."""
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def run_clis(*arg_lists: list[str], timeout: float = 120) -> list[subprocess.CompletedProcess]:
    """Several `nanoswarm` runs at once, results in order: each spends most of its second
    importing torch, so cases that fail before doing anything need not wait for each other."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(lambda args: run_cli(*args, timeout=timeout), arg_lists))


def invoke_cli(*args: str) -> subprocess.CompletedProcess:
    """`nanoswarm ARGS` in this process (the same click group and failure reporting), for cases
    that fail before any work: a subprocess spends ~2.5 s importing torch for each. Its log lines
    go to its stderr, as in a process of its own (the command's own logging set-up, with pytest's
    handlers set aside meanwhile). What the command changes process-wide (signal handlers, log
    levels, torch's threads and RNG, the open-file limit) is put back. Each command's real-process failure path is still
    tested by a subprocess case of its own."""
    import logging
    import resource
    import signal

    from click.testing import CliRunner

    from nanoswarm.cli import main

    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    levels = {name: logger.level for name, logger in logging.root.manager.loggerDict.items()
              if isinstance(logger, logging.Logger)}
    levels[""] = logging.root.level
    threads, rng = torch.get_num_threads(), torch.random.get_rng_state()
    files = resource.getrlimit(resource.RLIMIT_NOFILE)  # (a node raises its soft limit)
    root_handlers = logging.root.handlers[:]
    logging.root.handlers.clear()  # so that the command's logging.basicConfig writes to its stderr
    try:
        result = CliRunner().invoke(main, list(args))
    finally:
        logging.root.handlers[:] = root_handlers
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        for name, logger in list(logging.root.manager.loggerDict.items()):
            if isinstance(logger, logging.Logger):  # (one the command made, e.g. "nanoswarm": NOTSET before)
                logger.setLevel(levels.get(name, logging.NOTSET))
        logging.root.setLevel(levels[""])
        torch.set_num_threads(threads)
        torch.random.set_rng_state(rng)  # (train seeds it)
        resource.setrlimit(resource.RLIMIT_NOFILE, files)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # a bug, not a failure the command reports
    return subprocess.CompletedProcess(["nanoswarm", *args], result.exit_code, result.stdout, result.stderr)


_ports = random.SystemRandom()  # not the random module's: a test may seed that, alike in both workers


def free_port() -> int:
    """A port of 127.0.0.1 that nothing listens on, for a test that binds it later or needs it
    dead: from below the kernel's ephemeral range, where other xdist workers' nodes (which
    listen on port 0) and every outgoing connection take theirs, so none of them can take it
    between this check and its use, as one from bind(0) could (review102)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    if low <= 2048:  # no room below it: a port the kernel picks, as before
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    for _ in range(100):
        port = _ports.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue  # taken (another worker's, or the machine's)
        return port
    raise RuntimeError(f"no free port of 127.0.0.1 below {low}")


def curve_router(ctx: zmq.Context) -> tuple[zmq.Socket, bytes]:
    """A ROUTER that takes CURVE clients, with a fresh key pair: (the socket, its public key)."""
    sock = ctx.socket(zmq.ROUTER)
    sock.curve_server = True
    public, sock.curve_secretkey = zmq.curve_keypair()
    sock.curve_publickey = public
    return sock, public


def take_over_port(ctx: zmq.Context, port: int, seconds: float = 10.0) -> tuple[zmq.Socket, zmq.Socket]:
    """A CURVE ROUTER of a fresh key at `port` of 127.0.0.1 (another node taking a departed one's
    address), bound once the socket that held it lets it go (ZeroMQ closes a listener on its I/O
    thread, a moment after close()), and a monitor of the connections it accepts."""
    sock, _ = curve_router(ctx)
    monitor = sock.get_monitor_socket(zmq.EVENT_ACCEPTED)
    deadline = time.monotonic() + seconds
    while True:
        try:
            sock.bind(f"tcp://127.0.0.1:{port}")
            return sock, monitor
        except zmq.ZMQError:
            if time.monotonic() > deadline:
                close_monitored(sock, monitor)
                raise
            time.sleep(0.05)


def close_monitored(sock: zmq.Socket | None, monitor: zmq.Socket | None) -> None:
    """Close a monitored socket and its monitor's reader, in the one safe order: monitoring
    stopped, then the reader, then the socket. With the reader closed first, an event in between
    (a connection accepted, a retry's drop) blocked libzmq's I/O thread for good on a send nobody
    would read, and every later test of that pytest worker found the shared context dead: nodes
    "not answering" for 120 s (CI, the sixty-fourth and sixty-sixth sessions; client/monitors.py).
    Either may be None."""
    from nanoswarm.client.monitors import stop_monitor

    if sock is not None and not sock.closed:
        stop_monitor(sock, monitor)
        sock.close(linger=0)
    elif monitor is not None:
        monitor.close(linger=0)


def context_serves(ctx: zmq.Context, timeout_ms: int = 10_000) -> bool:
    """Whether `ctx`'s I/O thread still carries a message over TCP (~0.2 ms when it does)."""
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    try:
        dealer.connect(f"tcp://127.0.0.1:{router.bind_to_random_port('tcp://127.0.0.1')}")
        dealer.send(b"?")
        return bool(router.poll(timeout_ms))
    finally:
        dealer.close(linger=0)
        router.close(linger=0)


@pytest.fixture(autouse=True)
def _shared_context_still_serves():
    """After each test, the process's shared ZeroMQ context still serves. A stuck I/O thread used
    to show only in the worker's later tests, each failing after 120 s; this names the test that
    left it stuck."""
    yield
    ctx = zmq.Context._instance
    if ctx is not None and not ctx.closed and not context_serves(ctx):
        pytest.fail("this test left the process's shared ZeroMQ context stuck: its I/O thread carries nothing "
                    "(a monitored socket whose monitor's reader closed first?)")


def accepted(monitor: zmq.Socket, seconds: float, settle: float = 0.0) -> int:
    """Connections `monitor` (take_over_port's) reports accepted within `seconds`, after reading
    for `settle` seconds those already under way."""
    from zmq.utils.monitor import recv_monitor_message

    while settle and monitor.poll(int(settle * 1000)):
        recv_monitor_message(monitor)
    n, deadline = 0, time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if monitor.poll(int(left * 1000) + 1):
            n += recv_monitor_message(monitor)["event"] == zmq.EVENT_ACCEPTED
    return n


def pid_alive(pid: int) -> bool:
    """Whether `pid` is a running process (a zombie, ended but not reaped, is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def all_gone(pids: list[int], seconds: float = 10) -> bool:
    """Whether every one of `pids` has ended within `seconds`."""
    deadline = time.monotonic() + seconds
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not any(pid_alive(p) for p in pids)


def children_of(pid: int) -> list[int]:
    """The pids of the processes whose parent is `pid`."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            pass  # a process that ended meanwhile
    return kids


def make_model_dir(path: Path, config: ModelConfig, seed: int = 0, layers_per_shard: int = 1,
                   head_splits=None) -> Path:
    torch.manual_seed(seed)
    model = GPT(config)
    with torch.no_grad():  # larger than init values so that every block matters in the logits
        for name, p in model.named_parameters():
            if name.endswith(".bias") or "ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    write_model_dir(config, model.flat_state_dict(), path, layers_per_shard, head_splits,
                    progress=False)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("tiny"), TINY, head_splits=[(0, 2), (2, 4)])


@pytest.fixture
def small_dir(tmp_path) -> Path:
    """SMALL cut into files of 2 blocks and head splits 0:2 and 2:4, in the test's own folder
    (tests that damage or rewrite the files)."""
    write_model_dir(SMALL, make_gpt(SMALL).flat_state_dict(), tmp_path, layers_per_shard=2,
                    head_splits=[(0, 2), (2, 4)])
    return tmp_path


@pytest.fixture(scope="session")
def small12_model_dir(tmp_path_factory) -> Path:
    """12 blocks, 12 heads: for failover and head-group tests; head-sliced files 5+4+3 (other
    splits are sliced in memory at load)."""
    return make_model_dir(tmp_path_factory.mktemp("small12"), SMALL12, seed=1, layers_per_shard=4,
                          head_splits=[(0, 5), (5, 9), (9, 12)])


@pytest.fixture(scope="session")
def gpt2_small_model_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("gpt2small"), GPT2_SMALL, seed=2, layers_per_shard=3)


@pytest.fixture
def cluster_factory():
    """Start swarms inside a test; every node is stopped afterwards, whatever happens."""
    started: list[LocalCluster] = []

    def factory(model_dir: Path, specs: list[NodeSpec], cluster: type[LocalCluster] = LocalCluster,
                **kwargs) -> LocalCluster:
        c = cluster(model_dir, specs, **kwargs)
        started.append(c)
        return c.start()

    yield factory
    for c in started:
        # SIGKILL first: a graceful leave takes 0.2-1 s a node (it drains), which no test
        # checks here (those that do stop their swarm themselves), hundreds of times a run.
        for node in c.nodes:
            if node.proc.poll() is None:
                node.proc.kill()
        c.stop()


class TcpRelay:
    """A plain TCP relay on 127.0.0.1 to `upstream_port` that records every byte passing through,
    both ways (`captured`, under `lock`), and holds each chunk `delay` seconds (settable later:
    a long round trip without a network namespace). A connection whose upstream refuses it is
    closed."""

    def __init__(self, upstream_port: int, delay: float = 0.0):
        self.upstream, self.delay = upstream_port, delay
        self.captured = bytearray()
        self.lock = threading.Lock()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.sockets: list[socket.socket] = [self.server]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:  # closed
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream))
            except OSError:
                client.close()
                continue
            self.sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                with self.lock:
                    self.captured += data
                if self.delay:
                    time.sleep(self.delay)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        for s in self.sockets:
            s.close()
