"""Process memory figures for reports and benchmarks.

Why VmHWM and not getrusage(RUSAGE_SELF).ru_maxrss on Linux: a child's ru_maxrss starts from its parent's
high-water mark at exec, so it would report the parent's size whenever that is the larger.
"""

from __future__ import annotations

import resource
import sys


def rss_bytes(field: str = "VmHWM") -> int:
    """VmHWM (peak) or VmRSS (now) of this process; ru_maxrss where /proc is missing."""
    try:
        with open("/proc/self/status") as status:
            line = next(line for line in status if line.startswith(field + ":"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration):
        scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
