"""The launcher process (node/launcher.py has the harness's side): it imports torch and the
node's modules once, then forks a node for each request the harness sends over its socket and
reports each one's pid and exit code, until the harness is gone. Started by Launcher as
`python -m nanoswarm.node.launcher_process SOCKET_FD HARNESS_PID`."""

from __future__ import annotations

import atexit
import json
import os
import selectors
import signal
import socket
import sys
import tempfile
import traceback

from .launcher import MAX_MESSAGE


def _serve(sock: socket.socket, harness: int) -> None:
    """Fork a node for each request, report its pid (or why it could not be forked), and each
    node's exit code when it ends. Returns when the harness is gone: its end of the socket
    closed, or this process's parent changed (a process forked from the harness, such as a
    multiprocessing worker, holds a copy of that end and could keep it open long after)."""
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so that SIGCHLD writes to wake_w
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ)
    selector.register(wake_r, selectors.EVENT_READ)
    numbers: dict[int, int] = {}  # pid -> request number, for the exit reports
    try:
        while os.getppid() == harness:
            for key, _ in selector.select(timeout=0.5):
                if key.fileobj is not sock:
                    os.read(wake_r, 4096)
                    continue
                data, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE, 2)
                if not data:
                    return
                if os.getppid() != harness:  # gone since we looked: fork nothing more for it
                    return
                request = None
                try:
                    request = json.loads(data)
                    number = int(request["request"])
                    if len(fds) != 2:
                        raise ValueError(f"{len(fds)} descriptors with the request, not 2")
                    pid = os.fork()
                except (OSError, ValueError, KeyError, TypeError) as e:  # e.g. no process left to fork
                    for fd in fds:
                        os.close(fd)
                    number = request.get("request") if isinstance(request, dict) else None
                    sock.send(json.dumps({"request": number, "error": str(e) or type(e).__name__}).encode())
                    continue
                if pid == 0:
                    selector.close()
                    _run_node(request, fds, [sock.fileno(), wake_r, wake_w])
                for fd in fds:
                    os.close(fd)
                numbers[pid] = number
                sock.send(json.dumps({"request": number, "pid": pid}).encode())
            while True:  # reap every node that ended, whichever wake-up told us
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid == 0:
                    break
                code = os.waitstatus_to_exitcode(status)
                sock.send(json.dumps({"exited": numbers.pop(pid, None), "code": code}).encode())
    except (BrokenPipeError, ConnectionResetError):
        return  # the harness went while we were telling it something


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
            if fd > 2:
                os.close(fd)
        if sys.stderr is None:  # the harness started us without a stderr: the node has one now
            sys.stderr = open(2, "w", buffering=1, closefd=False)
        if request.get("cpus"):
            try:
                os.sched_setaffinity(0, request["cpus"])
            except OSError:  # cores this process may not use: stay where the launcher runs
                pass
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
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # (already, from the harness: _ignore_ctrl_c)
    sock = socket.socket(fileno=int(sys.argv[1]))
    harness = int(sys.argv[2])  # our parent: given, since it may be gone before we look
    if os.getppid() != harness:
        return
    # What every node imports (torch among them), once, before the first fork.
    import nanoswarm.cli  # noqa: F401
    import nanoswarm.node.daemon  # noqa: F401
    _serve(sock, harness)


if __name__ == "__main__":
    main()
