"""The CUDA code paths, checked on the CPU: what can be decided without a GPU is decided here (the GPU's own checks
are in test_gpu.py and bench/gpu_check.sh). Per-rank random states and a resume on fewer GPUs, the process group's
timeout, native bf16 only, a half-precision frozen encoder with its fingerprint kept, no read-back from the device
in a forward pass, the frozen cache's placement, the device and precision in the report, --nproc against the GPUs."""

from __future__ import annotations

import json
import logging
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from multitask import device as device_module
from multitask import parallel
from multitask.backbone import encoder_fingerprint
from multitask.cli import main
from multitask.config import load_config
from multitask.device import cast_frozen_encoder, frozen_encoder_dtype, resolve_device
from multitask.errors import ConfigError
from multitask.experiment import ExperimentConfig, FrozenCacheConfig
from multitask.model import ModelInputs
from multitask.precision import resolve_precision
from multitask.prefix import injection
from multitask.prefix.bank import PrefixKV, TaskPrefixRequest, plan_layout
from multitask.prefix.config import PrefixBankConfig, PrefixConfig
from multitask.training.frozen_cache import Budget, FrozenLayerCache, MemoryStore, place
from multitask.training.trainer import Trainer
from multitask.utils import rng
from tests.fixtures import write_project
from tests.test_prefix_layers import model_with
from tests.test_prefix_model import batch, build_model
from tests.tiny import tiny_encoder

CUDA = torch.device("cuda")  # a name only: nothing here runs on it


class FakeGpus:
    """torch.cuda's random-state calls on ``count`` GPUs, each state a distinct tensor."""

    def __init__(self, monkeypatch, count: int) -> None:
        self.states = {index: torch.tensor([index], dtype=torch.uint8) for index in range(count)}
        self.count = count
        monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": self.states[self.index(device)])
        monkeypatch.setattr(torch.cuda, "set_rng_state", self.set)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_rng_state_all",
                            lambda: pytest.fail("every GPU's state read: a rank saves its own"))

    def index(self, device) -> int:
        index = torch.device(device).index or 0
        if index >= self.count:
            raise IndexError(f"no GPU {index}")
        return index

    def set(self, state, device="cuda") -> None:
        self.states[self.index(device)] = state


def test_a_rank_saves_and_restores_only_its_own_gpu_random_state(monkeypatch):
    FakeGpus(monkeypatch, 2)
    saved = rng.rng_state(torch.device("cuda", 1))
    assert torch.equal(saved["cuda_device"], torch.tensor([1], dtype=torch.uint8)) and "cuda" not in saved
    restored = FakeGpus(monkeypatch, 1)  # resumed on one GPU: rank 1's stream goes to that rank's own GPU
    rng.restore_rng_state(saved, torch.device("cuda", 0))
    assert torch.equal(restored.states[0], saved["cuda_device"])
    assert "cuda_device" not in rng.rng_state(torch.device("cpu"))  # a CPU run's state has no GPU part


def test_a_state_saved_with_every_gpu_resumes_on_fewer(monkeypatch):
    """States saved before per-rank capture hold all visible GPUs' streams; fewer GPUs now must not fail."""
    legacy = {**rng.rng_state(), "cuda": [torch.tensor([7], dtype=torch.uint8), torch.tensor([8], dtype=torch.uint8)]}
    gpus = FakeGpus(monkeypatch, 1)
    rng.restore_rng_state(legacy, torch.device("cuda", 0))
    assert gpus.states[0].item() == 7
    gpus = FakeGpus(monkeypatch, 4)
    rng.restore_rng_state(legacy, torch.device("cuda", 3))  # a rank beyond the saved list takes the first stream
    assert gpus.states[3].item() == 7


