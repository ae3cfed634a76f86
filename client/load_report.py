"""What a load run (`nanoswarm load`, client/load.py) reports: requests served, refused and
failed by reason, latencies, sessions completed, logits checked against solo runs, and each node's
peak memory against the bound its limits promise; as JSON (`--json`) or as lines of text."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

MEMORY_OVERHEAD = 512 * 2**20  # Python, torch and buffers on top of weights and KV caches


@dataclass
class NodeReport:
    address: str
    layers: list[int]
    heads: list[int] | None       # a head shard's heads, None for whole blocks
    alive: bool
    peak_rss_bytes: int | None
    source: str                   # "VmHWM" (process we started), "info", or "device" (a GPU node's)
    weight_bytes: int
    kv_budget_bytes: int | None
    errors: dict = field(default_factory=dict)

    @property
    def memory_bound(self) -> int | None:
        if self.kv_budget_bytes is None:
            return None
        return self.kv_budget_bytes + self.weight_bytes + MEMORY_OVERHEAD


@dataclass
class LoadReport:
    sessions: int
    duration: float
    elapsed: float | None = None  # seconds the load ran (the deadline, and the steps under way then)
    served: int = 0
    refused: Counter = field(default_factory=Counter)
    failed: Counter = field(default_factory=Counter)
    failure_samples: list[str] = field(default_factory=list)
    request_latency: list[float] = field(default_factory=list)
    step_latency: list[float] = field(default_factory=list)     # decode steps: one token, whole route
    prefill_latency: list[float] = field(default_factory=list)  # each session's prompt, whole route
    sessions_completed: int = 0
    steps_checked: int = 0
    mismatches: int = 0
    max_logit_diff: float = 0.0
    max_relative_diff: float = 0.0  # the same, over the largest solo logit (at least 1): what the tolerance bounds
    tolerance: float | None = None
    nodes: list[NodeReport] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # --peers contacts that did not answer at the start: why

    @property
    def crashed(self) -> list[str]:
        """Nodes that did not answer after the load: crashed, or left (the two look the same)."""
        return [n.address for n in self.nodes if not n.alive]

    @property
    def problems(self) -> list[str]:
        """Why the run is not OK; empty when it is."""
        out = []
        if not self.sessions_completed:
            out.append("no session completed")
        if self.failed:
            out.append(_count(sum(self.failed.values()), "failure"))  # requests, and sessions no route could take
        if self.skipped:
            out.append(_count(len(self.skipped), "contact") + " left out (no answer at the start)")
        if self.crashed:
            out.append(_count(len(self.crashed), "node") + " gone (no answer after the load: crashed or left)")
        if self.mismatches:
            out.append(f"{self.mismatches} steps differ from their solo runs")
        over = [n.address.partition("#")[0] for n in self.nodes if n.memory_bound is not None
                and n.peak_rss_bytes is not None and n.peak_rss_bytes > n.memory_bound]
        if over:
            out.append(f"memory above the bound on {', '.join(over)}")
        return out

    @property
    def seconds(self) -> float:
        """What the rates are over: the time the load ran, else the duration asked for."""
        return self.elapsed if self.elapsed is not None else self.duration

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict:
        return {
            "sessions": self.sessions, "duration": self.duration, "served": self.served,
            "refused": dict(self.refused), "failed": dict(self.failed),
            "failure_samples": self.failure_samples[:10],
            "latency_ms": {"request_p50": _pct(self.request_latency, 50), "request_p99": _pct(self.request_latency, 99),
                           "step_p50": _pct(self.step_latency, 50), "step_p99": _pct(self.step_latency, 99),
                           "prefill_p50": _pct(self.prefill_latency, 50),
                           "prefill_p99": _pct(self.prefill_latency, 99)},
            "elapsed": self.elapsed,
            "requests_per_second": self.served / self.seconds if self.seconds else 0.0,
            "sessions_completed": self.sessions_completed, "steps_checked": self.steps_checked,
            "mismatches": self.mismatches, "max_logit_diff": self.max_logit_diff,
            "max_relative_diff": self.max_relative_diff, "tolerance": self.tolerance,
            "crashed": self.crashed, "skipped": dict(self.skipped), "ok": self.ok, "problems": self.problems,
            "nodes": [{"address": n.address, "layers": n.layers, "heads": n.heads, "alive": n.alive,
                       "peak_rss_bytes": n.peak_rss_bytes, "peak_rss_source": n.source,
                       "weight_bytes": n.weight_bytes, "kv_budget_bytes": n.kv_budget_bytes,
                       "memory_bound_bytes": n.memory_bound, "errors": n.errors} for n in self.nodes],
        }


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return 1000 * ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f} ms"


def format_report(report: LoadReport) -> str:
    j = report.to_json()
    lat = j["latency_ms"]
    refused = ", ".join(f"{k} {v}" for k, v in sorted(report.refused.items())) or "none"
    failed = ", ".join(f"{k} {v}" for k, v in sorted(report.failed.items())) or "none"
    lines = [
        f"{_count(report.sessions, 'session')} for {report.duration:g} s"
        + ("" if report.elapsed is None else f" (ran {report.elapsed:.2f} s)"),
        f"requests served: {report.served} ({j['requests_per_second']:.1f}/s)",
        f"refused: {refused}",
        f"failed: {failed}",
        f"latency per request: p50 {_ms(lat['request_p50'])}, p99 {_ms(lat['request_p99'])}; "
        f"per token (whole route): p50 {_ms(lat['step_p50'])}, p99 {_ms(lat['step_p99'])}; "
        f"per prompt: p50 {_ms(lat['prefill_p50'])}, p99 {_ms(lat['prefill_p99'])}",
        f"sessions completed: {report.sessions_completed}; steps checked against solo runs: "
        f"{report.steps_checked}, mismatches {report.mismatches}, max |diff| {report.max_logit_diff:.3g}, "
        f"{report.max_relative_diff:.3g} of the largest logit"
        + (f" (tolerance {report.tolerance:.0e} of it)" if report.steps_checked and report.tolerance else ""),
    ]
    for n in report.nodes:
        peak = "?" if n.peak_rss_bytes is None else f"{n.peak_rss_bytes / 2**20:.0f} MiB"
        what = "peak device memory" if n.source == "device" else "peak RSS"
        bound = "" if n.memory_bound is None else f" (bound {n.memory_bound / 2**20:.0f} MiB = KV budget " \
            f"{n.kv_budget_bytes / 2**20:.0f} + weights {_mib(n.weight_bytes)} + overhead " \
            f"{MEMORY_OVERHEAD / 2**20:.0f})"
        heads = "" if n.heads is None else f" heads {n.heads[0]}:{n.heads[1]}"
        lines.append(f"node {n.address.partition('#')[0]} layers {n.layers[0]}:{n.layers[1]}{heads}: "
                     f"{'alive' if n.alive else 'GONE'}, {what} {peak} [{n.source}]{bound}")
    for address, why in report.skipped.items():
        lines.append(f"node {address.partition('#')[0]}: left out, no answer at the start ({why})")
    lines.append("OK" if report.ok else f"NOT OK: {'; '.join(report.problems)}")
    return "\n".join(lines)


def _mib(n: int) -> str:
    """Whole MiB, or "<1" for less (review115: a tiny model's weights read "0")."""
    return f"{n / 2**20:.0f}" if n >= 2**20 or n == 0 else "<1"
