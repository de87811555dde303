"""Validation splits carved from training data by group, so no article (or document) leaks across parts."""

from __future__ import annotations

import random
from typing import Literal

from multitask.data.records import Record
from multitask.errors import ConfigError, DataError

PARTS = ("train", "validation")


def _group_key(record: Record, group_field: str) -> str:
    if group_field not in record.fields:
        raise DataError(f"{record.source}: expected field {group_field!r} to group the validation split")
    return str(record.fields[group_field])


def carve_by_group(
    records: list[Record], group_field: str, validation_fraction: float, seed: int
) -> tuple[list[Record], list[Record]]:
    """Split into (train, validation) with whole groups, validation holding >= the fraction of records.

    Groups are sorted, then shuffled with ``seed``, so the result depends only on the data and
    the seed; each part keeps the original record order. Grouping by a unique field (e.g. "id")
    gives a plain random split.
    """
    if not 0.0 < validation_fraction < 1.0:
        raise ConfigError(f"validation_fraction must be between 0 and 1 (exclusive), got {validation_fraction}")
    keys = [_group_key(record, group_field) for record in records]
    sizes: dict[str, int] = {}
    for key in keys:
        sizes[key] = sizes.get(key, 0) + 1
    groups = sorted(sizes)
    random.Random(seed).shuffle(groups)
    target = validation_fraction * len(records)
    chosen: set[str] = set()
    held = 0
    for group in groups:
        if held >= target:
            break
        chosen.add(group)
        held += sizes[group]
    if len(chosen) == len(groups):
        raise DataError(
            f"cannot carve a {validation_fraction:g} validation split by {group_field!r}: "
            f"{len(groups)} group(s) in {len(records)} records leave nothing for training"
        )
    train = [record for record, key in zip(records, keys) if key not in chosen]
    validation = [record for record, key in zip(records, keys) if key in chosen]
    return train, validation


def take_split(
    records: list[Record],
    part: Literal["train", "validation"],
    group_field: str,
    validation_fraction: float,
    seed: int,
) -> list[Record]:
    """One part of ``carve_by_group``, for a task whose train and validation data come from one file."""
    if part not in PARTS:
        raise ConfigError(f"split part must be one of {', '.join(PARTS)}, got {part!r}")
    train, validation = carve_by_group(records, group_field, validation_fraction, seed)
    return train if part == "train" else validation
