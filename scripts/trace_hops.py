"""Where a token's time goes on each node, traced: `scripts/decode_loop.py` run on a copy of the
package with timestamp probes in its node loop, so the package itself never carries them.

    .venv/bin/python scripts/trace_hops.py [--shape gpt2-small] [--stages 4 | --head-groups 2]
        [--seconds 10] [--insecure] [--json]

Each node appends (probe, `time.perf_counter_ns()`) at a handful of places of its loop and writes
them when it stops; CLOCK_MONOTONIC is one clock for every process, so one node's send can be
set against the next node's wake-up. Printed per node (route order), medians over its turns
that ran a forward pass, in us: wake-up (its poll's return) to the batch read (`_drain`,
`_gather`), to its first message decoded, to its first step checked (with one session a batch,
the step), to the pass; the pass; the pass's blocks one by one (a relayed decode step's node:
the first block of a pass is the slowest, docs/performance.md, fifty-seventh session); the pass's
end to the replies made; the sends. Then
each link: a node's replies made (its send) to the next node's wake-up. For a head group's
members, the phase gap: the end of one forward pass to the start of the next, gaps of 2 ms or
more (a token's end to the next token's start) left out (the fifty-sixth session's measure: it
moved 3-10 us between runs of the same code, where a token's median moves ~1 ms).

A probe costs ~0.1-0.3 us warm; the tokens come out within the noise of an untraced run. For CPU
nodes: on a GPU the pass's probes would time kernel launches (they come before the copy back).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the repository: the package's root (pyproject)
PROBE = "from nanoswarm.node._probes import mark as _mark; "
PROBES_MODULE = '''"""Timestamp probes of scripts/trace_hops.py (this copy of the package only)."""
import os
import time

_marks: list = []
_ns = time.perf_counter_ns


def mark(probe: int) -> None:
    _marks.append((probe, _ns()))


def dump() -> None:
    where = os.environ.get("NANOSWARM_TRACE_DIR")  # (set by scripts/trace_hops.py)
    if where and _marks:
        with open(os.path.join(where, f"{os.getpid()}.txt"), "w") as f:
            f.writelines(f"{p} {t}\\n" for p, t in _marks)
'''
WAKE, READ, DECODED, CHECKED, PASS, PASSED, REPLIES, SENT = range(8)
BLOCK = 100  # + the block's index within the pass: its end
# (segment name, from probe, to probe), in a turn's order
SEGMENTS = [("wake->read", WAKE, READ), ("read->decoded", READ, DECODED), ("decoded->checked", DECODED, CHECKED),
            ("checked->pass", CHECKED, PASS), ("pass", PASS, PASSED), ("pass->replies", PASSED, REPLIES),
            ("send", REPLIES, SENT)]

# (file, the text a probe goes after, the probe), each text found exactly once: a change of the
# code that moves one fails here, before anything runs (tests/test_bench.py runs this script).
INSERTIONS = [
    ("node/server.py", "                ready = dict(self._poller.poll(self._sleep_ms(deadline)))\n", WAKE),
    ("node/server.py",
     "        gone = self.connections.note(batch)  # (new peers: drops read first, node/connections.py)\n", READ),
    ("node/handler.py", "                msg = decode(frames, self.limits.max_message_bytes, types=REQUEST_TYPES)\n",
     DECODED),
    ("node/handler.py", "                    pending[-1].sender = peer\n", CHECKED),
]
REPLACEMENTS = [  # (file, text, its traced version)
    ("node/steps.py", "        y = fn()\n",
     f"        {PROBE}_mark({PASS})\n        y = fn()\n        _mark({PASSED})\n"),
    ("node/server.py", "        self._send_all(self.handler.handle_batch(batch))\n",
     f"        _replies = self.handler.handle_batch(batch)\n        {PROBE}_mark({REPLIES})\n"
     f"        self._send_all(_replies)\n        _mark({SENT})\n"),
    ("node/server.py", "        finally:\n            self.close()\n",
     "        finally:\n            try:\n                from nanoswarm.node._probes import dump as _dump\n"
     "                _dump()\n            finally:\n                self.close()\n"),
    ("shards/model.py",
     "        for j, i in enumerate(range(start, stop)):\n            x = self.h[str(i)](x, caches, j)\n",
     f"        {PROBE.strip()}\n        for j, i in enumerate(range(start, stop)):\n"
     f"            x = self.h[str(i)](x, caches, j)\n            _mark({BLOCK} + j)\n"),
]


def traced_copy(into: Path) -> Path:
    """A copy of the package under `into`/nanoswarm with the probes in; the PYTHONPATH entry."""
    package = into / "nanoswarm"
    shutil.copytree(ROOT, package, ignore=shutil.ignore_patterns(
        ".*", "tests", "docs", "scripts", "__pycache__", "*.egg-info", "demo"))
    for name, after, probe in INSERTIONS:
        indent = re.match(r" *", after.splitlines()[-1]).group(0)
        _replace(package / name, after, f"{after}{indent}{PROBE}_mark({probe})\n")
    for name, text, traced in REPLACEMENTS:
        _replace(package / name, text, traced)
    (package / "node" / "_probes.py").write_text(PROBES_MODULE)
    return into


def _replace(path: Path, text: str, new: str) -> None:
    source = path.read_text()
    if source.count(text) != 1:
        sys.exit(f"trace_hops: {path.relative_to(path.parents[1])} holds {source.count(text)} copies of "
                 f"{text.strip()[:70]!r}, not one: update this script's probes")
    path.write_text(source.replace(text, new))


def read_marks(path: Path) -> list[tuple[int, int]]:
    """A node's (probe, time) marks, in the order they were made."""
    return [(int(p), int(t)) for p, t in (line.split() for line in path.read_text().splitlines())]


