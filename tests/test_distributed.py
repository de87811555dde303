"""Data-parallel training on 2 CPU processes (gloo) against one process: same trained weights as one process on
the concatenated batches, the same task schedule on every rank, files from rank 0 only, sharded evaluation with
exactly one process's metrics, resume on 2 or 1 processes, and `multitask train --nproc 2` through torchrun.

Starting a process costs ~10-20 s here (torch + transformers imports), so one spawn of 2 workers runs every
2-process job (an uninterrupted run, a run killed at step 7, its resume on 2 processes) and the tests share it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from multitask.cli import main
from multitask.config import load_config
from multitask.experiment import ExperimentConfig
from multitask.training.state import load_training_state, trainable_state
from multitask.training.trainer import Trainer
from tests.fixtures import write_project

WORLD = 2
# Gradients agree up to float summation order (per-rank partial sums, then the all-reduce): within rtol 1e-4 /
# atol 1e-6 at every step, while weighting NER's slices by examples instead of labelled tokens misses by ~1e-2.
# After 12 AdamW steps the trained weights agree to ~2e-6 (measured); ATOL = 1e-5.
ATOL = 1e-5
# The QA span head's bias shifts every position's start (end) logit alike and softmax ignores such a shift, so its
# gradient is 0 up to float noise (~1e-8), which AdamW's normalised update turns into steps of size lr in either
# run: it is noise in both, not a quantity two runs can agree on (and it never changes a prediction).
ZERO_GRADIENT = {"heads.qa.layers.1.bias"}
KILL_AT = 7
# Dropout off: masks are drawn per process, so with dropout two processes match one only statistically.
# A random task schedule (uniform weights) and gradient accumulation (DDP's no_sync). Uneven slices: cls has 37
# training examples in global batches of 6, so one batch holds a single example and leaves rank 1 without rows;
# NER's 23 sentences end in a batch of 3, and its loss averages over tokens (batches mix lengths: no length
# grouping). Evaluation: validation splits of 11 and 5 examples in batches of 4 shard unevenly, and QA's few
# validation features fit one batch, leaving rank 1 nothing to evaluate.
COMMON = [
    "prefix.prefix.dropout=0", "tasks.0.overrides.head.dropout=0", "tasks.1.overrides.head.dropout=0",
    "tasks.2.overrides.head.dropout=0", "sampler.name=weights", "sampler.weights={cls: 1, ner: 1, qa: 1}",
    "optimization.grad_accumulation=2", "optimization.length_grouped=false", "tasks.0.limit_train=37",
    "tasks.1.limit_train=23", "tasks.0.limit_eval=11", "tasks.1.limit_eval=5", "evaluation.batch_size=4",
    "evaluation.checkpoint_every=2", "num_threads=1",
]
PER_RANK_BATCHES = ["tasks.0.batch_size=3", "tasks.1.batch_size=2", "tasks.2.batch_size=2"]
# Top-layer prefixes over a frozen-layer cache: each rank caches the inputs it trains on.
FROZEN_CACHE = ["prefix.prefix.layers={top: 1}", "optimization.frozen_cache.enabled=true",
                "optimization.frozen_cache.dtype=float32"]
GLOBAL_BATCHES = ["tasks.0.batch_size=6", "tasks.1.batch_size=4", "tasks.2.batch_size=4"]


class Killed(Exception):
    pass


def make_trainer(config: Path, run_dir: Path, overrides: list[str], **kwargs) -> Trainer:
    experiment = load_config(ExperimentConfig, config, overrides)
    return Trainer(experiment, run_dir, config_path=config, progress=False, **kwargs)


def record_schedule(trainer: Trainer) -> list[str]:
    """The tasks the trainer's sampler hands out, in order."""
    schedule: list[str] = []
    draw = trainer.sampler.next_task
    trainer.sampler.next_task = lambda: schedule.append(draw()) or schedule[-1]
    return schedule


def record_gradients(trainer: Trainer) -> list[dict[str, torch.Tensor]]:
    """The gradients each optimiser step applies (after DDP's all-reduce and clipping), in step order."""
    gradients: list[dict[str, torch.Tensor]] = []
    trainer.optimizer.register_step_pre_hook(lambda *_: gradients.append(
        {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None}))
    return gradients


