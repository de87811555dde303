"""P-Tuning v2's ancestors: prompt tuning and P-Tuning v1 (soft tokens at the input) and prefix tuning (Li & Liang)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from multitask.compare import PREFIX_TUNING_LR, method_experiment
from multitask.config import load_config
from multitask.errors import ConfigError
from multitask.experiment import ExperimentConfig
from multitask.model import ModelInputs
from multitask.prompt import PromptConfig, PromptEncoder
from multitask.prompt.bank import PromptBank
from multitask.prompt.initialization import initialize_prompts
from multitask.run import load_run
from multitask.runtime import build_model, load_tasks
from multitask.serve.catalog import load_catalog
from multitask.training.trainer import Trainer
from tests.fixtures import write_project
from tests.tiny import tiny_encoder, tiny_tokenizer

NER_LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]


def prompt_model(config_path: Path, overrides=(), kind: str = "bert"):
    experiment = load_config(ExperimentConfig, config_path, ["method=prompt", "prompt.length=3", *overrides])
    tasks = [task for _, task, _ in load_tasks(experiment, config_path)]
    for task in tasks:
        task.labels = NER_LABELS if task.config.type == "ner" else task.labels or ["0", "1"]
    model = build_model(experiment, tasks, tiny_encoder(kind)).eval()
    with torch.no_grad():  # prompts far from the initial placeholder, so that they matter to every output
        for prompt in model.prompt_bank.prompts.values():
            prompt.embedding.normal_(0, 1.0)
    return model


def run_method(config: Path, run_dir: Path, method: str, overrides=()) -> Trainer:
    """Train the tiny project with a compare method's experiment, in this process."""
    experiment = load_config(ExperimentConfig, config, list(overrides))
    (_, method_config), = method_experiment(experiment, method, config)
    trainer = Trainer(method_config, run_dir, config_path=config, progress=False)
    trainer.train()
    return trainer