def turns(marks: list[tuple[int, int]]) -> list[dict[int, int]]:
    """A node's loop turns that ran a forward pass: probe -> its first time in the turn."""
    found, turn = [], None
    for probe, t in marks:
        if probe == WAKE:
            if turn is not None and PASS in turn:
                found.append(turn)
            turn = {WAKE: t}
        elif turn is not None:
            turn.setdefault(probe, t)
    if turn is not None and PASS in turn:
        found.append(turn)
    return found


def median_us(values: list[int]) -> float | None:
    return round(statistics.median(values) / 1e3, 1) if values else None


def node_figures(pid: int, marks: list[tuple[int, int]], ts: list[dict[int, int]]) -> dict:
    """One node's medians (us) from its marks and its turns (`turns(marks)`)."""
    segments = {}
    for name, a, b in SEGMENTS:
        values = [t[b] - t[a] for t in ts if a in t and b in t and t[b] >= t[a]]
        if len(values) >= len(ts) / 2:  # (a member's turns that only took a partial have no pass)
            segments[name] = median_us(values)
    blocks = []
    while True:
        k = BLOCK + len(blocks)
        start = PASS if k == BLOCK else k - 1
        values = [t[k] - t[start] for t in ts if k in t and start in t]
        if len(values) < len(ts) / 2 or not values:
            break
        blocks.append(median_us(values))
    # Every pass (a member's phases too), not only a turn's first: end -> next start, within a
    # token (a layer node's passes are a token apart: none of its gaps count).
    passes = [(p, t) for p, t in marks if p in (PASS, PASSED)]
    gaps = [b[1] - a[1] for a, b in zip(passes, passes[1:]) if a[0] == PASSED and b[0] == PASS
            and b[1] - a[1] < 2_000_000]
    return {"pid": pid, "turns": len(ts), "segments": segments, "blocks": blocks,
            "passes": sum(p == PASS for p, _ in passes),
            "phase_gap": median_us(gaps) if len(gaps) >= len(ts) / 2 else None}


