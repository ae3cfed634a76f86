"""The `nanoswarm` command: parses options and calls the rooms (shards, node, client, keys).

Results go to stdout; logs and progress to stderr. A failure exits non-zero with one line. This
module holds the top-level group and how it reports failures; each room's commands have a module
of their own here (shards, node, client, keys, harness), and params.py the parsers they share.
"""

from __future__ import annotations

# The package's __init__ has set the OpenMP wait defaults before anything imports torch.
import atexit
import logging
import os
import select
import signal
import sys
import threading
from typing import Any

import click

from nanoswarm import __version__, descriptors

from . import client, harness, info, keys, node, shards


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING - 10 * verbose
    # The level in every line: an operator greps a long-running node's log for WARNING and ERROR.
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")


def _fail(message: str, code: int) -> None:
    """Exit with one `error:` line: an exception's text can span lines (torch's do) or be empty
    (MemoryError's), and either way the user gets one line that says something."""
    click.echo(f"error: {' '.join(message.split())}", err=True)
    sys.exit(code)


# click >= 8.2 signals "no arguments: show the help" as a UsageError; that is no failure.
_NO_ARGS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


def _help(e: click.UsageError) -> None:
    """`nanoswarm` or `nanoswarm keys` alone: the help is what was asked for, on stdout."""
    click.echo(e.ctx.get_help() if e.ctx is not None else e.format_message())
    sys.exit(0)


class _CleanErrors(click.Group):
    """Expected failures print one line, not a traceback or a usage block."""

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: Any) -> click.Context:
        # The top-level options are parsed here, before invoke(): `nanoswarm --bogus`.
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except _NO_ARGS_HELP as e:
            _help(e)
        except click.ClickException as e:
            _fail(e.format_message(), e.exit_code)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            try:
                return super().invoke(ctx)
            finally:
                atexit.unregister(_quiet_exit)  # (the command may have registered hooks: torch's)
                atexit.register(_quiet_exit)
        except _NO_ARGS_HELP as e:
            _help(e)
        except click.ClickException as e:  # bad options of a subcommand (exit code 2, as click's), or ours
            message = e.format_message()
            if isinstance(e, click.NoSuchOption) and e.option_name in ("-v", "-vv", "-vvv", "--verbose"):
                message += " (it is the program's: put it before the command, `nanoswarm -v generate ...`)"
            _fail(message, e.exit_code)
        except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM/SIGHUP (Interrupted): cleaned up on the way
            sys.exit(128 + getattr(e, "signum", signal.SIGINT))  # the shell's convention: 130 for Ctrl-C
        except (click.exceptions.Exit, click.Abort):
            raise
        except Exception as e:  # noqa: BLE001 - the top of the program
            if isinstance(e, BrokenPipeError) and _stdout_reader_gone():  # `generate | head -c 100`
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, 1)  # the exit's flush of what is left goes nowhere
                os.close(devnull)
                _fail("stdout's reader has gone (broken pipe): output stopped", 1)
            if os.environ.get("NANOSWARM_DEBUG"):
                raise
            message = str(e) or type(e).__name__
            if (short := descriptors.explain(e)) is not None:  # the cause first (review143)
                message = f"{short}; {message}"
            _fail(message, 1)


@click.group(cls=_CleanErrors)
@click.version_option(__version__, prog_name="nanoswarm")
@click.option("-v", "--verbose", count=True, help="More logging on stderr (-v info, -vv debug).")
def main(verbose: int) -> None:
    """nanoswarm: run a GPT across peers that each hold a slice of it."""
    _null_closed_stdout()
    _setup_logging(verbose)
    # Every link is a socket: a soft limit of 1,024 under a higher hard one is raised to it (a node
    # at its limit accepted no one more, review141). Nodes a harness starts inherit it.
    if (raised := descriptors.raise_limit()) is not None:
        logging.getLogger(__name__).debug("file descriptor limit raised from %d to %d", *raised)
    # `kill`, `timeout`, a service manager or a closed terminal end a command as Ctrl-C does, so
    # its cleanup runs: nodes stopped, key files and temporary models removed, sessions closed
    # on the nodes. (A node installs its own handlers: it leaves the swarm gracefully.)
    if threading.current_thread() is threading.main_thread():  # (click's test runner may call us elsewhere)
        for signum in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, _interrupt)
        if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
            # A script's background job starts with SIGINT ignored, and Python then leaves it so:
            # `kill -INT` did nothing to a cluster, generate or load started that way (a review).
            signal.signal(signal.SIGINT, signal.default_int_handler)


def _null_closed_stdout() -> None:
    """A command started with stdout closed (`>&-`) writes it to /dev/null, as `> /dev/null`
    does: `generate` failed after generating with "'NoneType' object has no attribute 'flush'"
    (a review). Taking descriptor 1 also keeps the next file or socket opened from becoming it."""
    if sys.stdout is None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        if devnull != 1:
            os.dup2(devnull, 1)
            os.close(devnull)
        sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115 - the process's stdout, never closed


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe with no reader left (poll reports an error on its write end)."""
    try:
        poller = select.poll()
        poller.register(1, select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except OSError:
        return False


def _quiet_exit() -> None:
    """At exit, after the command: a signal just ends the process. A node that load or cluster
    stops while it exits by itself (a bad option) printed the Interrupted raised in torch's
    atexit finalizers as a traceback. (Registered again as each command ends, so that it runs
    before every exit hook, torch's included: atexit runs the last registered first.)"""
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(signum, signal.SIG_DFL)


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the program is, like Ctrl-C's KeyboardInterrupt."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# Signals whose Interrupted was raised, for raise_swallowed: pyzmq checks for signals as it frees
# a message frame, and an exception raised there is only printed ("Exception ignored in
# Frame.__dealloc__"): a SIGHUP then left a generation running to its end, exit code 0.
_raised: list[int] = []


def _interrupt(signum: int, frame: object) -> None:
    _raised.append(signum)
    raise Interrupted(signum)


def forget_signals() -> None:
    """Forget the signals raised so far: raise_swallowed is for those of the command running."""
    _raised.clear()


def raise_swallowed() -> None:
    """Raise again, once, a signal's Interrupted that a destructor may have swallowed: for loops
    that would otherwise run on (generate's, at each token). Only one that got away comes here."""
    if _raised:
        signum = _raised.pop()
        _raised.clear()
        raise Interrupted(signum)


for command in (shards.shard, shards.train, node.node, client.generate, client.peers, info.info, keys.keys,
                harness.cluster, harness.demo, harness.bench, harness.load):
    main.add_command(command)
