"""Named fault points, for tests that kill a real run at precise moments (``MULTITASK_KILL_AT=point:n``).

``reached(point)`` does nothing unless that variable names the point (``point:n``, e.g. ``checkpoint_swap:2`` or
``write:report.json:1``): then the process SIGKILLs itself the n-th time it gets there — inside a checkpoint swap, an evaluation, a feature-cache write or a report write, moments a
timer would rarely hit. Production runs never set the variable.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

KILL_AT = "MULTITASK_KILL_AT"
_times_reached: Counter[str] = Counter()


def reached(point: str) -> None:
    spec = os.environ.get(KILL_AT)
    if not spec:
        return
    name, _, count = spec.rpartition(":")  # point names may hold colons (write:report.json); the count ends it
    if name != point:
        return
    _times_reached[point] += 1
    if _times_reached[point] == int(count):
        os.kill(os.getpid(), signal.SIGKILL)
