"""The one value every metric function returns, so the trainer and reports never special-case a task type."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class MetricResult:
    """``scores`` are fractions in [0, 1] (never percentages) so they compare across tasks;
    ``details`` hold JSON-serialisable breakdowns (per class, confusion matrix, counts) for reports."""

    scores: dict[str, float]
    details: dict[str, Any] = field(default_factory=dict)