def kill_at(step: int) -> None:
    if step == KILL_AT:
        raise Killed


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker(rank: int, port: int, root: str) -> None:
    """One rank: the uninterrupted run, a run killed at step KILL_AT (copied for a 1-process resume), its resume."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    root_dir = Path(root)
    config = root_dir / "configs" / "exp.yaml"
    overrides = COMMON + PER_RANK_BATCHES
    # Rank 1 gets a run directory of its own here, which must stay absent: it proves that rank writes nothing.
    trainer = make_trainer(config, root_dir / ("ddp" if rank == 0 else "ddp-rank1"), overrides)
    schedule, gradients = record_schedule(trainer), record_gradients(trainer)
    trainer.train()
    (root_dir / f"schedule-{rank}.json").write_text(json.dumps(schedule))
    torch.save(gradients, root_dir / f"gradients-{rank}.pt")
    try:
        make_trainer(config, root_dir / "killed", overrides, on_step=kill_at).train()
    except Killed:
        pass
    if rank == 0:
        shutil.copytree(root_dir / "killed", root_dir / "killed-1proc")
    make_trainer(config, root_dir / "killed", overrides, resume=True).train()
    cached = make_trainer(config, root_dir / ("cached" if rank == 0 else "cached-rank1"), overrides + FROZEN_CACHE)
    cached.train()
    (root_dir / f"cache-{rank}.json").write_text(json.dumps(cached.frozen_cache.summary()))


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """The tiny project after the 2-process jobs of ``worker``."""
    threads = torch.get_num_threads()
    try:
        for attempt in range(2):
            root = tmp_path_factory.mktemp("ddp")
            write_project(root)
            try:
                mp.spawn(worker, args=(free_port(), str(root)), nprocs=WORLD, join=True)
                return root
            except mp.ProcessExitedException as error:
                # A worker killed by a signal, not failing a check: gloo's setup has aborted a worker once in a
                # while ("terminate called without an active exception"). Once more, on a fresh port and folder.
                if attempt or error.signal_name is None:
                    raise
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    """The 1-process references use one thread like each worker, so their float arithmetic is the same."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def metrics(run_dir: Path) -> dict:
    report = json.loads((run_dir / "report.json").read_text())
    return {name: task["metrics"] for name, task in report["tasks"].items()}


def assert_close(state_a: dict[str, torch.Tensor], state_b: dict[str, torch.Tensor]) -> None:
    """Every trained weight within ATOL, except those whose true gradient is zero (ZERO_GRADIENT)."""
    assert state_a.keys() == state_b.keys()
    gaps = {key: (state_a[key] - state_b[key]).abs().max().item() for key in state_a if key not in ZERO_GRADIENT}
    assert max(gaps.values()) <= ATOL, {key: gap for key, gap in gaps.items() if gap > ATOL}


def test_two_processes_train_the_weights_of_one_process_on_the_global_batches(project, one_thread):
    single = make_trainer(project / "configs" / "exp.yaml", project / "single", COMMON + GLOBAL_BATCHES)
    schedule, gradients = record_schedule(single), record_gradients(single)
    single.train()

    # Each step applies the gradient one process computes on the whole global batches, on every rank; the
    # tasks' other parameters get none (None, as on one process, so AdamW skips them alike).
    for rank in range(WORLD):
        distributed_gradients = torch.load(project / f"gradients-{rank}.pt")
        assert len(distributed_gradients) == len(gradients) == 12
        for step, (got, expected) in enumerate(zip(distributed_gradients, gradients)):
            assert got.keys() == expected.keys(), step
            for name in got:
                torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=f"{step} {name}")
    distributed = load_training_state(project / "ddp")
    assert distributed["step"] == single.step == 12 and distributed["replicas"] == WORLD
    # Both states are the weights after step 12 (single.model itself holds the best evaluation's weights).
    assert_close(distributed["model"], load_training_state(project / "single")["model"])
    assert len(distributed["rng"]) == WORLD  # each rank's random state, for an exact resume
    # The weights moved far beyond the tolerance, so the comparison above is not vacuous.
    initial = make_trainer(project / "configs" / "exp.yaml", project / "initial", COMMON + GLOBAL_BATCHES)
    moved = max((a - b).abs().max().item() for a, b in zip(trainable_state(initial.model).values(),
                                                           trainable_state(single.model).values()))
    assert moved > 100 * ATOL
    # Every rank drew the same (random) task schedule, the one a single process draws.
    assert len(set(schedule)) == 3
    for rank in range(WORLD):
        assert json.loads((project / f"schedule-{rank}.json").read_text()) == schedule


