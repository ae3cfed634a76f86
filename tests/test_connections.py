"""A client's connection that drops takes its sessions on the nodes with it (node/connections.py):
a killed or frozen client no longer holds slots and KV caches until the idle timeout. Real node
processes, and clients in processes of their own, killed and stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import sessions_on

from nanoswarm.client.api import SwarmModel
from nanoswarm.client.transport import PeerConnection, PeerError
from nanoswarm.node.cluster import NodeSpec
from nanoswarm.node.sessions import DROPPED

# A client in a process of its own: opens `n` sessions on the node, prints their ids, then waits.
HOLDER = """
import sys, time
from nanoswarm.client.transport import PeerConnection
conn = PeerConnection(sys.argv[1], timeout=10.0)
ids = [conn.request("open", {"max_length": 8}).fields["session"] for _ in range(int(sys.argv[2]))]
print(" ".join(ids), flush=True)
time.sleep(600)
"""


def hold_sessions(address: str, n: int = 2) -> tuple[subprocess.Popen, list[str]]:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, address, str(n)], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        raise AssertionError(f"the holder opened no session (exit {proc.wait()})")
    return proc, line.split()


def wait_for_sessions(address: str, n: int, seconds: float) -> float:
    """Seconds until the node holds `n` sessions; fails after `seconds`."""
    start = time.monotonic()
    while (held := sessions_on(address)) != n:
        assert time.monotonic() - start < seconds, f"the node still holds {held} sessions, not {n}"
        time.sleep(0.1)
    return time.monotonic() - start


def why_closed(address: str, session_id: str) -> str:
    """What the node tells a step of a session that ended."""
    conn = PeerConnection(address, timeout=5.0)
    try:
        with pytest.raises(PeerError) as e:
            conn.request("step", {"session": session_id, "pos": 0}, [])
        return f"{e.value.code}: {e.value}"
    finally:
        conn.close()


def test_a_killed_clients_sessions_close_at_once(tiny_model_dir, cluster_factory):
    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 4))])  # idle timeout 300 s
    node = swarm.addresses[0]
    holder, ids = hold_sessions(node)
    other, kept = hold_sessions(node, 1)  # another client, alive throughout
    try:
        assert sessions_on(node) == 3
        holder.kill()
        holder.wait()
        assert wait_for_sessions(node, 1, seconds=10) < 5
        for session_id in ids:
            assert DROPPED in why_closed(node, session_id)
        assert "unknown_session" in why_closed(node, kept[0])  # alive, and not ours to step
    finally:
        for proc in (holder, other):
            proc.kill()
            proc.wait()
    wait_for_sessions(node, 0, seconds=10)


def test_a_frozen_clients_sessions_close_after_its_silence(tiny_model_dir, cluster_factory):
    """SIGSTOP: its kernel keeps the connection, but libzmq stops answering the node's heartbeats.
    A fifth of the idle timeout later (5 s here) the node drops it, long before the timeout."""
    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 4), args=["--idle-timeout", "25"])])
    node = swarm.addresses[0]
    holder, ids = hold_sessions(node)
    try:
        os.kill(holder.pid, signal.SIGSTOP)
        took = wait_for_sessions(node, 0, seconds=15)
        assert 4 < took < 15, took  # not before the silence: heartbeats, not something else
        assert DROPPED in why_closed(node, ids[0])
    finally:
        holder.kill()  # (SIGKILL ends a stopped process too)
        holder.wait()


def test_an_idle_live_client_keeps_its_session_past_the_silence(tiny_model_dir, cluster_factory):
    """A client that only waits (no steps) still answers heartbeats: its session stays, and its
    tokens are the ones of a session that never waited. Also a client whose connection sends no
    heartbeats of its own (libzmq answers the node's)."""
    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 4), args=["--idle-timeout", "25"])])
    node = swarm.addresses[0]
    model = SwarmModel.connect(tiny_model_dir, peers=swarm.addresses)
    local = SwarmModel.local(tiny_model_dir)
    quiet = PeerConnection(node, timeout=5.0)  # heartbeat None: only answers
    try:
        s, ref = model.session(8), local.session(8)
        x = model.client.embed([1, 2, 3], 0)
        s.step(x), ref.step(x)
        quiet_id = quiet.request("open", {"max_length": 8}).fields["session"]
        time.sleep(8)  # past the node's 5 s of silence, within its 25 s idle timeout
        x = model.client.embed([4], 3)
        assert (s.step(x) - ref.step(x)).abs().max() <= 1e-5
        assert s.failovers == 0 and sessions_on(node) == 2
        assert quiet.request("step", {"session": quiet_id, "pos": 0}, [x]).type == "result"
        s.close()
    finally:
        quiet.close()
        model.close()


def test_connections_that_come_and_go_take_only_their_own_sessions(tiny_model_dir, cluster_factory):
    """Descriptors are reused: a connection that drops must close its sessions only, never those
    of a later connection that got its descriptor (node/connections.py, on the order of reads)."""
    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 4))])
    node = swarm.addresses[0]
    kept = PeerConnection(node, timeout=5.0)
    try:
        kept_id = kept.request("open", {"max_length": 8}).fields["session"]
        alive = []
        for i in range(20):
            conn = PeerConnection(node, timeout=5.0)
            conn.request("open", {"max_length": 8})
            if i % 2:
                alive.append(conn)  # kept open
            else:
                conn.socket.close(linger=0)  # dropped, its session not closed by a message
                conn.monitor.close()
        wait_for_sessions(node, 1 + len(alive), seconds=10)
        time.sleep(0.5)  # (any late drop would show now)
        assert sessions_on(node) == 1 + len(alive)
        assert kept.request("close", {"session": kept_id}).type == "closed"
    finally:
        kept.close()
        for conn in alive:
            conn.close()
    wait_for_sessions(node, 0, seconds=10)
