"""How far ``auto``'s held-back scores can be trusted: a paired bootstrap over the held-back examples.

With 100 training examples each candidate is scored on 100 held-back examples, so one example more or less right
moves accuracy by a point, and on a six-class task after a short trial every candidate sits near chance. A lead that
small says nothing. Resampling the held-back examples with replacement, the same resample for every candidate
(paired: they were scored on the same examples), shows how often each candidate would have scored at least the
leader's metric and above a fresh start's. The report keeps both shares, so a user sees when the pick was a coin toss.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable

RESAMPLES = 200


@dataclass(frozen=True)
class HeldBackPredictions:
    """One fold's held-back examples and each candidate's predictions for them."""

    examples: list[Any]
    by_candidate: dict[str, list[Any]]


def resampled_metrics(folds: list[HeldBackPredictions], score: Callable[[list[Any], list[Any]], float],
                      resamples: int = RESAMPLES, seed: int = 0) -> dict[str, list[float]]:
    """Each candidate's metric over ``resamples`` paired resamples: every fold's examples drawn with replacement
    (the same draw for every candidate), scored per fold and averaged over the folds as the trial's metric is."""
    generator = random.Random(seed)
    names = list(folds[0].by_candidate) if folds else []
    samples: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(resamples):
        draws = [[generator.randrange(len(fold.examples)) for _ in fold.examples] for fold in folds]
        for name in names:
            per_fold = [score([fold.examples[i] for i in draw], [fold.by_candidate[name][i] for i in draw])
                        for fold, draw in zip(folds, draws)]
            samples[name].append(sum(per_fold) / len(per_fold))
    return samples


def share_at_least(samples: list[float], reference: list[float]) -> float:
    """The share of paired resamples in which ``samples`` scored at least ``reference``."""
    return sum(a >= b for a, b in zip(samples, reference)) / len(samples)


def share_above(samples: list[float], reference: list[float]) -> float:
    """The share of paired resamples in which ``samples`` scored strictly above ``reference``."""
    return sum(a > b for a, b in zip(samples, reference)) / len(samples)