def test_the_process_group_waits_long_enough_for_rank_0_and_says_how_to_change_it(monkeypatch):
    monkeypatch.delenv("MULTITASK_DIST_TIMEOUT_MINUTES", raising=False)
    assert parallel.process_group_timeout() == timedelta(minutes=parallel.DEFAULT_TIMEOUT_MINUTES)
    monkeypatch.setenv("MULTITASK_DIST_TIMEOUT_MINUTES", "5")
    assert parallel.process_group_timeout() == timedelta(minutes=5)
    monkeypatch.setenv("MULTITASK_DIST_TIMEOUT_MINUTES", "soon")
    with pytest.raises(ConfigError, match=r"^MULTITASK_DIST_TIMEOUT_MINUTES='soon': expected a number of minutes$"):
        parallel.process_group_timeout()


def test_joining_the_process_group_passes_the_timeout_and_refuses_a_rank_without_a_gpu(monkeypatch):
    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MULTITASK_DIST_TIMEOUT_MINUTES", "30")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kwargs: calls.append((backend, kwargs)))
    assert parallel.init_process_group(torch.device("cpu")) == torch.device("cpu")
    assert calls == [("gloo", {"timeout": timedelta(minutes=30), "device_id": None})]
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match=r"^rank with LOCAL_RANK=1 has no GPU of its own: this machine shows 1; "):
        parallel.init_process_group(CUDA)


def test_the_loss_share_needs_no_collective(monkeypatch):
    assert parallel.loss_share(3, 3) == (1.0, 3.0)
    monkeypatch.setattr(parallel, "world_size", lambda: 2)
    assert parallel.loss_share(3, 7) == (3 / 7, 7.0) and parallel.loss_share(0, 0) == (0.0, 0.0)


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp16")])
def test_auto_takes_native_bf16_only_on_a_gpu_else_fp16(monkeypatch, native, expected):
    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: asked.append(including_emulation) or native)
    precision, reason = resolve_precision("auto", CUDA)
    assert precision == expected and reason.startswith("auto") and asked == [False]
    assert resolve_precision("fp32", CUDA) == ("fp32", "set in the experiment")


def test_the_frozen_encoder_is_held_in_half_precision_on_a_gpu_only():
    assert frozen_encoder_dtype(torch.device("cpu"), "bf16", "prefix") is None  # CPU results stay as they are
    assert frozen_encoder_dtype(CUDA, "fp32", "prefix") is None
    assert frozen_encoder_dtype(CUDA, "bf16", "lora") is None and frozen_encoder_dtype(CUDA, "fp16", "full_ft") is None
    assert frozen_encoder_dtype(CUDA, "bf16", "prefix") == torch.bfloat16
    assert frozen_encoder_dtype(CUDA, "fp16", "linear_probe") == torch.float16


def test_a_cast_frozen_encoder_keeps_its_fingerprint_and_runs_under_autocast():
    """The cast itself is device-agnostic: done here on the CPU (as if on a GPU) and run under CPU autocast."""
    model = build_model("bert", "per_task")
    inputs = batch([0, 1, 2, 0])
    expected = model.encode(inputs).hidden_states
    fingerprint = encoder_fingerprint(model.encoder)
    assert cast_frozen_encoder(model, CUDA, "bf16", "prefix") == "bfloat16"
    assert encoder_fingerprint(model.encoder) == fingerprint  # the weights as loaded, which checkpoints record
    linear = [m for m in model.encoder.modules() if isinstance(m, torch.nn.Linear)]
    assert linear and all(m.weight.dtype == torch.bfloat16 for m in linear)
    assert model.encoder.get_input_embeddings().weight.dtype == torch.float32  # read outside autocast (mixtures)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = model.encode(inputs).hidden_states
    torch.testing.assert_close(half.float(), expected, atol=0.1, rtol=0.05)
    trained = build_model("bert", "per_task")
    for parameter in trained.encoder.parameters():
        parameter.requires_grad_(True)
    assert cast_frozen_encoder(trained, CUDA, "bf16", "prefix") is None  # a trained encoder is never cast


