"""The demo model shipped in the repository, and `nanoswarm demo` as a user runs it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nanoswarm.client.api import SwarmModel
from nanoswarm.client.generate import SamplingParams
from nanoswarm.shards import train
from nanoswarm.shards.demo import demo_model_dir
from nanoswarm.shards.manifest import read_manifest
from nanoswarm.shards.weights import load_model, read_verified

HELD_OUT_TOKENS = 4096


def marked_pids(mark: bytes) -> set[int]:
    """Processes whose environment holds `mark` (a NAME=VALUE the test gave the demo): its nodes and
    their launcher inherit it, whatever their command line says, and no one else's nodes (a
    review's nodes on the same demo model made a count by command line fail)."""
    pids = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if mark in (proc / "environ").read_bytes().split(b"\0"):
                pids.add(int(proc.name))
        except OSError:
            continue
    return pids


def test_demo_model_is_intact_and_small():
    model_dir = demo_model_dir()
    manifest = read_manifest(model_dir)
    config = manifest.config
    assert config.n_layer >= 4 and config.n_head >= 4 and config.vocab_size == 50257
    total = sum(f.stat().st_size for f in model_dir.iterdir())
    assert total <= 40 * 10**6
    for entry in manifest.files:  # every shard file matches the SHA-256 in the manifest
        assert read_verified(model_dir, entry)


def test_demo_model_beats_the_unigram_baseline():
    ids = train.tokenize_file(train.DEFAULT_TEXT)
    train_ids, val_ids = train.split_ids(ids, 0.1)
    unigram = train.unigram_val_loss(train_ids, val_ids[:HELD_OUT_TOKENS], 50257)
    gpt = load_model(demo_model_dir())
    with torch.inference_mode():
        loss = train.eval_loss(gpt, val_ids[:HELD_OUT_TOKENS], gpt.config.block_size)
    assert loss < unigram - 1.0, (loss, unigram)


@pytest.mark.slow
def test_demo_command_streams_text_and_matches_single_process(tmp_path):
    """`demo --json` gives the single-process text; a plain demo streams it to stdout and, stopped
    by the user with Ctrl-C, exits 130 and leaves no node log (it was kept as if something had
    failed) and no key files behind."""
    import signal

    mark = f"NANOSWARM_TEST_DEMO={os.getpid()}.{time.monotonic_ns()}"
    marked = {**os.environ, mark.partition("=")[0]: mark.partition("=")[2]}
    demo = [sys.executable, "-m", "nanoswarm", "demo"]
    # Both at once: each is mostly its start (torch's import, three nodes)
    with_json = subprocess.Popen([*demo, "ROMEO:", "--seed", "3", "--max-new-tokens", "40", "--json"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
                                 env=marked)
    plain = subprocess.Popen([*demo, "--seed", "3", "--max-new-tokens", "40"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                             env={**marked, "TMPDIR": str(tmp_path)})
    try:
        first = plain.stdout.read(len("ROMEO:") + 1)  # the default prompt, then text as it streams
        assert len(marked_pids(mark.encode())) >= 4  # its nodes (and launcher) carry the mark: the check can fail
        plain.send_signal(signal.SIGINT)
        rest, err = plain.communicate(timeout=60)
        out, out_err = with_json.communicate(timeout=180)
    finally:
        for proc in (plain, with_json):
            if proc.poll() is None:
                proc.kill()

    assert with_json.returncode == 0, out_err
    result = json.loads(out)
    local = SwarmModel.local(demo_model_dir()).generate(
        "ROMEO:", 40, SamplingParams(temperature=0.8, top_k=40, seed=3))
    assert result["ids"] == local.ids and result["text"] == local.text and len(local.text) > 20
    assert [s["layers"] for s in result["route"]] == [[0, 2], [2, 3], [3, 4]]
    log_file = re.search(r"\(node logs: (\S+), kept if it fails\)", out_err).group(1)
    assert not os.path.exists(log_file), "a demo that went well keeps no log file"

    assert plain.returncode == 130, err
    assert ("ROMEO:" + local.text).startswith((first + rest).decode().rstrip("\n"))
    log_file = re.search(r"\(node logs: (\S+), kept if it fails\)", err.decode()).group(1)
    assert not os.path.exists(log_file), "the user stopped it: no log kept"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("nanoswarm")] == []  # no key files
    deadline = time.monotonic() + 10  # (its launcher sees its parent gone within a second)
    while marked_pids(mark.encode()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not marked_pids(mark.encode()), "the demo left a node process behind"


def test_a_demo_whose_node_cannot_start_says_why(tiny_model_dir, tmp_path):
    """A node that fails to start writes its one line to the demo's log, not the terminal: the
    demo named the node and the log only (review207; `cluster` shows the node's line). It now
    quotes the log's last error line too."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    cut = [e.name for e in read_manifest(model).files if e.layers is not None and e.heads is None][-1]
    with open(model / cut, "r+b") as f:
        f.truncate(100)
    out = subprocess.run([sys.executable, "-m", "nanoswarm", "demo", "--model", str(model), "--nodes", "2",
                          "--max-new-tokens", "2"], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                         timeout=180, env={**os.environ, "TMPDIR": str(tmp_path)})
    assert out.returncode == 1, out.stderr
    assert f"(the last error there: {cut}: cannot read it" in out.stderr, out.stderr
    assert "it is 100 bytes" in out.stderr.splitlines()[-2]
    assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_a_demo_whose_reader_went_keeps_no_node_log(tiny_model_dir, tmp_path):
    """`demo | head -1`: the reader gone, the demo ends with the CLI's one line, and keeps no node
    log (it was kept as if a node had failed: review207)."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # gone before the first word, so the test does not race the generation
    try:
        out = subprocess.run([sys.executable, "-m", "nanoswarm", "demo", "--model", str(tiny_model_dir),
                              "--nodes", "2", "--max-new-tokens", "4"], stdout=write_end, stderr=subprocess.PIPE,
                             text=True, stdin=subprocess.DEVNULL, timeout=180,
                             env={**os.environ, "TMPDIR": str(tmp_path)})
    finally:
        os.close(write_end)
    assert out.returncode == 1, out.stderr
    assert out.stderr.splitlines()[-1] == "error: stdout's reader has gone (broken pipe): output stopped", out.stderr
    assert "node logs kept" not in out.stderr
    log_file = re.search(r"\(node logs: (\S+), kept if it fails\)", out.stderr).group(1)
    assert not os.path.exists(log_file)
