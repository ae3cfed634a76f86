"""The human tables of a bench result, and the issue's targets checked against it."""

from __future__ import annotations

import math

MODES = {"independent": "independent clients", "one_client": "one client, in step"}


def _route_name(run: dict) -> str:
    if run["route"] == "heads":
        return f"head group x{run['nodes']}"
    return f"{run['stages']} stage{'s' if run['stages'] > 1 else ''}"


def _other(machine: dict) -> str:
    x = machine.get("other_load")
    return "?" if x is None else f"{x:.2f}"


def _fmt_err(x: float) -> str:
    return "0" if x == 0 else f"{x:.1e}"


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]


def format_report(result: dict) -> str:
    c, m, o, local = result["config"], result["machine"], result["options"], result["local"]
    what = f"model {result['model']}" if result.get("model") else f"{result['shape']} shape, random weights"
    lines = [
        f"{what}: {c['n_layer']} blocks, {c['n_embd']} wide, {c['n_head']} heads, vocab {c['vocab_size']}, float32",
        f"machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['threads']} torch threads per process "
        "(a head group's members share them), "
        f"OMP_WAIT_POLICY={m['omp_wait_policy'] or 'default'}, GOMP_SPINCOUNT={m.get('gomp_spincount') or 'default'}, "
        f"linear layers through {m.get('linear', 'F.linear')}, nodes' OpenMP threads bound: "
        f"{m.get('node_binding', 'none')}, load {m['loadavg_start']:.2f} -> "
        f"{m.get('loadavg_end', float('nan')):.2f}, other processes used {_other(m)} cores meanwhile",
        f"rounds: {o['repeats']} x (prefill {o['prompt_len']} + decode {o['tokens']}) per side and route, "
        f"local and swarm alternating; {o['session_tokens']} tokens per session in the concurrent runs",
        f"local (one process, all its rounds): decode {local['decode_tps']:.1f} tok/s ({local['decode_ms']:.2f} "
        f"ms/token), prefill {local['prefill_tps']:.0f} tok/s ({local['prefill_ms']:.1f} ms for {o['prompt_len']} "
        "tokens); each route's ratio is against the local rounds run beside it",
        "",
    ]
    rows = [["route", "links", "wire", "decode tok/s", "ratio", "prefill tok/s", "ratio", "overhead/stage ms med/p99",
             "B/token", "B/prefill tok", "max |dlogit|"]]
    for r in result["runs"]:
        rows.append([_route_name(r), r.get("links", "star"), r["wire"], f"{r['decode_tps']:.1f}",
                     f"{r['decode_ratio']:.3f}", f"{r['prefill_tps']:.0f}", f"{r['prefill_ratio']:.3f}",
                     f"{r['overhead_ms_median']:.3f} / {r['overhead_ms_p99']:.3f}",
                     f"{r['bytes_per_token']:,.0f}", f"{r['bytes_per_prefill_token']:,.0f}",
                     _fmt_err(r["max_logit_error"])])
    lines += _table(rows)
    rows = [["route", "sessions", "aggregate tok/s", "vs 1 session", "sessions per forward pass (mean)"]]
    for r in result["runs"]:
        for s in r.get("sessions") or []:
            rows.append([_route_name(r), f"{s['sessions']} {MODES.get(s.get('mode'), '')}".rstrip(),
                         f"{s['aggregate_tps']:.1f}", f"{s['speedup']:.2f}x" if s.get("speedup") else "-",
                         f"{s['node_mean_batch']:.2f}" if s.get("node_mean_batch") else "-"])
    if len(rows) > 1:
        lines += ["", *_table(rows)]
    checks = targets(result)
    if checks:
        shape = result.get("shape") or f"model {result.get('model')}"
        title = "targets:" if shape == "gpt2-small" else f"targets (set for the GPT-2-small shape; this is {shape}):"
        if result.get("quick"):
            title = title[:-1] + " (a --quick smoke test: not judged):"
        lines += ["", title]
        for t in checks:
            mark = "" if result.get("quick") else " met" if t["met"] else " MISSED"
            lines.append(f"  {t['name']}: {t['value']:.3f} (target {t['op']} {t['target']}){mark}")
    return "\n".join(lines)


def _find(result: dict, route: str, stages: int | None = None, wire: str = "float32") -> dict | None:
    """The first such run: measured with the default links (bench/options.py run_groups)."""
    for r in result["runs"]:
        if r["route"] == route and r["wire"] == wire and (stages is None or r["stages"] == stages):
            return r
    return None


def targets(result: dict) -> list[dict]:
    """The issue's targets that this result has numbers for."""
    out = []

    def check(name: str, value: float | None, op: str, target: float) -> None:
        if value is None or math.isnan(value):
            return
        met = value >= target if op == ">=" else value <= target
        out.append({"name": name, "value": value, "op": op, "target": target, "met": met})

    for stages, target in ((4, 0.95), (2, 0.97)):
        r = _find(result, "layers", stages)
        check(f"decode ratio, {stages} stages", r and r["decode_ratio"], ">=", target)
    r4 = _find(result, "layers", 4)
    check("prefill ratio, 4 stages", r4 and r4["prefill_ratio"], ">=", 0.9)
    layer_runs = [r for s in sorted({r["stages"] for r in result["runs"] if r["route"] == "layers"})
                  if (r := _find(result, "layers", s))]
    if layer_runs:
        check("per-stage overhead median (worst route), ms", max(r["overhead_ms_median"] for r in layer_runs),
              "<=", 0.25)
    widest = max(layer_runs, key=lambda r: r["stages"]) if layer_runs else None
    for s in (widest or {}).get("sessions") or []:
        if s["sessions"] == 8 and s.get("speedup"):
            n = widest["stages"]
            check(f"8 sessions vs 1, {n} stage{'s' * (n > 1)}, {MODES.get(s.get('mode'), '')}", s["speedup"], ">=", 3.0)
    return out
