"""Encoders load the same way in every process: float32, no pooler unless a head asks for one, and a fingerprint
of checkpoint weights only, so runs on checkpoints without pooler weights (roberta-base) load back."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModel

from multitask.backbone import encoder_fingerprint, encoder_from_config, load_encoder
from multitask.cli import main
from multitask.errors import UnsupportedModelError
from multitask.run import load_run
from tests.fixtures import write_project
from tests.tiny import tiny_config, tiny_tokenizer

KINDS = ("bert", "roberta", "xlm-roberta", "electra")
POOLED_KINDS = ("bert", "roberta", "xlm-roberta")


def save_checkpoint(directory: Path, kind: str, dtype: torch.dtype = torch.float32, pooler: bool = False) -> Path:
    """A tiny encoder saved the way hub checkpoints are, with or without pooler weights, and its tokenizer."""
    torch.manual_seed(0)
    encoder_from_config(tiny_config(kind), with_pooler=pooler).to(dtype).save_pretrained(directory)
    tiny_tokenizer(directory).save_pretrained(directory)
    return directory


def cli(*args: str) -> subprocess.CompletedProcess:
    """The CLI in a fresh process, as a user runs it (where transformers made a random pooler, a new one)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "multitask", *args], capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_loads_float32_without_pooler_and_fingerprints_the_checkpoint_alone(tmp_path, kind, dtype):
    source = str(save_checkpoint(tmp_path / "encoder", kind, dtype))
    torch.manual_seed(1)
    first = load_encoder(source)
    torch.manual_seed(2)  # whatever transformers initialises at random must not reach the fingerprint
    second = load_encoder(source, checkpoint_pooler=True)
    assert {p.dtype for p in first.parameters()} == {torch.float32}
    assert getattr(first, "pooler", None) is None and getattr(second, "pooler", None) is None
    assert not any(key.startswith("pooler.") for key in first.state_dict())
    assert encoder_fingerprint(first) == encoder_fingerprint(second)


@pytest.mark.parametrize("kind", KINDS)
def test_asking_for_a_pooler_the_checkpoint_lacks_is_one_clear_line(tmp_path, kind):
    source = str(save_checkpoint(tmp_path / "encoder", kind))
    with pytest.raises(UnsupportedModelError, match="use pooling: cls or mean") as raised:
        load_encoder(source, with_pooler=True)
    assert source in str(raised.value) and "\n" not in str(raised.value)


@pytest.mark.parametrize("kind", POOLED_KINDS)
def test_a_shipped_pooler_loads_on_request_and_stays_out_of_the_fingerprint(tmp_path, kind):
    source = str(save_checkpoint(tmp_path / "encoder", kind, torch.bfloat16, pooler=True))
    saved = AutoModel.from_pretrained(source, dtype=torch.float32).pooler.dense.weight
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("transformers.modeling_utils")
    logger.addHandler(handler)
    try:
        with_pooler, without = load_encoder(source, with_pooler=True), load_encoder(source)
    finally:
        logger.removeHandler(handler)
    loaded = with_pooler.pooler.dense.weight
    assert torch.equal(loaded, saved) and loaded.dtype == torch.float32
    assert getattr(without, "pooler", None) is None
    assert encoder_fingerprint(with_pooler) == encoder_fingerprint(without)
    assert not [r for r in records if "LOAD REPORT" in r.getMessage()]  # pooler keys left out on purpose: no news


@pytest.mark.parametrize("kind", ["roberta", "bert"])
def test_a_run_on_a_pooler_less_checkpoint_evaluates_in_a_fresh_process(tmp_path, kind):
    save_checkpoint(tmp_path / "encoder", kind)
    config = write_project(tmp_path)  # keeps the encoder saved above
    run_dir = tmp_path / "run"
    assert main(["train", str(config), "--output-dir", str(run_dir), "--no-progress",
                 "--set", "optimization.max_steps=2", "--set", "evaluation.every_steps=2"]) == 0
    evaluated = cli("evaluate", str(run_dir), "--output-dir", str(tmp_path / "eval"))
    assert evaluated.returncode == 0, evaluated.stderr
    trained = json.loads((run_dir / "report.json").read_text())["tasks"]
    report = json.loads((tmp_path / "eval" / "report.json").read_text())["tasks"]
    assert report.keys() == {"cls", "ner", "qa"}
    assert {name: task["metrics"] for name, task in report.items()} == {
        name: task["metrics"] for name, task in trained.items()}


def test_pooler_pooling_on_a_pooler_less_checkpoint_is_one_line_from_the_cli(tmp_path, capsys):
    save_checkpoint(tmp_path / "encoder", "roberta")
    config = write_project(tmp_path)
    task = tmp_path / "tasks" / "cls.yaml"
    task.write_text(task.read_text() + "head: {pooling: pooler}\n", encoding="utf-8")
    capsys.readouterr()
    assert main(["train", str(config), "--output-dir", str(tmp_path / "run"), "--no-progress"]) == 2
    stderr = capsys.readouterr().err
    error = stderr.strip().splitlines()[-1]  # after the progress log lines of the tasks read so far
    assert error.startswith("error: ") and "Traceback" not in stderr
    assert str(tmp_path / "encoder") in error and "use pooling: cls or mean" in error


def test_a_run_whose_head_pools_with_a_shipped_pooler_loads_back(tmp_path):
    save_checkpoint(tmp_path / "encoder", "bert", pooler=True)
    config = write_project(tmp_path)
    task = tmp_path / "tasks" / "cls.yaml"
    task.write_text(task.read_text() + "head: {pooling: pooler}\n", encoding="utf-8")
    run_dir = tmp_path / "run"
    assert main(["train", str(config), "--output-dir", str(run_dir), "--no-progress",
                 "--set", "optimization.max_steps=2"]) == 0
    run = load_run(run_dir)
    assert run.model.encoder.pooler is not None
    saved = [json.loads(line) for line in (run_dir / "predictions" / "cls.validation.jsonl").read_text().splitlines()]
    again = run.predict("cls", [{"text": row["text"]} for row in saved])
    assert [p["score"] for p in again] == pytest.approx([row["score"] for row in saved], abs=1e-6)


def fingerprint_before_v2(model: torch.nn.Module) -> str:
    """The fingerprint runs saved before v2 carry: every weight hashed, the pooler included."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        flat = tensor.detach().float().flatten()
        digest.update(flat[:: max(1, flat.numel() // 4096)].cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def test_a_run_saved_with_an_older_fingerprint_still_loads(tmp_path):
    source = save_checkpoint(tmp_path / "encoder", "bert", pooler=True)
    config = write_project(tmp_path)
    run_dir = tmp_path / "run"
    assert main(["train", str(config), "--output-dir", str(run_dir), "--no-progress",
                 "--set", "optimization.max_steps=2"]) == 0
    meta_path = run_dir / "checkpoint" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["encoder"]["fingerprint"] = fingerprint_before_v2(AutoModel.from_pretrained(str(source)))
    meta_path.write_text(json.dumps(meta), encoding="utf-8")
    assert load_run(run_dir).model.encoder.pooler is not None  # loaded to check the old fingerprint
