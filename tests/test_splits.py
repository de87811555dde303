"""Grouped validation carving: deterministic, disjoint by group, order-preserving."""

import pytest

from multitask.data.records import Record
from multitask.data.splits import carve_by_group, take_split
from multitask.errors import ConfigError, DataError


def _records(groups: list[str]) -> list[Record]:
    return [Record({"title": group, "n": index}, f"f.json:[{index}]") for index, group in enumerate(groups)]


RECORDS = _records([f"article-{i % 10}" for i in range(100)] + ["small"] * 3)


def test_carve_is_deterministic_and_disjoint():
    train, validation = carve_by_group(RECORDS, "title", 0.2, seed=13)
    again = carve_by_group(list(RECORDS), "title", 0.2, seed=13)
    assert (train, validation) == again
    train_groups = {r.fields["title"] for r in train}
    validation_groups = {r.fields["title"] for r in validation}
    assert not train_groups & validation_groups
    assert len(train) + len(validation) == len(RECORDS)
    assert len(validation) >= 0.2 * len(RECORDS)


def test_carve_keeps_original_order():
    train, validation = carve_by_group(RECORDS, "title", 0.3, seed=1)
    for part in (train, validation):
        numbers = [r.fields["n"] for r in part]
        assert numbers == sorted(numbers)


def test_carve_independent_of_input_order():
    _, validation = carve_by_group(RECORDS, "title", 0.2, seed=5)
    _, from_reversed = carve_by_group(RECORDS[::-1], "title", 0.2, seed=5)
    assert {r.fields["title"] for r in validation} == {r.fields["title"] for r in from_reversed}


def test_seed_changes_choice():
    choices = {
        frozenset(r.fields["title"] for r in carve_by_group(RECORDS, "title", 0.2, seed=seed)[1]) for seed in range(8)
    }
    assert len(choices) > 1


def test_take_split_matches_carve():
    train, validation = carve_by_group(RECORDS, "title", 0.25, seed=3)
    assert take_split(RECORDS, "train", "title", 0.25, 3) == train
    assert take_split(RECORDS, "validation", "title", 0.25, 3) == validation
    with pytest.raises(ConfigError, match="'test'"):
        take_split(RECORDS, "test", "title", 0.25, 3)


def test_missing_group_field_names_record():
    with pytest.raises(DataError, match=r"f\.json:\[0\]: expected field 'article'"):
        carve_by_group(RECORDS, "article", 0.2, seed=0)


def test_bad_fraction_and_single_group():
    with pytest.raises(ConfigError):
        carve_by_group(RECORDS, "title", 1.0, seed=0)
    with pytest.raises(DataError, match="nothing for training"):
        carve_by_group(_records(["only"] * 5), "title", 0.1, seed=0)
