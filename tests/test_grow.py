"""Growing a trained model: base tasks stay bit-identical in every prefix mode, new prefixes start as
prefix.transfer says (auto measured on training data only), remove, grow a grown run, resume, the frozen cache,
and one-line refusals."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from multitask.cli import main
from multitask.config import load_config
from multitask.errors import ConfigError
from multitask.experiment import ExperimentConfig
from multitask.model import ModelInputs
from multitask.prefix.adapt import adapt_key_values
from multitask.run import load_run
from multitask.tasks.base import featurize_examples
from multitask.training import prefix_transfer
from multitask.training.grow import load_base
from multitask.training.prefix_transfer import (CandidateScore, TrialPlan, best_candidate, choose, fold_count,
                                                 held_out_folds)
from multitask.training.state import trainable_state
from multitask.training.trainer import Trainer
from tests.fixtures import write_project

BASE_INPUTS = {"cls": ["good movie", "boring and bad film", "i love this plot"],
               "ner": ["john smith was born in paris", "london is a city"]}
GROUPS = ["tasks.0.overrides.prefix.group=g", "tasks.1.overrides.prefix.group=g"]


def write_base_config(project: Path, mode: str) -> Path:
    """The project's experiment with cls and ner only (qa arrives later, by growing)."""
    text = (project / "configs" / "exp.yaml").read_text().replace("  - {file: ../tasks/qa.yaml, batch_size: 4}\n", "")
    path = project / "configs" / f"base-{mode}.yaml"
    path.write_text(text.replace("mode: per_task", f"mode: {mode}"))
    return path


def write_grow_config(project: Path, base: Path, name: str = "grown", tasks: str = "qa", transfer: str = "auto",
                      extra: str = "", encoder: bool = True) -> Path:
    """A growing experiment; ``encoder``: name the base's encoder (else the section is left out, as users may)."""
    encoder_line = f"encoder: {{name: {project / 'encoder'}}}\n" if encoder else ""
    entries = "\n".join(f"  - {{file: ../tasks/{task}.yaml, batch_size: 4}}" for task in tasks.split(","))
    path = project / "configs" / f"{name}.yaml"
    path.write_text(f"""
name: {name}
base: {base}
{encoder_line}tasks:
{entries}
prefix: {{transfer: {transfer}, transfer_steps: 3, prefix: {{length: 4}}}}
optimization: {{max_steps: 6, prefix_lr: 0.01, head_lr: 0.01, warmup_ratio: 0.0}}
evaluation: {{every_steps: 3, batch_size: 8}}
data_root: {project / "data"}
cache_dir: {project / "cache"}
seed: 5
precision: fp32
device: cpu
{extra}""".lstrip())
    return path


def train(config: Path, run_dir: Path, overrides=(), **kwargs) -> Trainer:
    trainer = Trainer(load_config(ExperimentConfig, config, list(overrides)), run_dir, config_path=config,
                      progress=False, **kwargs)
    trainer.train()
    return trainer


def logits(run, task: str, texts: list[str]) -> torch.Tensor:
    """The task's raw logits for ``texts`` in a one-task batch (no decoding between them and the test)."""
    runtime_task = run.tasks[task]
    examples = run.parse_inputs(task, texts)
    features = featurize_examples(runtime_task, examples, run.tokenizer, training=False)
    batch = runtime_task.collate(features, run.tokenizer.pad_token_id or 0)
    with torch.no_grad():
        return run.model(ModelInputs.of_task(batch, run.model.task_id(task)))[task][0]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    config = write_project(tmp_path_factory.mktemp("grow"), max_steps=6)
    return config.parent.parent


@pytest.fixture(scope="module")
def bases(project) -> dict[str, Path]:
    runs = {}
    for mode in ("per_task", "shared", "hybrid", "groups"):
        run_dir = project / "runs" / f"base-{mode}"
        train(write_base_config(project, mode), run_dir, GROUPS if mode == "groups" else ())
        runs[mode] = run_dir
    return runs


@pytest.fixture(scope="module")
def grown(project, bases) -> dict[str, Path]:
    runs = {}
    for mode, base in bases.items():
        run_dir = project / "runs" / f"grown-{mode}"
        train(write_grow_config(project, base, name=f"grown-{mode}"), run_dir)
        runs[mode] = run_dir
    return runs


