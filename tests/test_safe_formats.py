"""Nothing the toolkit reads back can run code: a feature cache entry or a training state holding a malicious
pickle is refused (the cache rebuilds, resume fails clearly) and what it would have run never runs."""

from __future__ import annotations

import logging
import os
import pickle
import random
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from multitask.cli import main
from multitask.config import load_config
from multitask.data.cache import FEATURE_KINDS, cache_key, cached
from multitask.data.features import Feature, QAFeature, TaggingFeature
from multitask.errors import CheckpointError
from multitask.experiment import ExperimentConfig
from multitask.run import load_run
from multitask.runtime import load_tokenizer, prepare_tasks


from multitask.training.state import STATE_FILE, load_training_state
from multitask.training.trainer import History, Trainer
from multitask.utils.rng import restore_rng_state, rng_state, seed_everything
from tests.fixtures import write_project


class Planted:
    """Unpickling this creates ``marker``: the proof that a loader executed what a file held."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps({"step": Planted(marker), "features": [Planted(marker)]}))


def test_the_planted_pickle_does_run_when_unpickled(tmp_path):
    """The control: the tests below would catch a loader that unpickles."""
    plant(tmp_path / "planted.pkl", tmp_path / "pwned")
    pickle.loads((tmp_path / "planted.pkl").read_bytes())
    assert (tmp_path / "pwned").exists()


def all_kinds() -> list[Feature]:
    """Every feature kind, with every shape of target the task types give (and a few they might)."""
    return [
        Feature(input_ids=[101, 7, 102], example_index=0, token_type_ids=[0, 0, 0], target=1),  # classification
        Feature(input_ids=[101, 102], example_index=1, token_type_ids=None, target=None),  # unlabelled
        Feature(input_ids=[101, 8, 9, 102], example_index=2, target=[1.0, 0.0, 1.0]),  # multi-label
        Feature(input_ids=[101, 102], example_index=3, target=[]),  # multi-label, no label
        TaggingFeature(input_ids=[101, 5, 6, 102], example_index=4, token_type_ids=[0, 0, 0, 0],
                       target=[-100, 3, -100, -100], word_positions=[(0, 1), (1, 2)]),
        TaggingFeature(input_ids=[101, 102], example_index=5, target=None, word_positions=[]),
        QAFeature(input_ids=[101, 4, 102, 9, 10, 102], example_index=6, token_type_ids=[0, 0, 0, 1, 1, 1],
                  target=(3, 4), offsets=[None, None, None, (0, 5), (6, 9), None]),
        QAFeature(input_ids=[101, 4, 102, 11, 102], example_index=6, target=(0, 0),
                  offsets=[None, None, None, (10, 12), None]),
        QAFeature(input_ids=[101, 102], example_index=7, target=None, offsets=[None, None]),
        Feature(input_ids=[2**40, -5], example_index=8, target={"spans": ((1, 2), [3]), 4: "x", "ok": True}),
    ]


def assert_identical(got: list, expected: list) -> None:
    """Equal, and of the very same types throughout (a tuple is no list, a bool no int, 1.0 no 1)."""
    def shape(value):
        if isinstance(value, (list, tuple)):
            return type(value), [shape(item) for item in value]
        if isinstance(value, dict):
            return dict, sorted((repr(key), shape(item)) for key, item in value.items())
        if hasattr(value, "__dataclass_fields__"):
            return type(value), shape(vars(value))
        return type(value), value

    assert got == expected
    assert shape(got) == shape(expected)


# ---------------------------------------------------------------------------------------------- feature cache
def test_every_feature_kind_round_trips_through_the_cache(tmp_path):
    assert set(FEATURE_KINDS.values()) == {Feature, TaggingFeature, QAFeature}
    features = all_kinds()
    built, hit = cached(tmp_path, "key", lambda: features)
    assert built is features and not hit
    assert [p.name for p in tmp_path.iterdir()] == ["key.npz"]
    again, hit = cached(tmp_path, "key", lambda: pytest.fail("rebuilt a good entry"))
    assert hit
    assert_identical(again, features)

    # One kind at a time, and none at all.
    for kind in FEATURE_KINDS.values():
        some = [f for f in features if type(f) is kind]
        cached(tmp_path, kind.__name__, lambda: some)
        assert_identical(cached(tmp_path, kind.__name__, lambda: pytest.fail("rebuilt"))[0], some)
    cached(tmp_path, "empty", lambda: [])
    assert cached(tmp_path, "empty", lambda: pytest.fail("rebuilt")) == ([], True)


def test_many_windows_round_trip(tmp_path):
    rng = random.Random(0)
    features = []
    for index in range(300):
        length = rng.randrange(2, 40)
        offsets = [None if rng.random() < 0.3 else (i, i + rng.randrange(1, 5)) for i in range(length)]
        features.append(QAFeature(input_ids=[rng.randrange(30000) for _ in range(length)], example_index=index,
                                  token_type_ids=[rng.randrange(2) for _ in range(length)],
                                  target=rng.choice([None, (0, 0), (1, length - 1)]), offsets=offsets))
    cached(tmp_path, "qa", lambda: features)
    assert_identical(cached(tmp_path, "qa", lambda: pytest.fail("rebuilt"))[0], features)


def test_real_features_of_every_task_type_come_back_from_the_cache(tmp_path):
    config = write_project(tmp_path)
    experiment = load_config(ExperimentConfig, config, [])
    tokenizer = load_tokenizer(experiment.encoder.name)
    first = prepare_tasks(experiment, config, tokenizer)
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 6 and not list((tmp_path / "cache").glob("*.pkl"))
    second = prepare_tasks(experiment, config, tokenizer)
    for a, b in zip(first, second):
        for split in a.features:
            assert a.features[split] and {type(f) for f in a.features[split]} <= set(FEATURE_KINDS.values())
            assert_identical(b.features[split], a.features[split])


def test_a_planted_pickle_cache_entry_is_never_loaded_and_is_rebuilt(tmp_path, caplog):
    marker = tmp_path / "pwned"
    cache_dir = tmp_path / "cache"
    key = cache_key("tokenizer-hash", {"config": "task"}, ["example"], True)
    features = all_kinds()
    entry = cache_dir / f"{key}.npz"  # where `cached` looks the entry up
    legacy = cache_dir / f"{key}.pkl"  # where it used to
    plant(entry, marker)
    plant(legacy, marker)

    with caplog.at_level(logging.WARNING, logger="multitask.data.cache"):
        value, hit = cached(cache_dir, key, lambda: features)
    assert not marker.exists()
    assert not hit and value is features
    assert str(entry) in caplog.text and "ignoring" in caplog.text
    assert_identical(cached(cache_dir, key, lambda: pytest.fail("rebuilt"))[0], features)  # rewritten, readable

    # The old pickled layout alone: named, ignored, rebuilt.
    entry.unlink()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="multitask.data.cache"):
        assert cached(cache_dir, key, lambda: features) == (features, False)
    assert str(legacy) in caplog.text and not marker.exists()


@pytest.mark.parametrize("damage", ["npz_with_pickled_object_array", "truncated", "foreign_npz", "garbage"])
def test_a_damaged_or_foreign_cache_entry_is_rebuilt(tmp_path, caplog, damage):
    marker = tmp_path / "pwned"
    features = all_kinds()
    entry = tmp_path / "key.npz"
    if damage == "npz_with_pickled_object_array":  # a real .npz whose array np.load would unpickle if allowed
        np.savez(entry, meta=np.array([Planted(marker)], dtype=object))
    elif damage == "truncated":
        cached(tmp_path, "key", lambda: features)
        entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])
    elif damage == "foreign_npz":
        np.savez(entry, meta=np.frombuffer(b'{"format": "something else"}', dtype=np.uint8))
    else:
        entry.write_bytes(os.urandom(1000))
    with caplog.at_level(logging.WARNING, logger="multitask.data.cache"):
        assert cached(tmp_path, "key", lambda: features) == (features, False)
    assert str(entry) in caplog.text
    assert not marker.exists()
    assert_identical(cached(tmp_path, "key", lambda: pytest.fail("rebuilt"))[0], features)


def test_values_that_cannot_be_stored_exactly_are_returned_uncached(tmp_path, caplog):
    class Other(Feature):
        pass

    for value in ([Other(input_ids=[1], example_index=0)], [Feature([1], 0, target=np.int64(3))], {"not": "a list"}):
        with caplog.at_level(logging.WARNING, logger="multitask.data.cache"):
            assert cached(tmp_path, "key", lambda: value) == (value, False)
        assert "not cached" in caplog.text
        assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------- training state
def make_trainer(config: Path, run_dir: Path, resume: bool = False) -> Trainer:
    experiment = load_config(ExperimentConfig, config, ["evaluation.checkpoint_every=2"])
    return Trainer(experiment, run_dir, config_path=config, progress=False, resume=resume)


def test_the_training_state_is_plain_data_and_resumes(tmp_path):
    config = write_project(tmp_path, max_steps=4)
    trainer = make_trainer(config, tmp_path / "run")
    trainer.train()
    state = torch.load(tmp_path / "run" / STATE_FILE, map_location="cpu", weights_only=True)
    assert {"step", "model", "optimizer", "scheduler", "scaler", "sampler", "streams", "rng", "replicas",
            "best_score", "best_step", "best_state", "bad_evals", "history", "elapsed", "examples_seen"} <= set(state)
    assert isinstance(state["history"], dict) and state["step"] == 4

    resumed = make_trainer(config, tmp_path / "run", resume=True)
    assert resumed.step == 4 and isinstance(resumed.history, History)
    assert asdict(resumed.history) == state["history"] and state["history"]["metric"]


def test_rng_state_survives_weights_only_loading(tmp_path):
    seed_everything(1)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3))
    seed_everything(2)
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_a_planted_training_state_is_refused_not_run(tmp_path, writer):
    config = write_project(tmp_path, max_steps=2)
    run_dir = tmp_path / "run"
    make_trainer(config, run_dir).train()
    marker = tmp_path / "pwned"
    state_file = run_dir / STATE_FILE
    if writer == "pickle":
        plant(state_file, marker)
    else:
        torch.save({"step": 2, "history": Planted(marker)}, state_file)

    # The checksum beside the state already refuses a replaced file; without it (a state copied alone, or planted
    # with its checksum), loading with weights_only refuses it again.
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_training_state(run_dir)
    state_file.with_name(state_file.name + ".sha256").unlink()
    with pytest.raises(CheckpointError, match="refused to load a training state") as error:
        make_trainer(config, run_dir, resume=True)
    assert str(state_file) in str(error.value) and "weights_only" not in str(error.value)
    with pytest.raises(CheckpointError, match=str(state_file)):
        load_training_state(run_dir)
    assert not marker.exists()


def test_a_truncated_training_state_is_a_clear_error(tmp_path):
    run_dir = tmp_path / "run"
    state_file = run_dir / STATE_FILE
    state_file.parent.mkdir(parents=True)
    torch.save({"step": 1}, state_file)
    state_file.write_bytes(state_file.read_bytes()[:40])
    with pytest.raises(CheckpointError, match="unreadable training state"):
        load_training_state(run_dir)


def test_a_bit_flipped_checkpoint_or_state_is_named_not_trusted(tmp_path):
    config = write_project(tmp_path, max_steps=6)
    run_dir = tmp_path / "run"
    assert main(["train", str(config), "--output-dir", str(run_dir), "--no-progress"]) == 0
    for path, load in ((run_dir / STATE_FILE, lambda: load_training_state(run_dir)),
                       (run_dir / "checkpoint" / "model.safetensors", lambda: load_run(run_dir))):
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
        with pytest.raises(CheckpointError, match="corrupt"):
            load()


def test_a_killed_cache_write_leaves_no_temporary_behind_once_idle(tmp_path):
    """Another run may be writing the shared cache now: only temporaries idle for an hour are removed."""
    cache = tmp_path / "cache"
    cache.mkdir()
    dead, live = cache / ".abc.npz.x1.tmp", cache / ".def.npz.x2.tmp"
    for path in (dead, live):
        path.write_bytes(b"half")
    hour_ago = dead.stat().st_mtime - 3601
    os.utime(dead, (hour_ago, hour_ago))
    features = [Feature([1, 2, 3], 0, target=1)]
    value, hit = cached(cache, "k" * 32, lambda: features)
    assert value == features and not hit
    assert not dead.exists() and live.exists()
    assert [p.name for p in cache.iterdir() if p.suffix == ".npz"] == ["k" * 32 + ".npz"]
