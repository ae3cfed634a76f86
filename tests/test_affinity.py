"""Where a local swarm's nodes compute: each OpenMP thread of a node on a core of its own, ZeroMQ's
threads on every core (node/affinity.py)."""

from __future__ import annotations

import os
import sys

import pytest
from test_swarm import PROMPT_LEN, random_ids, reference_logits, swarm_logits  # the same check

from nanoswarm import START_CPUS
from nanoswarm.client.api import SwarmModel
from nanoswarm.node.affinity import bind_openmp, openmp_places
from nanoswarm.node.cluster import NodeSpec


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
    env = bind_openmp({}, 0, 2)
    if len(os.sched_getaffinity(0)) >= 2:
        assert env["OMP_PROC_BIND"] == "close" and env["OMP_PLACES"].count("{") == 2


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


@pytest.mark.skipif(sys.platform != "linux" or len(START_CPUS) < 2, reason="needs Linux affinity and 2 CPUs")
def test_nodes_bind_openmp_threads_and_float_zeromq_threads(tiny_model_dir, cluster_factory):
    """Two 2-thread nodes started by a harness whose own main thread is bound to one core (as
    OpenMP binds it when torch loads with OMP_PROC_BIND set): each node still gets every core,
    binds its main thread and its OpenMP worker to two different ones, leaves ZeroMQ's I/O
    threads on all, and computes exact logits."""
    cpus = sorted(START_CPUS)
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpus[-1]})
    try:
        cluster = cluster_factory(tiny_model_dir, [NodeSpec((0, 2)), NodeSpec((2, 4))], threads=2)
    finally:
        os.sched_setaffinity(0, before)
    model = SwarmModel.connect(tiny_model_dir, peers=cluster.addresses)
    try:
        ids = random_ids(PROMPT_LEN + 8)
        got, want = swarm_logits(model, ids), reference_logits(tiny_model_dir, ids)[PROMPT_LEN - 1:]
        assert (got - want).abs().max().item() <= 1e-5
    finally:
        model.close()
    for node in cluster.nodes:
        threads = _affinities(node.pid)
        assert threads[node.pid][1] == {cpus[0]}, threads  # the main thread: the node's first place
        assert any(cpu == {cpus[1]} for _, cpu in threads.values()), threads  # its OpenMP worker
        zmq_threads = [cpu for name, cpu in threads.values() if name.startswith("ZMQbg")]
        assert zmq_threads and all(cpu == START_CPUS for cpu in zmq_threads), threads