@pytest.mark.parametrize("mode", ["per_task", "shared", "hybrid", "groups"])
def test_base_tasks_are_bit_identical_after_growing(bases, grown, mode):
    base, bigger = load_run(bases[mode]), load_run(grown[mode])
    assert list(bigger.tasks) == ["cls", "ner", "qa"]
    for task, texts in BASE_INPUTS.items():
        assert torch.equal(logits(bigger, task, texts), logits(base, task, texts)), (mode, task)
        assert bigger.predict(task, texts) == base.predict(task, texts)
    assert len(bigger.predict("qa", [{"question": "where was john born ?",
                                      "context": "john smith was born in london ."}])) == 1


def test_the_grown_run_records_its_base_and_the_transfer_choice(bases, grown):
    meta = json.loads((grown["per_task"] / "checkpoint" / "meta.json").read_text())
    base_meta = json.loads((bases["per_task"] / "checkpoint" / "meta.json").read_text())
    assert meta["base"] == {"path": str(bases["per_task"]), "checkpoint_sha256": base_meta["model_sha256"],
                            "tasks": ["cls", "ner"]}
    assert meta["tasks"][:2] == base_meta["tasks"]  # the base's task entries as they were saved
    report = json.loads((grown["per_task"] / "report.json").read_text())
    assert report["meta"]["base"] == meta["base"]
    choice = report["meta"]["transfer"]["qa"]
    assert choice["setting"] == "auto"
    # By default auto scores by the evidence, without training, on all the training examples.
    held = choice["held_back"]
    assert set(held) == {"none", "task_cls", "task_ner"} and all(set(s) == {"evidence"} for s in held.values())
    assert choice["source"] == max(held, key=lambda name: held[name]["evidence"])
    assert choice["trial"] == {"criterion": "evidence", "metric": "f1", "examples": 6, "within_noise": [],
                               "prior": "same_type", "same_type": [], "trials_best": choice["source"]}
    assert set(report["tasks"]) == {"qa"}  # only the new task was trained and evaluated here


def test_auto_by_trials_records_each_candidates_held_back_metric_and_its_noise(project, bases):
    config = write_grow_config(project, bases["per_task"], name="by-metric")
    trainer = Trainer(load_config(ExperimentConfig, config, ["prefix.transfer_criterion=metric"]),
                      project / "runs" / "by-metric", config_path=config, progress=False)
    choice = trainer.transfers["qa"]
    trial = dict(choice["trial"])
    rivals = trial.pop("within_noise")
    assert 1 <= trial.pop("folds") <= 5 and trial.pop("trials_best") == choice["source"]
    assert trial == {"steps": 3, "criterion": "metric", "metric": "f1", "prior": "same_type", "same_type": []}
    held = choice["held_back"]
    assert set(held) == {"none", "task_cls", "task_ner"}
    assert choice["source"] == max(held, key=lambda name: (held[name]["metric"], -held[name]["loss"]))
    # The pick matches itself in every paired resample; its rivals are the others that often matched it.
    assert held[choice["source"]]["matches_best"] == 1.0 and held["none"]["beats_fresh"] == 0.0
    assert rivals == [n for n in held if n != choice["source"] and held[n]["matches_best"] >= prefix_transfer.COIN_TOSS]


