"""The frozen-layer cache and the frozen shared base: a cache changes nothing but speed, hits equal recomputation,
`max_gb` holds, disk entries are reused by a later run, resume works with it, and a stage-2 run on a frozen shared
prefix leaves that prefix bit-identical; a checkpoint written before `layers` existed still loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from multitask.config import load_config
from multitask.errors import ConfigError
from multitask.experiment import ExperimentConfig
from multitask.model import ModelInputs
from multitask.run import load_run
from multitask.training.frozen_cache import DiskStore, MemoryStore, lower_states, with_cached_states
from multitask.training.state import trainable_state
from multitask.training.trainer import Trainer
from tests.fixtures import write_project

TOP_1 = ["prefix.prefix.layers={top: 1}", "optimization.max_steps=30", "evaluation.every_steps=30"]
CACHE = ["optimization.frozen_cache.enabled=true", "optimization.frozen_cache.dtype=float32"]


def make_trainer(config: Path, run_dir: Path, overrides=(), **kwargs) -> Trainer:
    experiment = load_config(ExperimentConfig, config, list(overrides))
    return Trainer(experiment, run_dir, config_path=config, progress=False, **kwargs)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return write_project(tmp_path_factory.mktemp("frozen"))


@pytest.fixture(scope="module")
def with_cache(project) -> Trainer:
    trainer = make_trainer(project, project.parent.parent / "runs" / "cached", TOP_1 + CACHE)
    trainer.train()
    return trainer


def _gradients(trainer: Trainer, runtime_name: str, rows: list[int]) -> dict[str, torch.Tensor]:
    """The gradient of one batch's loss on every trainable weight (dropout drawn from the same seed)."""
    runtime = next(t for t in trainer.tasks if t.name == runtime_name)
    batch = runtime.task.collate([runtime.features["train"][i] for i in rows], trainer.pad_id)
    trainer.model.train()
    trainer.model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    trainer.batch_loss(runtime, rows, batch).backward()
    return {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None}


def test_one_step_gradients_agree_with_and_without_the_cache(project):
    """The cache's invariant where it is exact: from the same weights, one batch's gradients agree whether the
    frozen layers run or their cached output is read (a miss, then a hit). Weights after many Adam steps are not
    compared: Adam turns float rounding on near-zero gradients into lr-sized steps, so such trajectories differ
    between CPUs and kernels, while this comparison holds on any of them.

    Tolerance: both paths compute the same layers on the same inputs; only the padded length of the batch that
    produced the cached rows differs (kernels may then sum in another order), so the states agree to float32
    rounding (~1e-7 relative) and the gradients to rtol 1e-4 / atol 1e-6."""
    root = project.parent.parent / "runs"
    plain = make_trainer(project, root / "grad-plain", TOP_1)
    cached = make_trainer(project, root / "grad-cached", TOP_1 + CACHE)
    assert cached.frozen_cache.boundaries == {"cls": 1, "ner": 1, "qa": 1} and plain.frozen_cache is None
    start_plain, start_cached = trainable_state(plain.model), trainable_state(cached.model)
    assert all(torch.equal(start_plain[k], start_cached[k]) for k in start_plain)  # the same starting point
    for runtime in plain.tasks:
        rows = list(range(min(4, len(runtime.features["train"]))))
        expected = _gradients(plain, runtime.name, rows)
        for attempt in ("miss", "hit"):
            got = _gradients(cached, runtime.name, rows)
            assert got.keys() == expected.keys() and expected, (runtime.name, attempt)
            for name in expected:
                torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6,
                                           msg=f"{runtime.name} {attempt} {name}")
        assert cached.frozen_cache.summary()["hits"] > 0


def test_a_cached_run_reports_its_cache(with_cache):
    report = json.loads((with_cache.run_dir / "report.json").read_text())
    assert report["meta"]["frozen_cache"]["boundaries"] == {"cls": 1, "ner": 1, "qa": 1}
    assert report["meta"]["frozen_cache"]["hits"] > 0  # later epochs read what the first one stored


