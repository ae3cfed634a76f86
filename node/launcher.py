"""Node processes forked from one that has already loaded torch: how the local harness starts
its nodes quickly.

Importing torch and the node's modules takes ~2 s of CPU on the 2-core test VM, and a harness that
started every node as `python -m nanoswarm node ...` paid it once per node: 3.5 s to start a
4-node swarm of a 4-block model. A launcher process pays it once; the harness hands it each
node's command line, environment and output descriptors, and it forks a child that runs the
same `nanoswarm node` command as a fresh process would (docs/architecture.md, "Harness").

A fork inherits what the launcher read as it started and as torch loaded: Python's settings,
libgomp's (OpenMP binding, spin count), oneDNN's. So a node is forked only when those variables
of its environment (LOAD_TIME_VARS) equal the launcher's; the child then takes its whole
environment as its own. Any other node, such as one whose OpenMP threads are bound to cores
(node/affinity.py) or one whose command is not `python -m nanoswarm`, is started as a process of
its own, as before. NANOSWARM_FORK=0 turns forking off.

The launcher is a child of the harness process; it forks its nodes, reaps them and reports each
one's exit code. When the harness process goes, however it ends, the launcher reads the end of
its socket and exits too, and its nodes, which watch their parent's pid, leave the swarm.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from typing import IO

from .affinity import BINDING_VARS

log = logging.getLogger(__name__)

FORK_ENV = "NANOSWARM_FORK"
MAX_MESSAGE = 1 << 20  # a request: a command line and an environment


class ForkedNode:
    """A node process forked by the launcher, with the part of `subprocess.Popen`'s interface
    the harness uses (pid, stdout, poll, wait, send_signal, terminate, kill, returncode)."""

    def __init__(self, launcher: Launcher, args: list[str], pid: int, stdout: IO[str]):
        self.launcher = launcher
        self.args = args
        self.pid = pid
        self.stdout = stdout

    @property
    def returncode(self) -> int | None:
        return self.launcher.exit_code(self.pid)

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        code = self.launcher.wait_exit(self.pid, timeout)
        if code is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return code

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:  # as Popen: never signal a pid that may have been reused
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Launcher:
    """The harness's side of one launcher process: spawn() forks a node from it; a thread reads
    the launcher's reports (a node's pid, a node's exit code)."""

    def __init__(self, env: dict[str, str]):
        self.env = dict(env)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nanoswarm.node.launcher", str(theirs.fileno())],
            stdin=subprocess.DEVNULL, env=self.env, pass_fds=[theirs.fileno()])
        theirs.close()
        self.pid = self.proc.pid
        self._sock = ours
        self._send_lock = threading.Lock()
        self._cond = threading.Condition()
        self._spawned: dict[int, int] = {}  # request number -> pid
        self._exits: dict[int, int] = {}  # pid -> exit code (negative: the signal that ended it)
        self._next_request = 0
        self.alive = True
        threading.Thread(target=self._read_reports, name="nanoswarm-launcher", daemon=True).start()

    def spawn(self, args: list[str], env: dict[str, str], stderr: int,
              timeout: float = 60.0) -> ForkedNode:
        """Fork `python -m nanoswarm ARGS[3:]` with `env`, its stdout a new pipe (returned as the
        node's `stdout`), its stderr the descriptor `stderr`."""
        read_end, write_end = os.pipe()
        try:
            with self._send_lock:
                self._next_request += 1
                number = self._next_request
                request = {"request": number, "argv": ["nanoswarm", *args[3:]], "env": env,
                           "cwd": os.getcwd()}
                socket.send_fds(self._sock, [json.dumps(request).encode()], [write_end, stderr])
        except BaseException:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)  # the node holds its own copy: its end of the pipe ends with it
        stdout = os.fdopen(read_end, "r")
        with self._cond:
            if not self._cond.wait_for(lambda: number in self._spawned or not self.alive, timeout):
                stdout.close()
                raise TimeoutError(f"the node launcher did not fork within {timeout:.0f}s")
            pid = self._spawned.pop(number, None)
        if pid is None:
            stdout.close()
            raise RuntimeError(f"the node launcher exited with code {self.proc.poll()}")
        return ForkedNode(self, args, pid, stdout)

    def exit_code(self, pid: int) -> int | None:
        with self._cond:
            return self._code(pid)

    def wait_exit(self, pid: int, timeout: float | None) -> int | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while (code := self._code(pid)) is None:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                # Without a launcher no report comes: look at the pid now and then instead.
                self._cond.wait(left if self.alive else min(0.05, left or 0.05))
            return code

    def _code(self, pid: int) -> int | None:
        if pid not in self._exits and not self.alive:
            code = _orphan_exit(pid)
            if code is not None:
                self._exits[pid] = code
        return self._exits.get(pid)

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
                    self._exits[report["exited"]] = report["code"]
                else:
                    self._spawned[report["request"]] = report["pid"]
                self._cond.notify_all()


