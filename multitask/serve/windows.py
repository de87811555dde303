"""How much model work an input is: its windows (the model inputs its task's featurization makes of it) and their
tokens, counted before it is queued, so that limits and queue accounting are in the model's terms.

Only the task's own featurization knows how many windows a long QA context or NER text becomes, so it is run here
as the model pass will run it. That happens in the request-parsing threads, each with a private copy of the
tokenizer: a fast tokenizer changes its truncation settings on every call that asks for other ones, and one
tokenizer used by two threads at once fails ("Already borrowed").
"""

from __future__ import annotations

import copy
import threading
from typing import Any

from multitask.data.features import Feature
from multitask.tasks.base import TaskType, featurize_examples

# Tokenizers a parsing thread keeps copies of; more only after the served runs changed encoder, so start afresh.
MAX_COPIES = 4


class WindowCounter:
    """``featurize(task, tokenizer, examples)`` -> each example's features (its windows), on this thread's tokenizer
    copy. The model pass reuses them, so an input is tokenized once."""

    def __init__(self) -> None:
        self._local = threading.local()

    def featurize(self, task: TaskType, tokenizer: Any, examples: list[Any]) -> list[list[Feature]]:
        per_example: list[list[Feature]] = [[] for _ in examples]
        if examples:
            for feature in featurize_examples(task, examples, self._copy(tokenizer), training=False):
                per_example[feature.example_index].append(feature)
        return per_example

    def _copy(self, tokenizer: Any) -> Any:
        copies: dict[int, tuple[Any, Any]] = getattr(self._local, "copies", None) or {}
        # Keyed by id, with the original held so that its id cannot be reused by another tokenizer meanwhile.
        held = copies.get(id(tokenizer))
        if held is None:
            if len(copies) >= MAX_COPIES:
                copies = {}
            held = copies[id(tokenizer)] = (tokenizer, copy.deepcopy(tokenizer))
            self._local.copies = copies
        return held[1]