def test_only_rank_0_writes_and_sharded_evaluation_gives_one_process_metrics(project, one_thread):
    assert not (project / "ddp-rank1").exists()
    written = {p.name for p in (project / "ddp").iterdir()}
    assert {"config.json", "state", "checkpoint", "report.json", "predictions", "tensorboard"} <= written

    # One process evaluates the weights the 2-process run reported on (its best state).
    reference = make_trainer(project / "configs" / "exp.yaml", project / "evaluate", COMMON + PER_RANK_BATCHES)
    reference.model.load_state_dict(load_training_state(project / "ddp")["best_state"], strict=False)
    results = reference.evaluate_all(["validation"])
    sizes = {runtime.name: len(runtime.features["validation"]) for runtime in reference.tasks}
    assert sizes["cls"] == 11 and sizes["ner"] == 5 and sizes["qa"] <= 4  # odd shards; QA: rank 1 gets none
    reported = metrics(project / "ddp")
    for name, splits in results.items():
        assert reported[name]["validation"] == splits["validation"].result.scores
    predictions = (project / "ddp" / "predictions" / "cls.validation.jsonl").read_text().splitlines()
    assert len(predictions) == 11


def test_a_killed_run_resumes_on_two_or_one_processes(project, one_thread):
    uninterrupted = load_training_state(project / "ddp")
    resumed_on_two = load_training_state(project / "killed")
    assert resumed_on_two["step"] == 12
    assert_close(resumed_on_two["model"], uninterrupted["model"])
    assert metrics(project / "killed") == metrics(project / "ddp")

    config = project / "configs" / "exp.yaml"
    resumed = make_trainer(config, project / "killed-1proc", COMMON + PER_RANK_BATCHES, resume=True)
    assert resumed.step == KILL_AT - 1 and resumed.replicas == WORLD  # global batches stay 2 per-rank batches
    resumed.train()
    assert_close(load_training_state(project / "killed-1proc")["model"], uninterrupted["model"])
    assert metrics(project / "killed-1proc") == metrics(project / "ddp")


def test_cli_nproc_starts_torchrun(tmp_path, capsys):
    config = write_project(tmp_path, max_steps=2)
    run_dir = tmp_path / "run"
    assert main(["train", str(config), "--nproc", "2", "--output-dir", str(run_dir), "--no-progress",
                 "--set", "num_threads=1"]) == 0
    assert load_training_state(run_dir)["replicas"] == 2
    assert json.loads((run_dir / "report.json").read_text())["tasks"].keys() == {"cls", "ner", "qa"}
    assert (run_dir / "train.log").read_text().count("data parallel over 2 processes") == 1


def test_cli_nproc_under_torchrun_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", str(tmp_path / "exp.yaml"), "--nproc", "2"]) == 2
    assert "leave it out when running under torchrun" in capsys.readouterr().err


def test_two_processes_with_a_frozen_cache_train_the_weights_of_one_process(project, one_thread):
    single = make_trainer(project / "configs" / "exp.yaml", project / "single-cached",
                          COMMON + GLOBAL_BATCHES + FROZEN_CACHE)
    single.train()
    assert_close(load_training_state(project / "cached")["model"], load_training_state(project / "single-cached")["model"])
    per_rank = [json.loads((project / f"cache-{rank}.json").read_text()) for rank in range(WORLD)]
    assert all(summary["hits"] > 0 for summary in per_rank)  # each rank reuses what it stored itself
    # Each rank holds only the rows it trains on, fewer than the one process that trains on all of them.
    assert all(0 < s["stored_inputs"] < single.frozen_cache.summary()["stored_inputs"] for s in per_rank)
