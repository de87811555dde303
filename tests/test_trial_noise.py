"""The paired bootstrap that says how far auto's held-back scores can be trusted: exact shares by construction."""

from __future__ import annotations

import random

from multitask.training.trial_noise import HeldBackPredictions, resampled_metrics, share_above, share_at_least


def accuracy(examples: list[int], predicted: list[int]) -> float:
    return sum(e == p for e, p in zip(examples, predicted)) / len(examples)


def test_a_candidate_identical_to_the_best_always_matches_it_and_never_beats_it():
    gold = [0, 1, 2, 0, 1] * 4
    fold = HeldBackPredictions(gold, {"best": list(gold), "twin": list(gold), "wrong": [(g + 1) % 3 for g in gold]})
    samples = resampled_metrics([fold], accuracy, resamples=50, seed=1)
    assert share_at_least(samples["twin"], samples["best"]) == 1.0
    assert share_above(samples["twin"], samples["best"]) == 0.0
    assert share_above(samples["best"], samples["wrong"]) == 1.0
    assert share_at_least(samples["wrong"], samples["best"]) == 0.0


def test_the_resamples_are_paired_one_differing_example_matters_only_when_drawn():
    """Two candidates differ on one example only (the leader right there): the other matches the leader exactly in
    the resamples that never draw that example, counted by replaying the same draws."""
    gold = list(range(40))
    leader = list(gold)
    other = list(gold)
    other[7] = -1
    fold = HeldBackPredictions(gold, {"leader": leader, "other": other})
    samples = resampled_metrics([fold], accuracy, resamples=100, seed=5)
    replay = random.Random(5)
    missed = sum(7 not in [replay.randrange(40) for _ in gold] for _ in range(100))
    assert 0 < missed < 100
    assert share_at_least(samples["other"], samples["leader"]) == missed / 100


def test_folds_are_resampled_each_within_itself_and_averaged():
    """A candidate right on every example of one fold and wrong on every example of the other scores 0.5 in every
    resample, whatever the draws."""
    first = HeldBackPredictions([1, 1, 1], {"a": [1, 1, 1]})
    second = HeldBackPredictions([2, 2, 2, 2], {"a": [0, 0, 0, 0]})
    assert resampled_metrics([first, second], accuracy, resamples=20, seed=0)["a"] == [0.5] * 20
