"""The feature types: one model input each, as task types make them and the feature cache stores them.

They sit in the data layer, below the task types, so the cache (which rebuilds them from a fixed table of these
classes) needs no task code; a task type that needs more per window subclasses :class:`Feature` here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

CharSpan = tuple[int, int]  # a token's (start, end) character offsets in its text


@dataclass
class Feature:
    """One model input: token ids of one window of one example (an example may give several features)."""

    input_ids: list[int]
    example_index: int
    token_type_ids: list[int] | None = None
    target: Any = None  # the type's training target; None when the example is unlabelled

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class TaggingFeature(Feature):
    """``word_positions``: (word index, token position of its first subword) for every word in this window."""

    word_positions: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class QAFeature(Feature):
    """A window of one example; ``offsets`` holds each token's character span in the context, None off-context."""

    offsets: list[CharSpan | None] = field(default_factory=list)