@pytest.mark.parametrize("kind", ["bert", "roberta", "electra"])
def test_token_heads_see_only_the_input_positions(tmp_path, kind):
    model = prompt_model(write_project(tmp_path), kind=kind)
    ner = model.task_id("ner")
    ids = torch.randint(5, 60, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    with torch.no_grad():
        logits, rows = model(ModelInputs(ids, mask, torch.full((2,), ner)))["ner"]
        alone, _ = model(ModelInputs(ids[1:, :5], mask[1:, :5], torch.full((1,), ner)))["ner"]
        for prompt in model.prompt_bank.prompts.values():
            prompt.embedding.add_(torch.randn_like(prompt.embedding))  # LayerNorm removes a constant
        moved, _ = model(ModelInputs(ids, mask, torch.full((2,), ner)))["ner"]
    assert logits.shape == (2, 7, len(NER_LABELS))  # one row per input token, none for the 3 prompt positions
    torch.testing.assert_close(logits[1, :5], alone[0], atol=1e-5, rtol=1e-5)  # padding after the input is masked
    assert not torch.allclose(logits, moved)  # the prompt steers every position


def test_a_batch_mixing_tasks_equals_each_task_alone(tmp_path):
    model = prompt_model(write_project(tmp_path))
    ids = torch.randint(5, 60, (4, 6))
    task_ids = torch.tensor([0, 1, 0, 1])
    with torch.no_grad():
        mixed = model(ModelInputs(ids, torch.ones_like(ids), task_ids))
        for task in ("cls", "ner"):
            rows = (task_ids == model.task_id(task)).nonzero().flatten()
            alone, _ = model(ModelInputs(ids[rows], torch.ones_like(ids[rows]), task_ids[rows]))[task]
            torch.testing.assert_close(mixed[task][0], alone, atol=1e-5, rtol=1e-5)


def test_vocab_initialisation_starts_from_word_embeddings(tmp_path):
    encoder, tokenizer = tiny_encoder("bert"), tiny_tokenizer(tmp_path / "tok")
    bank = PromptBank(["a", "b"], PromptConfig(length=4, init_words=["paris", "london"]), 32)
    bank.prompts["b"] = PromptEncoder(PromptConfig(length=4, init="random"), 32)
    film, good = tokenizer.convert_tokens_to_ids(["film", "good"])
    paris, london = tokenizer.convert_tokens_to_ids(["paris", "london"])
    torch.manual_seed(0)
    similarity = initialize_prompts(bank, encoder, tokenizer, {"a": [[2, film, good, film, 3]], "b": []})
    table = encoder.get_input_embeddings().weight
    expected = table[[paris, london, film, good]]  # init_words first, then the task's most frequent tokens
    assert torch.equal(bank.prompts["a"].embedding.detach(), expected.detach())
    random_start = bank.prompts["b"].embedding.detach()
    assert 0.5 < float(random_start.std() / table.detach().std()) < 2.0  # at the embedding table's scale
    assert set(similarity) == {"prompt_a", "prompt_b"}


def test_too_few_positions_for_prompt_and_input_is_one_line(tmp_path):
    config = write_project(tmp_path)
    with pytest.raises(ConfigError, match=r"task qa: max_length 32 \+ prompt length 40 exceeds the encoder's 64 "
                                          r"positions; lower the task's max_length \(overrides: \{max_length: 24\}\)"):
        prompt_model(config, ["prompt.length=40"])


@pytest.mark.parametrize("method, encoder", [("prompt_tuning", "none"), ("p_tuning_v1", "lstm")])
def test_prompt_methods_train_save_folded_and_load_back_identically(tmp_path, method, encoder):
    config = write_project(tmp_path, max_steps=4)
    trainer = run_method(config, tmp_path / "run", method, ["optimization.frozen_cache.enabled=true"])
    assert trainer.experiment.method == "prompt" and trainer.experiment.prompt.encoder == encoder
    assert trainer.frozen_cache is None  # prompts change layer 0: nothing below them to cache
    weights = load_file(str(tmp_path / "run" / "checkpoint" / "model.safetensors"))
    prompt_keys = sorted(k for k in weights if k.startswith("prompt_bank."))
    assert prompt_keys == [f"prompt_bank.prompts.{t}.embedding" for t in ("cls", "ner", "qa")]  # folded: no LSTM
    assert not any(k.startswith(("encoder.", "prefix_bank.")) for k in weights)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    kept = sum(w.numel() for key, w in weights.items() if key.startswith("prompt_bank."))
    trained = report["meta"]["trainable_parameters"] - sum(p.numel() for p in trainer.model.heads.parameters())
    assert trained == kept if encoder == "none" else trained > kept  # the LSTM trains; only its output is kept

    run = load_run(tmp_path / "run")
    trained = trainer.model.eval()
    ids = torch.randint(5, 60, (3, 6))
    inputs = ModelInputs(ids, torch.ones_like(ids), torch.tensor([0, 1, 2]))
    with torch.no_grad():
        before, after = trained(inputs), run.model(inputs)
    for task in ("cls", "ner", "qa"):
        assert torch.equal(before[task][0], after[task][0]), task
    saved = [json.loads(line) for line in (tmp_path / "run" / "predictions" / "cls.validation.jsonl").read_text()
             .splitlines()]
    again = run.predict("cls", [{"text": row["text"]} for row in saved])
    assert [p["label"] for p in again] == [row["label"] for row in saved]
    ner = run.predict("ner", [{"tokens": ["london", "is", "a", "city"]}])
    assert len(ner[0]["tags"]) == 4


def test_prefix_tuning_is_li_and_liang_folded_in_the_checkpoint(tmp_path):
    config = write_project(tmp_path, max_steps=4)
    (_, experiment), = method_experiment(load_config(ExperimentConfig, config), "prefix_tuning", config)
    settings = experiment.prefix
    assert (settings.mode, settings.attention, settings.prefix.reparameterize, settings.prefix.layers,
            settings.prefix.init) == ("per_task", "joint", True, "all", "vocab")
    assert experiment.optimization.prefix_lr == PREFIX_TUNING_LR  # the MLP's rate, not the flat prefixes'
    trainer = run_method(config, tmp_path / "run", "prefix_tuning")
    assert set(trainer.model.prefix_bank.layout.attention.values()) == {"joint"}
    assert all(e.mlp is not None for e in trainer.model.prefix_bank.encoders.values())  # trained through the MLP
    weights = load_file(str(tmp_path / "run" / "checkpoint" / "model.safetensors"))
    assert not any(".mlp." in key for key in weights)  # saved as flat keys/values
    run = load_run(tmp_path / "run")
    ids = torch.randint(5, 60, (2, 6))
    inputs = ModelInputs(ids, torch.ones_like(ids), torch.tensor([0, 2]))
    with torch.no_grad():
        before, after = trainer.model.eval()(inputs), run.model(inputs)
    for task in before:
        torch.testing.assert_close(before[task][0], after[task][0], atol=1e-5, rtol=1e-5)  # MLP vs its folded output


def test_a_prompt_run_is_served_alone_and_says_why_otherwise(tmp_path):
    config = write_project(tmp_path, max_steps=2)
    run_method(config, tmp_path / "prompt", "prompt_tuning")
    run_method(config, tmp_path / "prefix", "prefix_per_task")
    alone = load_catalog([str(tmp_path / "prompt")])
    assert "cls" in alone.tasks
    with pytest.raises(ConfigError, match="method 'prompt' puts soft prompt tokens in front of its inputs, which "
                                          "other runs' inputs cannot share a batch with, so this run cannot be served "
                                          "with other runs; serve it alone"):
        load_catalog([f"a={tmp_path / 'prefix'}", f"b={tmp_path / 'prompt'}"])
