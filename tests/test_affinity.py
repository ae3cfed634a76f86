"""Where a local swarm's nodes compute: each OpenMP thread of a node on a core of its own, ZeroMQ's
threads on every core (node/affinity.py)."""

from __future__ import annotations

import os
import sys

import pytest
import zmq
from test_swarm import PROMPT_LEN, random_ids, reference_logits, swarm_logits  # the same check

from nanoswarm import START_CPUS
from nanoswarm.client.api import SwarmModel
from nanoswarm.node.affinity import BINDING_VARS, bind_openmp, child_cpus, openmp_places
from nanoswarm.node.cluster import NodeSpec, threads_of


def test_a_node_command_threads_are_its_last_threads_option():
    assert threads_of(["nanoswarm", "node", "m", "--threads", "2", "--threads", "1"]) == 1
    assert threads_of(["nanoswarm", "node", "m", "--threads=3"]) == 3
    assert threads_of(["nanoswarm", "node", "m"]) is None


def test_places_give_each_thread_a_core_in_turn():
    assert openmp_places(0, 2, [0, 1]) == "{0},{1}"
    assert openmp_places(3, 2, [0, 1]) == "{0},{1}"  # more nodes than cores: they share
    assert openmp_places(1, 2, [0, 1, 2, 3]) == "{2},{3}"
    assert openmp_places(2, 2, [4, 5, 6, 7]) == "{4},{5}"
    assert openmp_places(0, 8, [0, 1]) == "{0},{1}"  # more threads than cores: one place each


def test_binding_leaves_the_users_choice_and_single_threads_alone():
    assert "OMP_PLACES" not in bind_openmp({"NANOSWARM_BIND": "0"}, 0, 2)
    assert bind_openmp({"OMP_PROC_BIND": "false"}, 0, 2) == {"OMP_PROC_BIND": "false"}
    assert bind_openmp({"OMP_PLACES": "cores"}, 0, 2) == {"OMP_PLACES": "cores"}
    assert "OMP_PLACES" not in bind_openmp({}, 0, 1)
    assert "OMP_PLACES" not in bind_openmp({}, 0, None)  # torch's default count: not known here
    assert bind_openmp({"GOMP_CPU_AFFINITY": "1 0"}, 0, 2) == {"GOMP_CPU_AFFINITY": "1 0"}
    env = bind_openmp({}, 0, 2)
    if len(os.sched_getaffinity(0)) >= 2:
        assert env["OMP_PROC_BIND"] == "close" and env["OMP_PLACES"].count("{") == 2


def test_one_core_binds_nothing_and_a_child_told_not_to_bind_is_left_as_forked(monkeypatch):
    """With one core a node's threads are not bound (one place would hold them all, and a bound
    thread cannot move off a busy core). A harness whose thread OpenMP bound starts its nodes on
    every core it started with, unless their environment says NANOSWARM_BIND=0 (the user's
    restriction stays), and leaves them as forked where no binding is in its environment."""
    import nanoswarm.node.affinity as affinity

    monkeypatch.setattr(affinity, "START_CPUS", frozenset({3}))
    assert bind_openmp({}, 0, 2) == {}
    monkeypatch.setattr(affinity, "START_CPUS", frozenset({0, 1}))
    assert bind_openmp({}, 1, 2) == {"OMP_PLACES": "{0},{1}", "OMP_PROC_BIND": "close"}
    for var in BINDING_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(affinity.os, "sched_getaffinity", lambda pid: {1}, raising=False)  # bound to one core
    assert child_cpus({}) is None  # no binding here: as forked
    monkeypatch.setenv("OMP_PROC_BIND", "close")
    assert child_cpus({}) == frozenset({0, 1})
    assert child_cpus({"NANOSWARM_BIND": "0"}) is None


def _affinities(pid: int) -> dict[int, tuple[str, set[int]]]:
    """Thread id -> (name, the CPUs it may run on) for every thread of `pid`."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            name = open(f"/proc/{pid}/task/{tid}/comm").read().strip()
            out[int(tid)] = (name, os.sched_getaffinity(int(tid)))
        except OSError:  # the thread ended meanwhile
            pass
    return out


def _places(index: int, threads: int) -> list[set[int]]:
    return [{int(p.strip("{}"))} for p in openmp_places(index, threads, sorted(START_CPUS)).split(",")]


def _check_node(pid: int, places: list[set[int]]) -> None:
    """The main thread on the node's first place, its OpenMP worker on the second, and ZeroMQ's
    I/O threads on every core."""
    threads = _affinities(pid)
    assert threads[pid][1] == places[0], threads
    assert any(cpu == places[1] for tid, (_, cpu) in threads.items() if tid != pid), threads
    zmq_threads = [cpu for name, cpu in threads.values() if name.startswith("ZMQbg")]
    assert zmq_threads and all(cpu == START_CPUS for cpu in zmq_threads), threads


def _exact(model_dir, addresses: list[str]) -> None:
    model = SwarmModel.connect(model_dir, peers=addresses)
    try:
        ids = random_ids(PROMPT_LEN + 8)
        got, want = swarm_logits(model, ids), reference_logits(model_dir, ids)[PROMPT_LEN - 1:]
        assert (got - want).abs().max().item() <= 1e-5
    finally:
        model.close()


# (a node on contended cores halves its threads, its main thread unbound, for a while: node/threads.py)
FIXED_THREADS = {"NANOSWARM_ADAPT_THREADS": "0"}

needs_two_cpus = pytest.mark.skipif(sys.platform != "linux" or len(START_CPUS) < 2,
                                    reason="needs Linux affinity and 2 CPUs")


@needs_two_cpus
def test_nodes_bind_openmp_threads_and_float_zeromq_threads(tiny_model_dir, cluster_factory):
    """Three 2-thread nodes (one started with --threads 1 in its own args: left unbound): each
    bound node's main thread and OpenMP worker on the cores openmp_places gives it, ZeroMQ's
    I/O threads on all, exact logits."""
    cluster = cluster_factory(tiny_model_dir, [NodeSpec((0, 2)), NodeSpec((2, 4)),
                                               NodeSpec((0, 4), args=["--threads", "1"])], threads=2,
                              env=FIXED_THREADS)
    _exact(tiny_model_dir, cluster.addresses[:2])
    for index, node in enumerate(cluster.nodes[:2]):
        _check_node(node.pid, _places(index, 2))
    assert all(cpu == START_CPUS for _, cpu in _affinities(cluster.nodes[2].pid).values())


@needs_two_cpus
def test_a_bound_harness_starts_nodes_on_every_core(tiny_model_dir, cluster_factory, monkeypatch):
    """A harness process that loaded torch with an OpenMP binding of the user's (here: its main
    thread bound to one core, the binding in its environment) starts its nodes on every core it
    had, so they bind as that environment says instead of all computing on the one core."""
    cpus = sorted(START_CPUS)
    zmq.Context.instance().socket(zmq.DEALER).close()  # this process's I/O threads: started unbound
    monkeypatch.setenv("OMP_PROC_BIND", "close")
    monkeypatch.setenv("OMP_PLACES", f"{{{cpus[1]}}},{{{cpus[0]}}}")
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpus[-1]})
    try:
        cluster = cluster_factory(tiny_model_dir, [NodeSpec((0, 4))], threads=2, env=FIXED_THREADS)
    finally:
        os.sched_setaffinity(0, before)
    _exact(tiny_model_dir, cluster.addresses)
    _check_node(cluster.nodes[0].pid, [{cpus[1]}, {cpus[0]}])