def test_cache_hits_equal_recomputation(with_cache):
    trainer = with_cache
    for runtime in trainer.tasks:
        store = trainer.frozen_cache.stores[runtime.name]
        indices = [i for i in range(len(runtime.features["train"])) if store.get(i) is not None][:5]
        assert indices, runtime.name
        fresh = lower_states(trainer.frozen_cache, runtime, indices, trainer.pad_id, trainer.device,
                             trainer.precision)
        for index, state in zip(indices, fresh):
            assert torch.allclose(store.get(index), state, atol=1e-6)
        # The model from cached states gives what it gives from the tokens (eval mode: no dropout anywhere).
        batch = runtime.task.collate([runtime.features["train"][i] for i in indices], trainer.pad_id)
        inputs = ModelInputs.of_task(batch, trainer.model.task_id(runtime.name))
        trainer.model.eval()
        with torch.no_grad():
            direct = trainer.model(inputs)[runtime.name][0]
            cached = trainer.model(with_cached_states(trainer.frozen_cache, runtime, indices, inputs, trainer.pad_id,
                                                      trainer.device, trainer.precision))[runtime.name][0]
        if direct.dim() == 3:  # per-token logits: padded positions carry no prediction
            real = batch.attention_mask.bool()
            direct, cached = direct[real], cached[real]
        assert torch.allclose(direct, cached, atol=1e-5)


def test_max_gb_is_respected(project):
    hidden = 32
    trainer = make_trainer(project, project.parent.parent / "runs" / "small", TOP_1 + CACHE + [
        "optimization.frozen_cache.max_gb=1e-6", "optimization.max_steps=9"])  # ~1 KiB: a few short inputs
    trainer.train()
    stores = trainer.frozen_cache.stores.values()
    stored_bytes = sum(s.numel() * s.element_size() for store in stores for s in store.states.values())
    assert 0 < stored_bytes <= 1e-6 * 1024**3
    assert all(isinstance(store, MemoryStore) for store in stores)
    assert sum(store.stored for store in stores) < sum(len(t.features["train"]) for t in trainer.tasks)
    assert stored_bytes % (hidden * 4) == 0


