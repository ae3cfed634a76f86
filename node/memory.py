"""What a node's process holds in memory, for `info` and load runs."""

from __future__ import annotations

import os
import resource
import sys

import torch


def memory_usage(device: torch.device | None = None) -> dict[str, int | None]:
    """This process's peak and current resident memory, in bytes (for `info` and load runs), and
    on a GPU what torch's allocator holds there (weights and KV caches live there, not in RSS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    out: dict[str, int | None] = {"peak_rss_bytes": peak if sys.platform == "darwin" else peak * 1024,
                                  "device_bytes": None, "device_peak_bytes": None}
    if device is not None and device.type == "cuda":
        out["device_bytes"] = torch.cuda.memory_reserved(device)
        out["device_peak_bytes"] = torch.cuda.max_memory_reserved(device)
    try:
        with open("/proc/self/statm") as f:
            out["rss_bytes"] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        # ru_maxrss lags statm by a few pages: a peak below the current figure reads as a bug
        out["peak_rss_bytes"] = max(out["peak_rss_bytes"], out["rss_bytes"])
    except (OSError, ValueError, IndexError):  # not Linux
        pass
    return out
