"""The `nanoswarm` command as a user runs it: real subprocesses, stdout and exit codes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from conftest import TINY

from nanoswarm.client.api import SwarmModel
from nanoswarm.client.generate import SamplingParams
from nanoswarm.shards.loaders import save_nanogpt_checkpoint
from nanoswarm.shards.model import GPT

CLI = [sys.executable, "-m", "nanoswarm"]


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still has a pid: look at its state
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_shard_command_writes_a_model_dir(tmp_path):
    torch.manual_seed(0)
    model = GPT(TINY)
    ckpt = tmp_path / "ckpt.pt"
    save_nanogpt_checkpoint(TINY, model.flat_state_dict(), ckpt)
    out = run_cli("shard", str(ckpt), str(tmp_path / "m"), "--layers-per-shard", "2", "--json")
    assert out.returncode == 0, out.stderr
    manifest = json.loads(out.stdout)
    roles = sorted(f["role"] for f in manifest["files"])
    assert roles == ["blocks", "blocks", "embeddings", "head"]
    assert (tmp_path / "m" / "manifest.json").exists()


def test_cluster_generate_and_clean_stop(tiny_model_dir):
    proc = subprocess.Popen([*CLI, "cluster", str(tiny_model_dir), "--nodes", "3"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        lines = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline().strip()
            if line == "ready" or not line and proc.poll() is not None:
                break
            lines.append(line)
        assert len(lines) == 3, lines
        addresses = [line.split()[0] for line in lines]
        pids = [int(line.split("pid")[1].split()[0]) for line in lines]
        assert all(pid_alive(p) for p in pids)

        local = SwarmModel.local(tiny_model_dir).generate("To be", 12, SamplingParams(temperature=0))
        out = run_cli("generate", "To be", "--model", str(tiny_model_dir), "--peers", ",".join(addresses),
                      "--temperature", "0", "--max-new-tokens", "12")
        assert out.returncode == 0, out.stderr
        assert out.stdout == "To be" + local.text + "\n"  # stdout carries only the text
        assert "route:" in out.stderr

        for links in ("--relay", "--no-relay"):
            out = run_cli("generate", "To be", "--model", str(tiny_model_dir), "--peers", ",".join(addresses),
                          "--temperature", "0", "--max-new-tokens", "12", "--json", links)
            assert out.returncode == 0, out.stderr
            result = json.loads(out.stdout)
            assert result["ids"] == local.ids and result["text"] == local.text
            assert [s["layers"] for s in result["route"]] == [[0, 2], [2, 3], [3, 4]]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    deadline = time.monotonic() + 10
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(pid_alive(p) for p in pids), "a node process was left behind"


def test_generate_names_uncovered_layers(tiny_model_dir, cluster_factory):
    from nanoswarm.node.cluster import NodeSpec

    swarm = cluster_factory(tiny_model_dir, [NodeSpec((0, 2))])
    out = run_cli("generate", "x", "--model", str(tiny_model_dir), "--peers", swarm.addresses[0])
    assert out.returncode != 0
    assert out.stderr.strip().splitlines()[-1] == "error: no peer serves layers 2:4"


def test_node_refuses_a_tampered_shard(tiny_model_dir, tmp_path):
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    victim = sorted(copy.glob("blocks-1-2.safetensors"))[0]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    out = run_cli("node", str(copy), "--layers", "0:2", timeout=60)
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "blocks-1-2.safetensors" in last


def test_node_refuses_a_zero_limit(tiny_model_dir):
    """0 is a limit, not "not given": the node refuses it rather than fall back to the default."""
    for option in ("--kv-budget-mb", "--max-message-mb", "--max-sessions"):
        out = run_cli("node", str(tiny_model_dir), "--layers", "0:4", "--insecure", option, "0", timeout=60)
        last = out.stderr.strip().splitlines()[-1]
        assert out.returncode != 0 and last.startswith("error:") and "must be a positive number" in last, out.stderr