def test_disk_cache_is_reused_by_a_later_run(project, with_cache):
    root = project.parent.parent / "runs"
    disk = CACHE + ["optimization.frozen_cache.location=disk"]
    first = make_trainer(project, root / "disk1", TOP_1 + disk)
    first.train()
    assert all(isinstance(store, DiskStore) for store in first.frozen_cache.stores.values())
    second = make_trainer(project, root / "disk2", TOP_1 + disk)
    second.train()
    summary = second.frozen_cache.summary()
    assert summary["misses"] == 0 and summary["hits"] > 0
    a, b = trainable_state(first.model), trainable_state(second.model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Memory and disk hold the same float32 states, so the two runs make the very same steps: exact on any CPU.
    c = trainable_state(with_cache.model)
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_disk_budget_limits_the_stored_inputs(tmp_path):
    store = DiskStore(tmp_path / "s", [4, 4, 4], hidden=2, dtype="bfloat16", budget=_budget(2 * 4 * 2 * 2))
    assert store.capacity == 2
    state = torch.randn(4, 2).to(torch.bfloat16)
    store.put({0: state, 2: state})
    assert torch.equal(store.get(0), state) and store.get(1) is None and store.get(2) is None
    again = DiskStore(tmp_path / "s", [4, 4, 4], hidden=2, dtype="bfloat16", budget=_budget(1e9))
    assert again.capacity == 3 and again.get(0) is None  # a different allocation starts afresh, never misread


def _budget(size: float):
    from multitask.training.frozen_cache import Budget

    return Budget(size)


def test_resume_with_a_cache_matches_an_uninterrupted_run(project):
    root = project.parent.parent / "runs"
    overrides = TOP_1 + CACHE + ["evaluation.checkpoint_every=4", "optimization.max_steps=12",
                                 "evaluation.every_steps=6"]
    uninterrupted = make_trainer(project, root / "resume_a", overrides)
    uninterrupted.train()

    class Killed(Exception):
        pass

    def kill_at_step_9(step: int) -> None:
        if step == 9:
            raise Killed

    with pytest.raises(Killed):
        make_trainer(project, root / "resume_b", overrides, on_step=kill_at_step_9).train()
    resumed = make_trainer(project, root / "resume_b", overrides, resume=True)
    resumed.train()
    a, b = trainable_state(uninterrupted.model), trainable_state(resumed.model)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_stage_two_trains_task_prefixes_on_a_frozen_shared_base(project):
    root = project.parent.parent / "runs"
    stage1 = make_trainer(project, root / "stage1", ["prefix.mode=shared", "optimization.max_steps=6"])
    stage1.train()
    stage2 = make_trainer(project, root / "stage2", [
        "prefix.mode=hybrid", "prefix.shared_length=4", "prefix.shared_layers=all", "prefix.prefix.layers={top: 1}",
        f"prefix.init_from={root / 'stage1'}", "prefix.freeze=[shared]", "optimization.max_steps=6", *CACHE])
    before = stage2.model.prefix_bank.encoders["shared"].embedding.detach().clone()
    stage2.train()
    first = load_file(str(root / "stage1" / "checkpoint" / "model.safetensors"))
    second = load_file(str(root / "stage2" / "checkpoint" / "model.safetensors"))
    key = "prefix_bank.encoders.shared.embedding"
    assert torch.equal(first[key], second[key]) and torch.equal(before, first[key])
    assert set(stage2.frozen_cache.boundaries.values()) == {1}  # the frozen shared prefix in layer 0 is part of the cached states
    summary = stage2.model.parameter_summary()
    assert summary.prefix_frozen == stage2.model.prefix_bank.encoders["shared"].embedding.numel()
    assert summary.trainable == sum(p.numel() for p in stage2.model.parameters() if p.requires_grad)
    assert "more frozen" in summary.render()
    assert not any(key.startswith("prefix_bank.encoders.shared") for key in trainable_state(stage2.model)
                   if stage2.model.get_parameter(key).requires_grad)
    assert any(key.startswith("prefix_bank.encoders.task_cls") for key in second)
    run = load_run(root / "stage2")
    assert run.model.prefix_bank.encoders["task_cls"].layers == (1,)  # the checkpoint restores its layer layout
    assert len(run.predict("cls", ["good movie"])) == 1


def test_freeze_names_a_prefix_the_run_has(project):
    with pytest.raises(ConfigError, match="prefix.freeze: no prefix named 'sharde'; this run's prefixes: task_cls"):
        make_trainer(project, project.parent.parent / "runs" / "bad", ["prefix.freeze=[sharde]"])


def test_a_checkpoint_from_before_layers_existed_loads(project):
    run_dir = project.parent.parent / "runs" / "classic"
    make_trainer(project, run_dir, ["optimization.max_steps=2"]).train()
    expected = load_run(run_dir).predict("ner", ["john smith was born in paris"])
    meta_path = run_dir / "checkpoint" / "meta.json"
    meta = json.loads(meta_path.read_text())
    for prefix in meta["prefix_layout"]["prefixes"].values():
        assert prefix.pop("layers") == "all"
    meta_path.write_text(json.dumps(meta))  # as written before prefixes had layers
    old = load_run(run_dir)
    assert all(p.layers == (0, 1) for p in old.model.prefix_bank.encoders.values())
    assert old.predict("ner", ["john smith was born in paris"]) == expected


def test_linear_probe_caches_the_whole_encoder(project):
    trainer = make_trainer(project, project.parent.parent / "runs" / "probe", CACHE + [
        "method=linear_probe", "optimization.max_steps=12"])
    assert set(trainer.frozen_cache.boundaries.values()) == {2}
    trainer.train()
    assert trainer.frozen_cache.summary()["stored_inputs"] > 0


def test_tasks_of_different_depths_each_cache_below_their_own_prefix(project):
    """cls keeps an all-layer prefix (nothing frozen below it), ner's sits in the top layer: only ner is cached."""
    trainer = make_trainer(project, project.parent.parent / "runs" / "depths", CACHE + [
        "tasks.1.overrides.prefix.layers={top: 1}", "tasks.2.overrides.prefix.layers={top: 1}",
        "optimization.max_steps=18"])
    assert trainer.frozen_cache.boundaries == {"ner": 1, "qa": 1}
    assert not trainer.frozen_cache.covers("cls")
    trainer.train()
    assert trainer.frozen_cache.summary()["hits"] > 0
    assert trainer.model.prefix_bank.encoders["task_cls"].layers == (0, 1)