def _orphan_exit(pid: int) -> int | None:
    """A node of a launcher that died: no exit code can come, so it is 1 once the node is gone
    (its pid free, or a zombie that its new parent has not reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return 1
    except (OSError, IndexError):
        return None
    return 1 if state in ("Z", "X") else None


_launcher: Launcher | None = None
_launcher_lock = threading.Lock()


# What a process reads from its environment as it starts or as torch and its libraries load
# (Python's own, libgomp's, Intel's, OpenBLAS's, oneDNN's, torch's and CUDA's, the loader's, the C
# library's, the locale, ours): a forked node inherits the launcher's reading of these, so they
# must be the same. It reads the rest (PATH, HOME, TMPDIR, ...) from its own environment.
LOAD_TIME_VARS = ("PYTHON", "OMP_", "GOMP_", "KMP_", "MKL_", "OPENBLAS_", "ONEDNN_", "DNNL_",
                  "LRU_CACHE_CAPACITY", "TORCH", "PYTORCH", "CUDA", "NVIDIA", "LD_", "GLIBC_",
                  "MALLOC_", "LC_", "LANG", "NANOSWARM_")


def _load_time(env: dict[str, str], harness_key: str) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith(LOAD_TIME_VARS) and k != harness_key}


def launcher_for(args: list[str], env: dict[str, str], default_env: dict[str, str],
                 harness_key: str) -> Launcher | None:
    """The launcher that can fork this node (started on first use, with `default_env`: a node's
    environment when nothing is asked of it), or None where the node must be a process of its
    own: forking off, not a `python -m nanoswarm` command, an OpenMP binding, an environment
    whose LOAD_TIME_VARS (but `harness_key`) differ from the launcher's, or no fork here."""
    global _launcher
    if (sys.platform != "linux" or not hasattr(socket, "send_fds") or env.get(FORK_ENV, "1") == "0"
            or args[:3] != [sys.executable, "-m", "nanoswarm"]
            or any(k in env or k in default_env for k in BINDING_VARS)):
        return None
    with _launcher_lock:
        if (_launcher is None or not _launcher.alive or _launcher.proc.poll() is not None
                or _load_time(_launcher.env, harness_key) != _load_time(default_env, harness_key)):
            _launcher = Launcher(default_env)  # (one whose environment changed serves its nodes on)
        launcher = _launcher
    same = _load_time(env, harness_key) == _load_time(launcher.env, harness_key)
    return launcher if same else None


# ---- the launcher process ------------------------------------------------------------------

def _serve(sock: socket.socket) -> None:
    """Fork a node for each request, report its pid, and each node's exit code when it ends.
    Returns when the harness closes its end."""
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so that SIGCHLD writes to wake_w
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ)
    selector.register(wake_r, selectors.EVENT_READ)
    while True:
        for key, _ in selector.select():
            if key.fileobj is sock:
                data, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE, 2)
                if not data:
                    return
                request = json.loads(data)
                pid = os.fork()
                if pid == 0:
                    selector.close()
                    _run_node(request, fds, [sock.fileno(), wake_r, wake_w])
                for fd in fds:
                    os.close(fd)
                sock.send(json.dumps({"request": request["request"], "pid": pid}).encode())
            else:
                os.read(wake_r, 4096)
        while True:  # reap every node that ended, whichever wake-up told us
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            sock.send(json.dumps({"exited": pid, "code": os.waitstatus_to_exitcode(status)}).encode())


def _run_node(request: dict, fds: list[int], close: list[int]) -> None:
    """In the forked child: become `nanoswarm ARGV` with the request's environment and
    descriptors, as a process started for it would, and exit with its code. Never returns."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C as in any process
        for fd in close:
            os.close(fd)
        os.dup2(fds[0], 1)
        os.dup2(fds[1], 2)
        for fd in fds:
            os.close(fd)
        os.environ.clear()
        os.environ.update(request["env"])
        tempfile.tempdir = None  # read TMPDIR again, should the imports have read it
        os.chdir(request["cwd"])
        sys.argv = request["argv"]
        from nanoswarm.cli import main
        main(args=request["argv"][1:], prog_name="python -m nanoswarm")
        code = 0
    except SystemExit as e:
        if isinstance(e.code, int) or e.code is None:
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - what the interpreter would print at the top
        traceback.print_exc()
    finally:
        try:
            atexit._run_exitfuncs()  # what the interpreter runs on its way out
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the nodes and the harness
    sock = socket.socket(fileno=int(sys.argv[1]))
    # What every node imports (torch among them), once, before the first fork.
    import nanoswarm.cli  # noqa: F401
    import nanoswarm.node.daemon  # noqa: F401
    _serve(sock)


if __name__ == "__main__":
    main()