def test_only_the_new_prefix_and_head_train(project, bases):
    config = write_grow_config(project, bases["hybrid"], name="inspect", transfer="none")
    trainer = Trainer(load_config(ExperimentConfig, config), project / "runs" / "inspect", config_path=config,
                      progress=False)
    trained = {name for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert trained == {"prefix_bank.encoders.task_qa.embedding", *{f"heads.qa.{n}" for n, _ in
                                                                    trainer.model.heads["qa"].named_parameters()}}
    # In a hybrid base a new task attends to the base's (frozen) shared prefix and to its own.
    assert trainer.model.prefix_bank.layout.task_prefixes["qa"] == ("shared", "task_qa")


def test_transfer_by_name_starts_from_that_prefix_fitted(project, bases):
    config = write_grow_config(project, bases["per_task"], name="named", transfer="task_ner")
    trainer = Trainer(load_config(ExperimentConfig, config, ["prefix.prefix.length=6"]), project / "runs" / "named",
                      config_path=config, progress=False)
    source = trainer.model.prefix_bank.encoders["task_ner"]
    target = trainer.model.prefix_bank.encoders["task_qa"]
    expected = adapt_key_values(source().detach(), source.layers, target.layers, 6)
    assert torch.equal(target().detach(), expected)
    assert torch.equal(expected[:, :, :, 4:], expected[:, :, :, :2])  # 4 tokens repeated to make 6
    assert trainer.transfers["qa"]["source"] == "task_ner"


def test_a_source_in_fewer_layers_starts_those_layers_and_the_rest_keep_their_own_start(project, bases):
    top = project / "runs" / "base-top-partial"
    train(write_base_config(project, "per_task"), top, ["prefix.prefix.layers={top: 1}"])
    config = write_grow_config(project, top, name="partial", transfer="task_ner")
    trainer = Trainer(load_config(ExperimentConfig, config), project / "runs" / "partial", config_path=config,
                      progress=False)
    source, target = trainer.model.prefix_bank.encoders["task_ner"], trainer.model.prefix_bank.encoders["task_qa"]
    assert source.layers == (1,) and target.layers == (0, 1)
    assert torch.equal(target().detach()[1], source().detach()[0])  # layer 1 from the source
    assert not torch.equal(target().detach()[0], torch.zeros_like(target().detach()[0]))  # layer 0: its own start


def test_adapting_cuts_repeats_and_maps_layers_by_index():
    kv = torch.arange(3 * 2 * 1 * 4 * 2, dtype=torch.float32).view(3, 2, 1, 4, 2)  # layers 1, 2, 3
    cut = adapt_key_values(kv, (1, 2, 3), (2, 3), 2)
    assert torch.equal(cut, kv[1:, :, :, :2])
    repeated = adapt_key_values(kv, (1, 2, 3), (1,), 10)
    assert torch.equal(repeated[0, :, :, 8:], kv[0, :, :, :2]) and repeated.shape[3] == 10
    with pytest.raises(ConfigError, match=r"prefix 'p' lives in layers \[1, 2, 3\], so it cannot start a prefix in "
                                          r"layers \[0, 1\] \(no keys/values for layer\(s\) \[0\]\)"):
        adapt_key_values(kv, (1, 2, 3), (0, 1), 4, "p")  # no start of its own for layer 0
    fill = torch.full((2, 2, 1, 4, 2), -1.0)
    partial = adapt_key_values(kv, (1, 2, 3), (0, 1), 4, "p", fill)  # layer 0 keeps the new prefix's own start
    assert torch.equal(partial[0], fill[0]) and torch.equal(partial[1], kv[0])
    with pytest.raises(ConfigError, match=r"no keys/values for layer\(s\) \[0\]"):
        adapt_key_values(kv, (1, 2, 3), (0,), 4, "p", fill[:1])  # nothing in common


def test_auto_scores_on_training_examples_it_holds_back_in_disjoint_folds():
    (one,) = held_out_folds(50, folds=1, seed=3)
    assert len(one.held) == 25 and not set(one.fit) & set(one.held) and sorted(one.fit + one.held) == list(range(50))
    assert held_out_folds(50, folds=1, seed=3) == [one]  # at most half held back: a trial still trains on half
    five = held_out_folds(50, folds=5, seed=3)
    assert sorted(e for fold in five for e in fold.held) == list(range(50))  # each example held back once
    for fold in five:
        assert len(fold.held) == 10 and sorted(fold.fit + fold.held) == list(range(50))
    assert len(held_out_folds(10, folds=20, seed=3)) == 10  # no more folds than disjoint slices
    # By default 100 examples are scored in all: two folds (cross-validation) below 500 examples, one from there.
    assert [fold_count(n, None) for n in (10, 100, 300, 499, 500, 5000)] == [2, 2, 2, 2, 1, 1]
    assert [len(fold.held) for fold in held_out_folds(100, None, seed=3)] == [50, 50]
    assert [len(fold.held) for fold in held_out_folds(300, None, seed=3)] == [60, 60]  # 20% when that is more
    assert len(held_out_folds(5000, folds=2, seed=3)[0].held) == 256  # at most HELD_MAX per fold
    # Held back in runs of 10 consecutive examples (a document's sentences stay on one side), the runs shuffled.
    for fold in held_out_folds(100, None, seed=3):
        assert {e // 10 for e in fold.held}.isdisjoint({e // 10 for e in fold.fit})
    assert {tuple(f.held) for f in held_out_folds(100, None, seed=3)} != {tuple(range(50)), tuple(range(50, 100))}
    assert held_out_folds(100, None, seed=3) != held_out_folds(100, None, seed=4)
    with pytest.raises(ConfigError, match="at least 2 training examples"):
        held_out_folds(1, folds=1, seed=3)


def test_auto_chooses_by_the_held_back_metric_then_loss_and_a_fresh_start_wins_ties():
    scores = {"none": CandidateScore(0.5, 1.0), "a": CandidateScore(0.7, 2.0), "b": CandidateScore(0.7, 1.5)}
    assert best_candidate(scores, "metric") == "b"  # metric first, loss breaks the tie
    assert best_candidate(scores, "loss") == "none"
    assert best_candidate({"none": CandidateScore(0.7, 1.5), "b": CandidateScore(0.7, 1.5)}, "metric") == "none"
    assert best_candidate({"none": CandidateScore(None, 1.0), "a": CandidateScore(None, 0.5)}, "loss") == "a"


def test_auto_in_folds_by_loss_records_its_trial_and_the_lowest_loss_wins(project, bases):
    config = write_grow_config(project, bases["per_task"], name="folds")
    trainer = Trainer(load_config(ExperimentConfig, config, ["prefix.transfer_folds=2",
                                                               "prefix.transfer_criterion=loss"]),
                      project / "runs" / "folds", config_path=config, progress=False)
    choice = trainer.transfers["qa"]
    assert choice["trial"] == {"steps": 3, "folds": 2, "criterion": "loss", "metric": "f1"}
    held = choice["held_back"]
    assert set(held) == {"none", "task_cls", "task_ner"} and all(set(s) == {"loss"} for s in held.values())
    assert choice["source"] == min(held, key=lambda name: held[name]["loss"])


def test_the_same_type_prior_takes_a_source_of_the_new_tasks_type_only_where_the_trials_allow_it():
    def score(metric, matches_best=0.0, beats_fresh=0.0):
        return CandidateScore(metric, 1.0, matches_best, beats_fresh)

    plan, alone = TrialPlan(60, criterion="metric"), TrialPlan(60, criterion="metric", prior="none")
    fresh = score(0.40, beats_fresh=0.0)
    within_noise = {"none": fresh, "task_qa": score(0.50, 1.0, 1.0), "task_ner": score(0.47, 0.41, 0.95)}
    assert choose(within_noise, plan, ["task_ner"]) == "task_ner"
    assert choose(within_noise, alone, ["task_ner"]) == "task_qa"
    clearly_helps = {**within_noise, "task_ner": score(0.45, 0.07, 0.99)}  # the trials say worse, but it helps
    assert choose(clearly_helps, plan, ["task_ner"]) == "task_ner"
    neither = {**within_noise, "task_ner": score(0.45, 0.19, 0.79)}
    assert choose(neither, plan, ["task_ner"]) == "task_qa"
    # Fresh start best, a same-type source within noise of it (TREC seed 13 in docs/growing.md).
    assert choose({"none": score(0.43, 1.0), "task_sst2": score(0.40, 0.25, 0.2)}, plan, ["task_sst2"]) == "task_sst2"
    # Of two credible same-type sources, the better-scored; the trials' best stands when it is of the type already.
    two = {**within_noise, "task_ner2": score(0.48, 0.3, 0.9)}
    assert choose(two, plan, ["task_ner", "task_ner2"]) == "task_ner2"
    assert choose(two, plan, ["task_qa", "task_ner"]) == "task_qa"
    assert choose(within_noise, plan, []) == "task_qa"
    by_loss = {"none": CandidateScore(None, 1.0), "task_ner": CandidateScore(None, 2.0)}
    assert choose(by_loss, TrialPlan(60, criterion="loss"), ["task_ner"]) == "none"  # no resamples, no prior


def test_by_the_evidence_a_same_type_source_wins_where_it_scores_above_a_fresh_start():
    def evidence(**values):
        return {name: CandidateScore(None, math.nan, evidence=value) for name, value in values.items()}

    plan = TrialPlan(60, criterion="evidence")
    # TREC fine at seed 13 (docs/growing.md): SQuAD's prefix scored best, SST-2's above a fresh start.
    trec_fine = evidence(none=0.3961, task_sst2=0.4054, task_conll2003=0.3928, task_squad_v1_1=0.4084)
    assert best_candidate(trec_fine, "evidence") == "task_squad_v1_1"
    assert choose(trec_fine, plan, ["task_sst2"]) == "task_sst2"
    assert choose(trec_fine, TrialPlan(60, criterion="evidence", prior="none"), ["task_sst2"]) == "task_squad_v1_1"
    below_fresh = evidence(none=0.40, task_sst2=0.39, task_squad_v1_1=0.41)
    assert choose(below_fresh, plan, ["task_sst2"]) == "task_squad_v1_1"
    assert choose(evidence(none=0.41, task_sst2=0.40), plan, ["task_sst2"]) == "none"  # a fresh start can win


def test_a_base_prefix_is_of_a_type_when_it_serves_only_tasks_of_that_type(project, bases):
    def of_type(mode, task_type):
        config = write_grow_config(project, bases[mode], name=f"types-{mode}")
        experiment = load_config(ExperimentConfig, config)
        return load_base(experiment, config).prefixes_of_type(task_type)

    assert of_type("per_task", "classification") == ["task_cls"] and of_type("per_task", "ner") == ["task_ner"]
    assert of_type("per_task", "qa") == []
    assert of_type("hybrid", "ner") == ["task_ner"]  # the shared prefix serves both types
    assert of_type("shared", "ner") == [] and of_type("groups", "ner") == []


def test_auto_takes_the_same_type_source_where_the_trials_cannot_tell_it_is_worse(project, bases, monkeypatch,
                                                                                  caplog):
    """The wiring: grow passes the base prefixes of the new task's type, and the report says what the prior did."""
    monkeypatch.setattr(prefix_transfer, "best_candidate", lambda scores, criterion: "none")
    monkeypatch.setattr(prefix_transfer, "with_noise", lambda scores, held, task, seed: {
        name: replace(score, matches_best=0.5 if name == "task_cls" else 0.0, beats_fresh=0.0)
        for name, score in scores.items()})
    config = write_grow_config(project, bases["per_task"], name="prior", tasks="cls")
    with caplog.at_level(logging.INFO, logger="multitask.training.prefix_transfer"):
        trainer = Trainer(load_config(ExperimentConfig, config, ["tasks.0.overrides.name=cls_p",
                                                                   "prefix.transfer_criterion=metric"]),
                          project / "runs" / "prior", config_path=config, progress=False)
    choice = trainer.transfers["cls_p"]
    assert choice["source"] == "task_cls"
    assert {key: choice["trial"][key] for key in ("prior", "same_type", "trials_best", "within_noise")} == {
        "prior": "same_type", "same_type": ["task_cls"], "trials_best": "none", "within_noise": ["task_cls"]}
    assert ("auto took task_cls, a prefix of the base's classification tasks, over the best-scored none: it scored "
            "at least none's held-back accuracy in 50% of resamples") in caplog.text


@pytest.mark.parametrize("own_type_evidence, chosen", [(0.55, "task_cls"), (0.45, "task_ner")])
def test_by_the_evidence_auto_takes_the_same_type_source_above_a_fresh_start(project, bases, monkeypatch, caplog,
                                                                            own_type_evidence, chosen):
    scored = {"none": 0.5, "task_cls": own_type_evidence, "task_ner": 0.6}
    monkeypatch.setattr(prefix_transfer, "evidence_of", lambda model, runtime, target, starts, *rest: {
        name: scored[name] for name in starts})
    config = write_grow_config(project, bases["per_task"], name=f"evidence-prior-{chosen}", tasks="cls")
    with caplog.at_level(logging.INFO, logger="multitask.training.prefix_transfer"):
        trainer = Trainer(load_config(ExperimentConfig, config, ["tasks.0.overrides.name=cls_p"]),
                          project / "runs" / f"evidence-prior-{chosen}", config_path=config, progress=False)
    choice = trainer.transfers["cls_p"]
    assert choice["source"] == chosen and choice["trial"]["trials_best"] == "task_ner"
    assert {name: score["evidence"] for name, score in choice["held_back"].items()} == scored
    took = "auto took task_cls, a prefix of the base's classification tasks, over the best-scored task_ner"
    assert (took in caplog.text) == (chosen == "task_cls")


@pytest.mark.parametrize("pick", ["none", "task_cls"])
def test_auto_picking_a_start_trains_exactly_as_naming_it(project, bases, monkeypatch, pick):
    """The trials draw random numbers (batches, dropout); the run after them must not see that they did. So a run
    whose auto keeps the fresh start is the transfer none run, and one whose auto picks a source is the run that names
    it (bench/grow_transfer.py --sweep reuses auto's run for its pick)."""
    monkeypatch.setattr(prefix_transfer, "best_candidate", lambda scores, criterion: pick)
    states = {}
    for transfer in (pick, "auto"):
        config = write_grow_config(project, bases["per_task"], name=f"pick-{pick}-{transfer}", transfer=transfer)
        trainer = train(config, project / "runs" / f"pick-{pick}-{transfer}")
        states[transfer] = trainable_state(trainer.model)
    assert states[pick].keys() == states["auto"].keys()
    assert all(torch.equal(states[pick][key], states["auto"][key]) for key in states[pick])


def test_refusals_are_one_line(project, bases, capsys):
    base = bases["per_task"]
    clash = write_grow_config(project, base, name="clash", tasks="ner")
    assert main(["train", str(clash), "--output-dir", str(project / "runs" / "clash"), "--no-progress"]) == 2
    assert "task 'ner' is already in base" in capsys.readouterr().err
    unknown = write_grow_config(project, base, name="unknown", transfer="task_nope")
    assert main(["train", str(unknown), "--output-dir", str(project / "runs" / "unknown"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "prefix.transfer 'task_nope': the base has no such prefix; its prefixes: task_cls, task_ner" in err
    deep = write_grow_config(project, bases["per_task"], name="deep", transfer="task_cls")
    # A base prefix in the top layer only shares no layer with a new prefix in the bottom one.
    top = project / "runs" / "base-top"
    train(write_base_config(project, "per_task"), top, ["prefix.prefix.layers={top: 1}"])
    deep.write_text(deep.read_text().replace(f"base: {base}", f"base: {top}"))
    assert main(["train", str(deep), "--output-dir", str(project / "runs" / "deep"), "--no-progress",
                 "--set", "prefix.prefix.layers={bottom: 1}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("(no keys/values for layer(s) [0])") and "Traceback" not in "".join(err)
    missing = write_grow_config(project, project / "runs" / "no-such-run", name="missing")
    assert main(["train", str(missing), "--output-dir", str(project / "runs" / "missing"), "--no-progress"]) == 2
    assert "base: no trained run at" in capsys.readouterr().err


def test_tasks_lists_a_grown_model(grown, capsys):
    assert main(["tasks", str(grown["hybrid"])]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["cls", "ner", "qa"]
    assert "[base " in lines[0] and "[trained here]" in lines[2] and "shared (joint, 4 tokens)" in lines[2]


@pytest.mark.parametrize("mode", ["per_task", "hybrid"])
def test_remove_keeps_every_other_task_bit_identical(project, grown, mode, capsys):
    out = project / "runs" / f"removed-{mode}"
    before = {p: p.read_bytes() for p in grown[mode].rglob("*") if p.is_file()}
    assert main(["remove", str(grown[mode]), "cls", "--output-dir", str(out)]) == 0
    assert {p: p.read_bytes() for p in grown[mode].rglob("*") if p.is_file()} == before  # the source is untouched
    smaller, whole = load_run(out), load_run(grown[mode])
    assert list(smaller.tasks) == ["ner", "qa"]
    assert torch.equal(logits(smaller, "ner", BASE_INPUTS["ner"]), logits(whole, "ner", BASE_INPUTS["ner"]))
    qa = [{"question": "what is the capital of france ?", "context": "paris is the capital of france ."}]
    assert smaller.predict("qa", qa) == whole.predict("qa", qa)
    assert "task_cls" not in smaller.model.prefix_bank.encoders
    assert main(["remove", str(grown[mode]), "nope", "--output-dir", str(project / "runs" / "x")]) == 2
    assert "no task 'nope'; its tasks: cls, ner, qa" in capsys.readouterr().err
    assert main(["remove", str(grown[mode]), "ner", "--output-dir", str(out)]) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_a_grown_run_grows_again(project, bases, grown):
    # No encoder section: a grown run takes its base's encoder (and tokenizer), and saves it as its own.
    config = write_grow_config(project, grown["per_task"], name="again", tasks="cls", transfer="task_qa",
                               encoder=False)
    overrides = ["tasks.0.overrides.name=cls2"]
    train(config, project / "runs" / "again", overrides)
    twice, once = load_run(project / "runs" / "again"), load_run(grown["per_task"])
    assert list(twice.tasks) == ["cls", "ner", "qa", "cls2"]
    for task, texts in BASE_INPUTS.items():
        assert torch.equal(logits(twice, task, texts), logits(once, task, texts))
    qa = [{"question": "where was john born ?", "context": "john smith was born in london ."}]
    assert twice.predict("qa", qa) == once.predict("qa", qa)
    meta = json.loads((project / "runs" / "again" / "checkpoint" / "meta.json").read_text())
    assert meta["base"]["tasks"] == ["cls", "ner", "qa"]
    assert meta["experiment"]["encoder"]["name"] == str(project / "encoder")


def test_a_grown_run_resumes_exactly(project, bases):
    config = write_grow_config(project, bases["hybrid"], name="resumable")
    overrides = ["evaluation.checkpoint_every=2"]
    whole = train(config, project / "runs" / "resume-whole", overrides)

    class Killed(Exception):
        pass

    def kill_at_step_4(step: int) -> None:
        if step == 4:
            raise Killed

    with pytest.raises(Killed):
        train(config, project / "runs" / "resume-killed", overrides, on_step=kill_at_step_4)
    resumed = train(config, project / "runs" / "resume-killed", overrides, resume=True)
    a, b = trainable_state(whole.model), trainable_state(resumed.model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.transfers == whole.transfers


def test_a_grown_run_caches_the_frozen_layers_below_its_new_prefix(project, bases):
    config = write_grow_config(project, bases["per_task"], name="cached", transfer="none")
    trainer = train(config, project / "runs" / "cached", [
        "optimization.frozen_cache.enabled=true", "optimization.frozen_cache.dtype=float32",
        "tasks.0.overrides.prefix.layers={top: 1}", "optimization.max_steps=9"])
    assert trainer.frozen_cache.boundaries == {"qa": 1}
    assert trainer.frozen_cache.summary()["hits"] > 0


def test_compare_grows_the_base_beside_methods_trained_from_scratch(project, bases, tmp_path):
    from multitask.compare import compare, method_experiment

    config = write_grow_config(project, bases["per_task"], name="compared", transfer="none")
    experiment = load_config(ExperimentConfig, config)
    runs = {label: e for method in ("prefix_transfer", "prefix_per_task", "lora")
            for label, e in method_experiment(experiment, method, config)}
    assert runs["prefix_transfer"].base == str(bases["per_task"].resolve())
    assert runs["prefix_transfer"].prefix.transfer == "auto"  # none would make it the scratch run
    assert runs["prefix_per_task"].base is None and runs["lora"].base is None
    results = compare(experiment, ["prefix_transfer", "prefix_per_task"], tmp_path / "cmp", config_path=config,
                      in_process=True)
    assert set(results["methods"]["prefix_transfer"]["tasks"]) == {"qa"}
    assert set(results["methods"]["prefix_per_task"]["tasks"]) == {"qa"}
    without_base = load_config(ExperimentConfig, config, ["base=null"])
    with pytest.raises(ConfigError, match="prefix_transfer grows a trained run: set base"):
        method_experiment(without_base, "prefix_transfer", config)


@pytest.fixture(scope="module")
def mixed(project, bases) -> Path:
    run_dir = project / "runs" / "mixture"
    train(write_grow_config(project, bases["per_task"], name="mixture", transfer="mixture"), run_dir)
    return run_dir


def test_a_mixture_learns_input_dependent_weights_over_the_base_prefixes(mixed, bases):
    report = json.loads((mixed / "report.json").read_text())
    choice = report["meta"]["transfer"]["qa"]
    assert choice["setting"] == "mixture" and choice["source"] == "mixture of task_cls, task_ner"
    weights = choice["mixing_weights"]["mean"]
    assert set(weights) == {"no source", "task_cls", "task_ner"} and sum(weights.values()) == pytest.approx(1, abs=1e-3)
    run = load_run(mixed)
    mixture = run.model.prefix_bank.mixtures["task_qa"]
    from multitask.prefix.mixture import input_summary

    ids = torch.tensor([[2, 5, 6, 3], [2, 9, 12, 3]])
    per_input = mixture.weights(input_summary(run.model.encoder.get_input_embeddings(), ids, torch.ones_like(ids)))
    assert not torch.allclose(per_input[0], per_input[1])  # trained: different inputs, different mixes
    base = load_run(bases["per_task"])
    for task, texts in BASE_INPUTS.items():
        assert torch.equal(logits(run, task, texts), logits(base, task, texts))


def test_a_mixture_task_shares_a_pass_with_other_tasks(mixed):
    run = load_run(mixed)
    qa = [{"question": "where was john born ?", "context": "john smith was born in london ."},
          {"question": "what is the capital of france ?", "context": "paris is the capital of france ."}]
    together = run.predict_many({"qa": qa, "cls": BASE_INPUTS["cls"]})
    assert together["qa"] == run.predict("qa", qa) and together["cls"] == run.predict("cls", BASE_INPUTS["cls"])


def test_a_grown_mixture_run_grows_again_unchanged(project, mixed):
    config = write_grow_config(project, mixed, name="after-mixture", tasks="cls", transfer="none")
    train(config, project / "runs" / "after-mixture", ["tasks.0.overrides.name=cls3"])
    again, before = load_run(project / "runs" / "after-mixture"), load_run(mixed)
    qa = [{"question": "where was john born ?", "context": "john smith was born in london ."}]
    features = featurize_examples(before.tasks["qa"], before.parse_inputs("qa", qa), before.tokenizer, training=False)
    batch = before.tasks["qa"].collate(features, 0)
    with torch.no_grad():
        a = again.model(ModelInputs.of_task(batch, again.model.task_id("qa")))["qa"][0]
        b = before.model(ModelInputs.of_task(batch, before.model.task_id("qa")))["qa"][0]
    assert torch.equal(a, b)


def test_a_head_starts_from_a_base_head_with_the_same_labels(project, bases, capsys):
    config = write_grow_config(project, bases["per_task"], name="head", tasks="cls", transfer="task_cls")
    overrides = ["tasks.0.overrides.name=cls_b", "tasks.0.overrides.head.transfer_from=cls"]
    trainer = Trainer(load_config(ExperimentConfig, config, overrides), project / "runs" / "head", config_path=config,
                      progress=False)
    ours, theirs = trainer.model.heads["cls_b"].state_dict(), load_run(bases["per_task"]).model.heads["cls"].state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert trainer.transfers["cls_b"]["head_from"] == "cls"
    wrong = ["tasks.0.overrides.name=cls_c", "tasks.0.overrides.head.transfer_from=ner"]
    assert main(["train", str(config), "--output-dir", str(project / "runs" / "head-wrong"), "--no-progress",
                 *(f"--set={item}" for item in wrong)]) == 2
    assert "head.transfer_from 'ner': that head is a ner head over labels" in capsys.readouterr().err