class NoReadBack:
    """Every way a forward pass could read a tensor back to the host (each a wait for a GPU) fails while active."""

    CALLS = ("item", "tolist", "__bool__", "nonzero", "cpu", "numpy")

    def __init__(self, monkeypatch) -> None:
        self.monkeypatch = monkeypatch

    def __enter__(self):
        self.monkeypatch.setattr(injection, "NO_READ_BACK_DEVICES", ("cuda", "cpu"))  # the CPU stands in for a GPU
        for name in self.CALLS:
            self.monkeypatch.setattr(torch.Tensor, name, self._refuse(name))
        self.monkeypatch.setattr(torch, "unique", self._refuse("torch.unique"))
        self.monkeypatch.setattr(torch, "nonzero", self._refuse("torch.nonzero"))
        return self

    @staticmethod
    def _refuse(name):
        def refuse(*args, **kwargs):
            raise AssertionError(f"{name} read a tensor back during the forward pass")
        return refuse

    def __exit__(self, *exc) -> None:
        self.monkeypatch.undo()


@pytest.mark.parametrize("mode", ["per_task", "hybrid"])
@pytest.mark.parametrize("pad_rows", [(1,), ()])
def test_a_forward_pass_reads_nothing_back_once_the_batch_is_prepared(monkeypatch, mode, pad_rows):
    model = build_model("bert", mode, prefix_attention="mixed")
    expected = {task: logits for task, (logits, _) in model(batch([0, 1, 2, 1], pad_rows=pad_rows)).items()}
    prepared = batch([0, 1, 2, 1], pad_rows=pad_rows).to("cpu")  # what the trainer and the engine pass
    with NoReadBack(monkeypatch):
        outputs = model(prepared)
    for task, (logits, _) in outputs.items():
        assert torch.equal(logits, expected[task])