def link_us(sender: list[dict[int, int]], receiver: list[tuple[int, int]]) -> float | None:
    """Median time from the sender's replies made (its send; its turns) to the receiver's next
    wake-up (its marks)."""
    sends = [t[REPLIES] for t in sender if REPLIES in t]
    wakes = sorted(t for p, t in receiver if p == WAKE)
    values, j = [], 0
    for sent in sends:
        while j < len(wakes) and wakes[j] < sent:
            j += 1
        if j < len(wakes) and wakes[j] - sent < 5_000_000:
            values.append(wakes[j] - sent)
    return median_us(values)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="gpt2-small")
    ap.add_argument("--stages", type=int, default=4)
    ap.add_argument("--head-groups", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work-dir", type=Path, help="where the random-weight model dir is kept")
    ap.add_argument("--insecure", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="nanoswarm-trace-") as tmp:
        tmp = Path(tmp)
        traces = tmp / "traces"
        traces.mkdir()
        path = os.pathsep.join(p for p in (str(traced_copy(tmp / "copy")), os.environ.get("PYTHONPATH")) if p)
        env = {**os.environ, "PYTHONPATH": path, "NANOSWARM_TRACE_DIR": str(traces)}
        cmd = [sys.executable, str(ROOT / "scripts" / "decode_loop.py"), "--json", "--shape", args.shape,
               "--seconds", str(args.seconds), "--threads", str(args.threads), "--stages", str(args.stages),
               "--head-groups", str(args.head_groups)]
        cmd += ["--work-dir", str(args.work_dir)] if args.work_dir else []
        cmd += ["--insecure"] if args.insecure else []
        print(f"trace_hops: decode_loop.py for {args.seconds:g} s on a probed copy of the package",
              file=sys.stderr, flush=True)
        try:
            run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.seconds + 600)
        except subprocess.TimeoutExpired:
            sys.exit("trace_hops: decode_loop.py did not finish")
        if run.returncode != 0:
            tail = "\n".join(run.stderr.strip().splitlines()[-20:])
            sys.exit(f"trace_hops: decode_loop.py failed:\n{tail}")
        loop = json.loads(run.stdout.strip().splitlines()[-1])
        pids = re.search(r"pids: client \d+ nodes ([\d ]+)", run.stderr)
        order = [int(p) for p in pids.group(1).split()] if pids else []
        files = {int(f.stem): f for f in traces.glob("*.txt")}
        if not order or set(files) != set(order):  # (links between the wrong nodes otherwise)
            sys.exit(f"trace_hops: probes from nodes {sorted(files)}, but decode_loop.py named {order}: "
                     "were the nodes run from the probed copy, and did they stop on their own?")
        if not loop["tokens"]:
            sys.exit("trace_hops: decode_loop.py stepped no tokens")
        marks = [read_marks(files[pid]) for pid in order]  # (each file read once)
        node_turns = [turns(m) for m in marks]
        nodes = [node_figures(pid, m, ts) for pid, m, ts in zip(order, marks, node_turns)]
        links = [link_us(ts, m) for ts, m in zip(node_turns, marks[1:])] if args.head_groups < 2 else []
    result = {"tokens": loop["tokens"], "median_ms": loop["median_ms"], "nodes": nodes, "links_us": links}
    if args.json:
        print(json.dumps(result))
        return
    print(f"{result['tokens']} tokens, median {result['median_ms']:.3f} ms a token; medians in us")
    for i, node in enumerate(nodes, 1):
        parts = ", ".join(f"{k} {v}" for k, v in node["segments"].items())
        print(f"node {i} (pid {node['pid']}, {node['turns']} turns with a pass): {parts}")
        if node["blocks"]:
            print(f"    blocks of a pass: {' '.join(str(b) for b in node['blocks'])}")
        if args.head_groups > 1:
            print(f"    phase gap (a pass's end to the next's start): {node['phase_gap']} over {node['passes']} passes")
    for i, us in enumerate(links, 1):
        print(f"link node {i} -> node {i + 1} (its send to the next node's wake-up): {us}")


if __name__ == "__main__":
    main()
