"""Node processes forked from one that has already loaded torch: how the local harness starts
its nodes quickly.

Importing torch and the node's modules takes ~2 s of CPU on the 2-core test VM, and a harness that
started every node as `python -m nanoswarm node ...` paid it once per node: 3.5 s to start a
4-node swarm of a 4-block model. A launcher process pays it once; the harness hands it each
node's command line, environment and output descriptors, and it forks a child that runs the
same `nanoswarm node` command as a fresh process would (docs/architecture.md, "Harness start-up").

A fork inherits what the launcher read as it started and as torch loaded: Python's settings,
libgomp's (OpenMP binding, spin count), oneDNN's. So a node is forked only when those variables
of its environment (LOAD_TIME_VARS) equal the launcher's; the child then takes its whole
environment as its own. Any other node, such as one whose OpenMP threads are bound to cores
(node/affinity.py) or one whose command is not `python -m nanoswarm`, is started as a process of
its own, as before. NANOSWARM_FORK=0 turns forking off.

The launcher (node/launcher_process.py) is a child of the harness process; it forks its nodes,
reaps them and reports each one's exit code (by request, not by pid: pids are reused). When the
harness process goes, however it ends, the launcher sees its socket end or its parent change and
exits too, and its nodes, which watch their parent's pid, leave the swarm. A forked node runs
the code the launcher imported, and `ps` shows it with the launcher's command line.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import IO

from .affinity import BINDING_VARS

log = logging.getLogger(__name__)

FORK_ENV = "NANOSWARM_FORK"
MAX_MESSAGE = 1 << 20  # a request: a command line and an environment


class ForkedNode:
    """A node process forked by the launcher, with the part of `subprocess.Popen`'s interface
    the harness uses (pid, stdout, poll, wait, send_signal, terminate, kill, returncode)."""

    def __init__(self, launcher: Launcher, args: list[str], number: int, pid: int, stdout: IO[str]):
        self.launcher = launcher
        self.args = args
        self.number = number  # the launcher's request number: exits are reported by it, not by pid
        self.pid = pid
        self.stdout = stdout
        self.started = _start_time(pid)  # tells this process from a later one with its pid
        self._code: int | None = None

    @property
    def returncode(self) -> int | None:
        if self._code is None:
            self._code = self.launcher.exit_code(self)
        return self._code

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self._code is None:
            self._code = self.launcher.wait_exit(self, timeout)
        if self._code is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self._code

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:  # as Popen: never signal a pid that may have been reused
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:  # exited and reaped by the launcher before it told us (as Popen)
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Launcher:
    """The harness's side of one launcher process: spawn() forks a node from it; a thread reads
    the launcher's reports (a node forked, or why not; a node's exit code)."""

    def __init__(self, env: dict[str, str]):
        self.env = dict(env)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nanoswarm.node.launcher_process", str(theirs.fileno()), str(os.getpid())],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=self.env,
            pass_fds=[theirs.fileno()], preexec_fn=_ignore_ctrl_c)
        theirs.close()
        self.pid = self.proc.pid
        self._sock = ours
        self._send_lock = threading.Lock()
        self._cond = threading.Condition()
        self._spawned: dict[int, int | str] = {}  # request number -> pid, or why it was not forked
        self._exits: dict[int, int] = {}  # request number -> exit code (negative: the signal)
        self._abandoned: set[int] = set()  # request numbers spawn() gave up on: stopped once forked
        self._unforked: set[int] = set()   # those of them not forked yet (settle)
        self._next_request = 0
        self.alive = True
        threading.Thread(target=self._read_reports, name="nanoswarm-launcher", daemon=True).start()

    def spawn(self, args: list[str], env: dict[str, str], stderr: int,
              timeout: float = 60.0) -> ForkedNode:
        """Fork `python -m nanoswarm ARGS[3:]` with `env`, its stdout a new pipe (returned as the
        node's `stdout`), its stderr the descriptor `stderr`, on the calling thread's cores."""
        read_end, write_end = os.pipe()
        sent, pid, stdout = 0, None, None
        try:
            try:
                with self._send_lock:
                    self._next_request += 1
                    number = self._next_request
                    request = {"request": number, "argv": ["nanoswarm", *args[3:]], "env": env,
                               "cwd": os.getcwd(), "cpus": sorted(os.sched_getaffinity(0))}
                    socket.send_fds(self._sock, [json.dumps(request).encode()], [write_end, stderr])
                    sent = number
            finally:
                os.close(write_end)  # the node holds its own copy: its end of the pipe ends with it
            stdout = os.fdopen(read_end, "r")
            with self._cond:
                forked = self._cond.wait_for(lambda: number in self._spawned or not self.alive, timeout)
                pid = self._spawned.pop(number, None)
            if not forked:
                raise TimeoutError(f"the node launcher did not fork within {timeout:.0f}s")
            if not isinstance(pid, int):
                raise RuntimeError(f"could not fork a node: {pid}" if pid else
                                   f"the node launcher exited with code {self.proc.poll()}")
            return ForkedNode(self, args, number, pid, stdout)
        except BaseException:  # Ctrl-C or SIGTERM (or a timeout) once the request is on its way:
            if sent:           # the node must not outlive us
                self._abandon(sent, pid)
            if stdout is not None:
                stdout.close()
            else:
                os.close(read_end)
            raise

    def _abandon(self, number: int, pid: int | str | None) -> None:
        """A node that spawn() stopped waiting for (interrupted, or timed out) is stopped when it
        is forked, since no caller will: a harness interrupted as it started a swarm left such a
        node serving after the harness had stopped the others and removed the node's key file."""
        with self._cond:
            pid = self._spawned.pop(number, pid)
            if isinstance(pid, int):
                if self._exits.pop(number, None) is None:  # not ended (so the pid is still the node's)
                    _terminate(pid)
                    self._abandoned.add(number)  # its exit is no one's to read
            elif pid is None and self.alive:  # not forked yet: _read_reports stops it when it is
                self._abandoned.add(number)
                self._unforked.add(number)

    def settle(self, timeout: float) -> None:
        """Wait up to `timeout` for the requests spawn() gave up on before they were forked to be
        forked (and so stopped): the harness removes its key files after this, and a node forked
        later failed on its missing key with an `error:` line after the harness had gone."""
        with self._cond:
            self._cond.wait_for(lambda: not self._unforked or not self.alive, timeout)

    def exit_code(self, node: ForkedNode) -> int | None:
        with self._cond:
            return self._code(node)

    def wait_exit(self, node: ForkedNode, timeout: float | None) -> int | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while (code := self._code(node)) is None:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                # Without a launcher no report comes: look at the pid now and then instead.
                self._cond.wait(left if self.alive else min(0.05, left or 0.05))
            return code

    def _code(self, node: ForkedNode) -> int | None:
        code = self._exits.pop(node.number, None)  # the node keeps it from here on
        if code is None and not self.alive and not _same_process(node.pid, node.started):
            code = 1  # gone while no launcher was left to say how: its code is lost
        return code

    def _read_reports(self) -> None:
        while True:
            try:
                data = self._sock.recv(MAX_MESSAGE)
            except OSError:
                data = b""
            with self._cond:
                if not data:  # the launcher is gone; its nodes are orphans that leave on their own
                    self.alive = False
                    self._cond.notify_all()
                    return
                report = json.loads(data)
                if "exited" in report:
                    if report["exited"] in self._abandoned:
                        self._abandoned.discard(report["exited"])
                    else:
                        self._exits[report["exited"]] = report["code"]
                elif report["request"] in self._abandoned:  # forked after spawn() gave up on it
                    self._unforked.discard(report["request"])
                    if "pid" in report:
                        _terminate(report["pid"])
                    else:
                        self._abandoned.discard(report["request"])
                else:
                    self._spawned[report["request"]] = report.get("pid", report.get("error"))
                self._cond.notify_all()


def _terminate(pid: int) -> None:
    """SIGTERM a node the launcher forked and has not reported ended (so its pid is still its)."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass


def _ignore_ctrl_c() -> None:
    """In the launcher before it starts: Ctrl-C goes to the whole terminal's process group, and
    the harness and the nodes act on it; the launcher, mid-import, would print a traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # kept across exec; Python then leaves it


def _start_time(pid: int) -> int | None:
    """When `pid` started (clock ticks since boot), None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else int(fields[19])


def _same_process(pid: int, started: int | None) -> bool:
    """Whether `pid` is still the running process that started at `started` (not a zombie, not a
    later process that was given the same pid)."""
    return started is not None and _start_time(pid) == started


_launchers: dict[frozenset, Launcher] = {}  # by the load-time environment they started with
_launcher_lock = threading.Lock()


# What a process reads from its environment as it starts or as torch and its libraries load
# (Python's own, libgomp's, Intel's, OpenBLAS's, oneDNN's, torch's and CUDA's, the loader's, the C
# library's, the locale, ours): a forked node inherits the launcher's reading of these, so they
# must be the same. It reads the rest (PATH, HOME, TMPDIR, ...) from its own environment.
LOAD_TIME_VARS = ("PYTHON", "OMP_", "GOMP_", "KMP_", "MKL_", "OPENBLAS_", "ONEDNN_", "DNNL_",
                  "LRU_CACHE_CAPACITY", "TORCH", "PYTORCH", "CUDA", "NVIDIA", "LD_", "GLIBC_",
                  "MALLOC_", "LC_", "LANG", "NANOSWARM_")


def settle_launchers(timeout: float) -> None:
    """Launcher.settle for every launcher of this process, within `timeout` in all."""
    deadline = time.monotonic() + timeout
    for launcher in list(_launchers.values()):
        launcher.settle(max(0.0, deadline - time.monotonic()))


def _load_time(env: dict[str, str], harness_key: str) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith(LOAD_TIME_VARS) and k != harness_key}


def launcher_for(args: list[str], env: dict[str, str], default_env: dict[str, str],
                 harness_key: str) -> Launcher | None:
    """The launcher that can fork this node (started on first use, with `default_env`: a node's
    environment when nothing is asked of it), or None where the node must be a process of its
    own: forking off, not a `python -m nanoswarm` command, an OpenMP binding, an environment
    whose LOAD_TIME_VARS (but `harness_key`) differ from the launcher's, or no fork here."""
    if (sys.platform != "linux" or not hasattr(socket, "send_fds") or env.get(FORK_ENV, "1") == "0"
            or args[:3] != [sys.executable, "-m", "nanoswarm"]
            or any(k in env or k in default_env for k in BINDING_VARS)):
        return None
    key = frozenset(_load_time(default_env, harness_key).items())
    if frozenset(_load_time(env, harness_key).items()) != key:
        return None
    with _launcher_lock:
        # One launcher per environment the harness has had (a test that sets a variable for a
        # while makes a second, which stays for when it comes back); a dead one is replaced.
        launcher = _launchers.get(key)
        if launcher is None or not launcher.alive or launcher.proc.poll() is not None:
            launcher = _launchers[key] = Launcher(default_env)
        return launcher