def test_prefixes_of_other_depths_read_nothing_back_either(monkeypatch):
    config = PrefixBankConfig(mode="per_task", prefix=PrefixConfig(length=4, reparameterize=False, dropout=0.0))
    requests = [TaskPrefixRequest("cls", layers=[0, 2]), TaskPrefixRequest("ner", layers={"top": 1})]
    model = model_with(config, requests)
    ids = torch.randint(5, 60, (3, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    expected = model.encode(ModelInputs(ids, mask, torch.tensor([0, 1, 0]))).hidden_states
    prepared = ModelInputs(ids, mask, torch.tensor([0, 1, 0])).to("cpu")
    with NoReadBack(monkeypatch):
        hidden = model.encode(prepared).hidden_states
    assert torch.equal(hidden, expected)


def test_the_widened_mask_is_built_once_per_forward_for_prefixes_in_every_layer(monkeypatch):
    built = []
    widen = injection._widen_mask
    monkeypatch.setattr(injection, "_widen_mask", lambda *args: built.append(1) or widen(*args))
    model = build_model("bert", "per_task", lengths=(4, 2, 3))
    model.encode(batch([0, 1, 2]))
    assert len(built) == 1  # the encoder has 2 layers


def test_the_bank_says_per_layer_whether_every_row_sees_every_prefix_position():
    """So the attention never asks the mask (a read-back per layer on a GPU)."""
    model = build_model("bert", "per_task", lengths=(4, 2, 3))
    for task_ids, fully in (([0, 0], True), ([0, 1], False)):
        joint = model.prefix_bank(torch.tensor(task_ids)).joint
        assert isinstance(joint, PrefixKV) and joint.full == [fully, fully]
        assert joint.layer(0).fully_visible is fully


def test_the_frozen_cache_lives_on_the_gpu_when_it_fits_else_in_host_memory(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10e9, 16e9))
    assert place("memory", CUDA, needed=1e9, max_bytes=4e9) == "device"
    assert place("memory", CUDA, needed=5e9, max_bytes=4e9) == "host"  # past max_gb
    assert place("memory", CUDA, needed=6e9, max_bytes=8e9) == "host"  # past half the free memory
    assert place("host", CUDA, 1, 4e9) == "host" and place("disk", CUDA, 1, 4e9) == "disk"
    assert place("device", CUDA, 5e9, 4e9) == "device"  # asked for: inputs past max_gb are recomputed
    assert [place(where, torch.device("cpu"), 1, 4e9) for where in ("memory", "device", "host", "disk")] == \
        ["host", "host", "host", "disk"]


def test_states_computed_on_a_device_are_packed_in_one_cast():
    cache = FrozenLayerCache.__new__(FrozenLayerCache)
    cache.dtype, cache.location = torch.bfloat16, "device"
    states = [torch.randn(3, 4), torch.randn(5, 4)]
    kept, fresh = cache._from_device(states)
    assert kept is fresh and [s.shape for s in kept] == [(3, 4), (5, 4)]
    assert all(s.dtype == torch.bfloat16 and torch.equal(s, o.to(torch.bfloat16)) for s, o in zip(kept, states))
    store = MemoryStore(torch.bfloat16, Budget(1e9))
    store.put(dict(enumerate(kept)))
    assert store.stored == 2


def test_the_config_accepts_the_new_cache_locations():
    assert FrozenCacheConfig(location="device").location == "device"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu-ready")
    config = write_project(root, max_steps=3)
    experiment = load_config(ExperimentConfig, config, ["evaluation.every_steps=2"])
    trainer = Trainer(experiment, root / "run", config_path=config, progress=False, encoder=tiny_encoder("bert"))
    trainer.train()
    return root, trainer


def test_the_report_names_the_device_and_the_precision(trained):
    root, _ = trained
    meta = json.loads((root / "run" / "report.json").read_text())["meta"]
    assert (meta["device"], meta["precision"], meta["tf32"], meta["frozen_encoder_dtype"]) == ("cpu", "fp32", False,
                                                                                               None)


def test_training_losses_are_read_back_in_windows_and_all_kept(trained):
    _, trainer = trained
    assert trainer.history.pending_loss and sum(len(v) for v in trainer.history.pending_loss.values()) == 3
    task, loss = trainer.train_step()
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0 and task in {"cls", "ner", "qa"}


def test_device_auto_says_when_it_falls_back_to_the_cpu(caplog):
    device_module._say_cpu_fallback.cache_clear()
    with caplog.at_level(logging.INFO, logger="multitask.device"):
        assert resolve_device("auto") == torch.device("cpu")
        resolve_device("auto")
    assert caplog.messages == ["device auto: no CUDA device visible to torch, running on the CPU"]


def test_a_gpu_index_the_machine_lacks_is_a_config_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match=r"^device 'cuda:1' was asked for, but torch sees 1 CUDA device\(s\)$"):
        resolve_device("cuda:1")


def test_nproc_beyond_the_visible_gpus_is_refused_before_torchrun_starts(tmp_path, monkeypatch, capsys):
    config = write_project(tmp_path, max_steps=2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr("subprocess.run", lambda *a, **k: pytest.fail("torchrun started"))
    assert main(["train", str(config), "--nproc", "2", "--set", "device=cuda"]) == 2
    assert "--nproc 2 on device 'cuda': this machine shows 1 GPU(s), one per process" in capsys.readouterr().err


def test_gpu_check_runs_its_checks_on_the_cpu_in_a_dry_run(tmp_path):
    """bench/gpu_check.sh's control flow (a few of its checks; the whole dry run takes minutes here)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"
    only = "train-fp32,frozen-cache-device,fp32-against-cpu,syncs-per-step,load-run-bf16-against-cpu"
    result = subprocess.run([sys.executable, str(script), "--dry-run", "--only", only, "--output-dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    lines = result.stdout.splitlines()
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    assert [line.split()[:2] for line in lines[1:-1]] == [["PASS", name] for name in only.split(",")]
    assert lines[-1].startswith("gpu_check: 5 passed, 0 failed, 0 skipped")
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [r["status"] for r in saved["results"]] == ["PASS"] * 5
    no_gpu = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert no_gpu.returncode == 0 and "no CUDA device visible to torch; nothing checked" in no_gpu.stdout
