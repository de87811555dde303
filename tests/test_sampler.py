"""Task samplers and batch streams: exact schedules, closed-form probabilities and exact resumption."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from multitask.data.batching import TaskBatchStream, eval_batches
from multitask.errors import CheckpointError, ConfigError
from multitask.training.sampler import SAMPLERS, make_sampler

SIZES = {"a": 100, "b": 400, "c": 1500}
DRAWS = 20_000


def _draw(sampler, n: int) -> list[str]:
    return [sampler.next_task() for _ in range(n)]


# --- samplers ----------------------------------------------------------------------------------


def test_registry_lists_all_samplers():
    assert SAMPLERS.available() == ["proportional", "round_robin", "temperature", "weights"]


def test_round_robin_exact_schedule():
    sampler = make_sampler("round_robin", SIZES, seed=0)
    assert _draw(sampler, 7) == ["a", "b", "c", "a", "b", "c", "a"]
    assert sampler.probabilities() == pytest.approx({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}, abs=1e-12)


def _closed_form(exponent: float) -> dict[str, float]:
    total = sum(n**exponent for n in SIZES.values())
    return {task: n**exponent / total for task, n in SIZES.items()}


@pytest.mark.parametrize(
    ("name", "options", "expected"),
    [
        ("proportional", {}, {"a": 0.05, "b": 0.2, "c": 0.75}),
        ("temperature", {"temperature": 1.0}, {"a": 0.05, "b": 0.2, "c": 0.75}),
        ("temperature", {"temperature": 2.0}, _closed_form(0.5)),  # 10 : 20 : sqrt(1500)
        ("temperature", {"temperature": 3.5}, _closed_form(1 / 3.5)),
        ("weights", {"weights": {"a": 1, "b": 1, "c": 2}}, {"a": 0.25, "b": 0.25, "c": 0.5}),
    ],
)
def test_probabilities_exact_and_empirical(name, options, expected):
    sampler = make_sampler(name, SIZES, seed=13, **options)
    assert sampler.probabilities() == pytest.approx(expected, abs=1e-12)
    counts = Counter(_draw(sampler, DRAWS))
    for task, p in expected.items():
        assert counts[task] / DRAWS == pytest.approx(p, abs=0.01)


def test_temperature_approaches_uniform():
    probabilities = make_sampler("temperature", SIZES, seed=0, temperature=1e9).probabilities()
    assert probabilities == pytest.approx({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}, abs=1e-6)


def test_zero_weight_task_is_never_drawn():
    sampler = make_sampler("weights", SIZES, seed=0, weights={"a": 0, "b": 1, "c": 1})
    assert "a" not in set(_draw(sampler, 2000))


@pytest.mark.parametrize("name", ["proportional", "temperature", "weights"])
def test_same_seed_same_sequence(name):
    options = {"weights": {"a": 1, "b": 2, "c": 3}} if name == "weights" else {}
    first = _draw(make_sampler(name, SIZES, seed=7, **options), 500)
    assert first == _draw(make_sampler(name, SIZES, seed=7, **options), 500)
    assert first != _draw(make_sampler(name, SIZES, seed=8, **options), 500)


@pytest.mark.parametrize("name", ["round_robin", "proportional", "temperature", "weights"])
def test_state_round_trip_through_json_continues_identically(name):
    options = {"weights": {"a": 1, "b": 2, "c": 3}} if name == "weights" else {}
    original = make_sampler(name, SIZES, seed=3, **options)
    _draw(original, 137)
    state = json.loads(json.dumps(original.state_dict()))
    restored = make_sampler(name, SIZES, seed=999, **options)  # the state, not the seed, decides
    restored.load_state_dict(state)
    assert _draw(restored, 300) == _draw(original, 300)


def test_state_from_other_tasks_is_refused():
    state = make_sampler("proportional", SIZES, seed=0).state_dict()
    with pytest.raises(CheckpointError):
        make_sampler("proportional", {"a": 1, "b": 2}, seed=0).load_state_dict(state)
    with pytest.raises(CheckpointError):
        make_sampler("round_robin", SIZES, seed=0).load_state_dict(state)


def test_unknown_sampler_lists_known():
    with pytest.raises(ConfigError, match="known: proportional, round_robin, temperature, weights"):
        make_sampler("annealed", SIZES, seed=0)


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("weights", {"weights": {"a": 1, "b": 1}}, "missing tasks \\['c'\\]"),
        ("weights", {"weights": {"a": 1, "b": 1, "c": 1, "d": 1}}, "unknown tasks \\['d'\\]"),
        ("weights", {"weights": {"a": 1, "b": -1, "c": 1}}, ">= 0"),
        ("weights", {"weights": {"a": 0, "b": 0, "c": 0}}, "all be zero"),
        ("weights", {}, "needs option\\(s\\) weights"),
        ("temperature", {"temperature": 0}, "> 0"),
        ("proportional", {"temperature": 2}, "does not take option\\(s\\) temperature"),
    ],
)
def test_invalid_options_are_config_errors(name, options, message):
    with pytest.raises(ConfigError, match=message):
        make_sampler(name, SIZES, seed=0, **options)


# --- batching ----------------------------------------------------------------------------------


def _epoch_batches(stream: TaskBatchStream) -> list[list[int]]:
    start = stream.epoch
    batches = []
    while stream.epoch == start:
        batches.append(stream.next_batch())
    return batches


@pytest.mark.parametrize("length_grouped,spread", [(False, 1), (True, 1), (True, 4)])
def test_every_index_once_per_epoch_and_reshuffled(length_grouped, spread):
    lengths = [(i * 37) % 97 + 1 for i in range(1003)]
    stream = TaskBatchStream("t", 1003, 16, seed=1, length_grouped=length_grouped, lengths=lengths,
                             group_spread=spread)
    first, second = _epoch_batches(stream), _epoch_batches(stream)
    for batches in (first, second):
        assert sorted(i for batch in batches for i in batch) == list(range(1003))
        assert len(batches) == 63 and sorted(map(len, batches))[0] == 1003 - 62 * 16  # partial batch kept
    assert first != second
    assert stream.epoch == 2


def test_shuffle_depends_on_seed_and_task():
    def first_batch(task: str, seed: int) -> list[int]:
        return TaskBatchStream(task, 500, 8, seed=seed).next_batch()

    assert first_batch("a", 0) == first_batch("a", 0)
    assert first_batch("a", 0) != first_batch("b", 0)
    assert first_batch("a", 0) != first_batch("a", 1)


def _mean_padding(batches: list[list[int]], lengths: list[int]) -> float:
    return float(np.mean([sum(max(lengths[i] for i in b) - lengths[i] for i in b) for b in batches]))


def test_length_grouping_reduces_padding_on_skewed_lengths():
    rng = np.random.default_rng(0)
    lengths = [int(x) for x in np.minimum(rng.pareto(1.5, 4000) * 20 + 5, 512)]
    grouped = _epoch_batches(TaskBatchStream("t", 4000, 32, seed=0, length_grouped=True, lengths=lengths))
    plain = _epoch_batches(TaskBatchStream("t", 4000, 32, seed=0, lengths=lengths))
    assert _mean_padding(grouped, lengths) < 0.25 * _mean_padding(plain, lengths)
    spread = _epoch_batches(TaskBatchStream("t", 4000, 32, seed=0, length_grouped=True, lengths=lengths,
                                            group_spread=4))
    # A spread trades a little padding for batches that mix neighbouring lengths.
    assert _mean_padding(grouped, lengths) < _mean_padding(spread, lengths) < 0.5 * _mean_padding(plain, lengths)
    distinct = lambda batches: np.mean([len({lengths[i] for i in b}) for b in batches])  # noqa: E731
    assert distinct(spread) > distinct(grouped)
    # batch order is still random, not sorted by length
    maxima = [max(lengths[i] for i in b) for b in grouped]
    assert maxima != sorted(maxima) and maxima != sorted(maxima, reverse=True)


@pytest.mark.parametrize("length_grouped", [False, True])
def test_batch_stream_state_round_trip(length_grouped):
    lengths = list(range(1, 101))
    make = lambda: TaskBatchStream("t", 100, 7, seed=5, length_grouped=length_grouped, lengths=lengths)  # noqa: E731
    original = make()
    for _ in range(40):  # into the third epoch (15 batches per epoch)
        original.next_batch()
    state = json.loads(json.dumps(original.state_dict()))
    restored = make()
    restored.load_state_dict(state)
    assert restored.epoch == original.epoch == 2
    assert [restored.next_batch() for _ in range(50)] == [original.next_batch() for _ in range(50)]


def test_batch_stream_state_mismatch_is_refused():
    state = TaskBatchStream("t", 100, 7, seed=5).state_dict()
    with pytest.raises(CheckpointError):
        TaskBatchStream("t", 100, 8, seed=5).load_state_dict(state)


def test_length_grouped_needs_lengths():
    with pytest.raises(ValueError, match="lengths"):
        TaskBatchStream("t", 10, 2, seed=0, length_grouped=True)


def test_eval_batches_sorted_and_complete():
    lengths = [5, 9, 1, 9, 3, 7, 2]
    batches = eval_batches(lengths, 3)
    assert batches == [[1, 3, 5], [0, 4, 6], [2]]
    assert eval_batches(lengths, 3) == batches


def test_eval_batches_keep_short_inputs_out_of_long_batches():
    lengths = [300, 12, 280, 10, 9, 150, 11]  # QA windows beside sentences, as a mixed-task request brings
    batches = eval_batches(lengths, 4, min_fill=0.5)
    assert batches == [[0, 2, 5], [1, 6, 3, 4]]
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(min(lengths[i] for i in b) >= 0.5 * max(lengths[i] for i in b) for b in batches)
    assert eval_batches(lengths, 2, min_fill=0.5) == [[0, 2], [5], [1, 6], [3, 4]]
