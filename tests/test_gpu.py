"""On a CUDA device only (skipped elsewhere; see conftest.py): the tiny project trains in every precision with
finite losses, the report names the device, the frozen encoder is held in half precision with its fingerprint
kept, the first step's gradients match the CPU's, the frozen cache works on and off the GPU, a prepared forward
pass never waits for the device, and a run loaded on the GPU in bf16 predicts what the CPU predicts in fp32.
bench/gpu_check.sh runs the longer checks (serving, kill and resume, several GPUs)."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

from multitask.backbone import encoder_fingerprint
from multitask.config import load_config
from multitask.experiment import ExperimentConfig
from multitask.run import load_run
from multitask.training.trainer import Trainer
from tests.fixtures import write_project
from tests.test_prefix_model import batch, build_model
from tests.tiny import tiny_encoder

pytestmark = pytest.mark.gpu
NO_DROPOUT = ["prefix.prefix.dropout=0", *(f"tasks.{i}.overrides.head.dropout=0" for i in range(3))]
# The QA span head's bias gets a gradient of float noise only (see test_distributed.py): no two devices agree on it.
NOISE_ONLY = {"heads.qa.layers.1.bias"}


def trainer(root, name: str, overrides: list[str]) -> Trainer:
    config = root / "configs" / "exp.yaml"
    experiment = load_config(ExperimentConfig, config, overrides)
    return Trainer(experiment, root / name, config_path=config, progress=False, encoder=tiny_encoder("bert"))


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu")
    write_project(root, max_steps=12)
    return root


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_the_tiny_project_trains_on_the_gpu_in_every_precision(project, precision):
    run = trainer(project, f"run-{precision}", [f"precision={precision}", "device=cuda"])
    report = run.train()
    losses = [value for points in run.history.loss.values() for _, value in points]
    losses += [value for window in run.history.pending_loss.values() for value in window]
    assert losses and all(math.isfinite(value) for value in losses)
    meta = json.loads((project / f"run-{precision}" / "report.json").read_text())["meta"]
    assert meta["device"].startswith("cuda:") and meta["precision"] == precision
    assert meta["frozen_encoder_dtype"] == {"fp32": None, "bf16": "bfloat16", "fp16": "float16"}[precision]
    assert meta["tf32"] is (precision == "fp32") and meta["peak_gpu_memory_bytes"] > 0
    assert report.meta["steps"] == 12


def test_the_checkpoint_names_the_encoder_as_loaded_not_as_cast(project):
    run = trainer(project, "fingerprint", ["precision=bf16", "device=cuda", "optimization.max_steps=2"])
    run.train()
    meta = json.loads((project / "fingerprint" / "checkpoint" / "meta.json").read_text())
    assert meta["encoder"]["fingerprint"] == encoder_fingerprint(tiny_encoder("bert"))
    cpu = load_run(project / "fingerprint", device="cpu", precision="fp32")
    gpu = load_run(project / "fingerprint", device="cuda", precision="bf16")
    texts = ["good fun film", "bad boring movie", "john was born in paris"]
    on_cpu, on_gpu = cpu.predict("cls", texts, all_scores=True), gpu.predict("cls", texts, all_scores=True)
    assert [p["label"] for p in on_cpu] == [p["label"] for p in on_gpu]
    for a, b in zip(on_cpu, on_gpu):
        assert a["score"] == pytest.approx(b["score"], abs=0.05)


def first_gradients(run: Trainer) -> dict[str, torch.Tensor]:
    gradients = {}
    run.optimizer.register_step_pre_hook(lambda *_: gradients or gradients.update(
        {name: p.grad.detach().cpu().clone() for name, p in run.model.named_parameters() if p.grad is not None}))
    run.train_step()
    return gradients


def test_the_first_step_computes_the_cpus_gradients(project):
    """fp32 with TF32 products: within TF32's precision of the CPU's fp32 (one step: trajectories drift)."""
    cpu = first_gradients(trainer(project, "grad-cpu", NO_DROPOUT + ["device=cpu"]))
    gpu = first_gradients(trainer(project, "grad-gpu", NO_DROPOUT + ["device=cuda", "precision=fp32"]))
    assert cpu.keys() == gpu.keys()
    for name in cpu.keys() - NOISE_ONLY:
        torch.testing.assert_close(gpu[name], cpu[name], rtol=2e-2, atol=1e-4, msg=name)


@pytest.mark.parametrize("location", ["memory", "device", "host", "disk"])
def test_the_frozen_cache_trains_as_without_it(project, location):
    """fp32 states at a small learning rate (Adam moves each weight by about the rate per step, whatever its
    gradient, so only a small rate makes two runs' weights comparable)."""
    cache = ["prefix.prefix.layers={top: 1}", "optimization.frozen_cache.enabled=true",
             f"optimization.frozen_cache.location={location}", "optimization.frozen_cache.dtype=float32",
             "optimization.max_steps=6", "optimization.prefix_lr=1e-4", "optimization.head_lr=1e-4",
             "tasks.0.limit_train=8", "tasks.1.limit_train=4", "tasks.2.limit_train=2", "device=cuda",
             "precision=fp32", *NO_DROPOUT]
    run = trainer(project, f"cache-{location}", cache)
    run.train()
    summary = run.frozen_cache.summary()
    assert summary["hits"] > 0 and summary["location"] == ("device" if location in ("memory", "device") else
                                                             location)
    plain = trainer(project, f"plain-{location}", [c for c in cache if "frozen_cache" not in c])
    plain.train()
    for name, value in plain.model.state_dict().items():
        if name.startswith(("prefix_bank", "heads")) and name not in NOISE_ONLY:
            torch.testing.assert_close(run.model.state_dict()[name], value, rtol=1e-3, atol=5e-4)


@pytest.mark.parametrize("pad_rows", [(), (1,)])
def test_a_prepared_forward_pass_does_not_wait_for_the_device(pad_rows):
    model = build_model("bert", "hybrid", prefix_attention="mixed").cuda()
    inputs = batch([0, 1, 2, 1], pad_rows=pad_rows).to("cuda")
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            model(inputs)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert not syncs, [str(w.message) for w in syncs]
