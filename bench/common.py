"""What every benchmark shares: common options, models on the offline encoder, the interleaved timing loop,
and the report (table, ratio against its target, the command that reproduces it).

Benchmarks quote ratios measured side by side in one run, never absolute times alone: this machine (and any
shared one) is noisy, and interleaving the compared variants makes the noise hit all of them alike.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from multitask.backbone import encoder_shape, load_encoder
from multitask.data.features import Feature
from multitask.data.root import data_root
from multitask.heads import HEADS, HeadConfig
from multitask.model import ModelInputs, MultiTaskModel
from multitask.prefix.bank import TaskPrefixRequest, plan_layout
from multitask.prefix.config import PrefixBankConfig, PrefixConfig
from multitask.tasks.base import TaskType
from multitask.tasks.loading import load_task_data

REPO = Path(__file__).resolve().parents[1]
# One 2-way sentence classifier: the head every synthetic-batch benchmark trains.
CLASSIFIER = {"task": ("sequence", HeadConfig(), 2)}
PREFIX, FULL = "prefix (P-Tuning v2)", "full fine-tuning"

HeadSpec = tuple[str, HeadConfig, int]  # head kind, head settings, number of outputs


# ---------------------------------------------------------------- options and setup
def parser_for(doc: str | None) -> argparse.ArgumentParser:
    """An argument parser with the options every benchmark takes; the script's docstring is its help."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", default="offline:minilm", help="encoder name (default: the offline MiniLM-L6)")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda[:N]")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny smoke run: checks the script, measures nothing")
    return parser


def add_shape_args(parser: argparse.ArgumentParser) -> None:
    """The synthetic training batch of the step and memory benchmarks (DESIGN.md's reference shape)."""
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--prefix-length", type=int, default=16)


def setup(args: argparse.Namespace) -> torch.device:
    """Offline hub, thread count and seed as asked; returns the device to run on."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # "newly initialised head" warnings say nothing about speed
    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    name = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ---------------------------------------------------------------- models and batches
def build_model(encoder_name: str, heads: dict[str, HeadSpec], prefix: PrefixConfig | None) -> MultiTaskModel:
    """The model of the package in training mode: frozen encoder + one prefix per task, or (``prefix=None``)
    full fine-tuning of the same encoder with the same heads and no prefix."""
    encoder = load_encoder(encoder_name, with_pooler=any(config.pooling == "pooler" for _, config, _ in heads.values()))
    hidden = encoder_shape(encoder.config).hidden_size
    built = {name: HEADS.get(kind)(config, hidden, outputs) for name, (kind, config, outputs) in heads.items()}
    if prefix is None:
        return MultiTaskModel(encoder, built, layout=None, freeze_encoder=False).train()
    layout = plan_layout(PrefixBankConfig(mode="per_task", prefix=prefix), [TaskPrefixRequest(n) for n in heads])
    return MultiTaskModel(encoder, built, layout).train()


def task_heads(tasks: Sequence[TaskType]) -> dict[str, HeadSpec]:
    """The head each task type asks for, as its task YAML configures it."""
    return {t.config.name: (t.head_kind, t.config.head, t.num_outputs) for t in tasks}


def optimizer_for(model: MultiTaskModel) -> torch.optim.Optimizer:
    """AdamW over what trains; the learning rate does not change a step's cost."""
    return torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)


def random_batch(
    model: MultiTaskModel, args: argparse.Namespace, device: torch.device
) -> tuple[ModelInputs, torch.Tensor]:
    """A full (unpadded) ``--batch`` x ``--length`` batch of random token ids for task 0, with random 2-way labels.
    The PEFT worker draws the same ids with the same calls, so every variant sees the same tensors."""
    generator = torch.Generator().manual_seed(args.seed)
    vocab = model.encoder.config.vocab_size
    # ids past the special tokens; min(): a tiny test vocabulary (bench/gpu_check.py's dry run) has only 100
    ids = torch.randint(min(1000, vocab // 2), vocab, (args.batch, args.length), generator=generator)
    labels = torch.randint(0, 2, (args.batch,), generator=generator)
    inputs = ModelInputs(ids, torch.ones_like(ids), torch.zeros(args.batch, dtype=torch.long))
    return inputs.to(device), labels.to(device)


def train_step(
    model: MultiTaskModel, optimizer: torch.optim.Optimizer, inputs: ModelInputs, targets: torch.Tensor,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = torch.nn.functional.cross_entropy,
) -> None:
    """One optimiser step on a single-task batch: forward, loss, backward, update."""
    optimizer.zero_grad(set_to_none=True)
    (logits, _), = model(inputs).values()
    loss(logits, targets).backward()
    optimizer.step()


def task_features(task: TaskType, source: str, split: str, limit: int | None, tokenizer, training: bool,
                  root: str | None = None) -> list[Feature]:
    """Features of the first ``limit`` examples of one split, read and featurized by the package's own code."""
    examples = load_task_data(task, data_root(root), source).examples[split][:limit]
    return task.featurize(examples, tokenizer, training)


def trainable_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------- timing
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(work: Callable[[], object], device: torch.device) -> float:
    """Seconds ``work`` takes, waiting for queued GPU kernels on both sides."""
    synchronize(device)
    start = time.perf_counter()
    work()
    synchronize(device)
    return time.perf_counter() - start


def step_variant(
    model: MultiTaskModel, inputs: ModelInputs, targets: torch.Tensor, device: torch.device, steps: int = 1
) -> Callable[[int], list[float]]:
    """A variant for :func:`run_rounds`: ``steps`` timed training steps of ``model`` on one fixed batch per round."""
    model.to(device)
    optimizer = optimizer_for(model)
    step = lambda: train_step(model, optimizer, inputs, targets)  # noqa: E731
    return lambda _round: [timed(step, device) for _ in range(steps)]


def run_rounds(
    variants: dict[str, Callable[[int], list[float]]], rounds: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Interleave the variants: every round runs each once (``variant(round) -> its timings``), in alternating
    order so that neither always goes first. ``warmup`` untimed rounds repeat round 0's work beforehand."""
    for _ in range(warmup):
        for run in variants.values():
            run(0)
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for index in range(rounds):
        for name in names if index % 2 == 0 else reversed(names):
            times[name].extend(variants[name](index))
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


# ---------------------------------------------------------------- report
def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A plain text table: first column left-aligned, the others right-aligned; floats with 3 decimals, ints
    with thousands separators, strings as given."""
    cells = [[f"{c:,.3f}" if isinstance(c, float) else f"{c:,}" if isinstance(c, int) else str(c) for c in row]
             for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = lambda row: "  ".join(  # noqa: E731
        str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths))
    )
    print(line(headers))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print(line(row))


def report_ratio(label: str, value: float, target: float, at_most: bool = True) -> None:
    """Print one ratio and whether it meets its target (``<= target``, or ``>=`` with ``at_most=False``)."""
    met = value <= target if at_most else value >= target
    sign = "<=" if at_most else ">="
    print(f"{label}: {value:.3f}   target {sign} {target:g}: {'met' if met else 'NOT met'}")


def print_header(title: str, args: argparse.Namespace, device: torch.device, **details: object) -> None:
    """What was measured and under which settings, above the table."""
    settings = " ".join(f"{key}={value}" for key, value in details.items())
    print(f"{title}\nencoder={args.encoder} device={device} threads={torch.get_num_threads()} {settings}"
          + ("  [--quick: smoke run, the figures mean nothing]" if args.quick else ""))


def reproduce_command() -> str:
    """The command line that reproduces this run, from the repository root."""
    script = os.path.relpath(Path(sys.argv[0]).resolve(), REPO)
    python = Path(sys.executable)
    shown = os.path.relpath(python, REPO) if REPO in python.absolute().parents else str(python)
    return "HF_HUB_OFFLINE=1 " + shlex.join([shown, script, *sys.argv[1:]])


def print_footer() -> None:
    print(f"reproduce (from {REPO.name}/): {reproduce_command()}")


# ---------------------------------------------------------------- live servers
def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """A server run as a subprocess on a free loopback port (``command`` gets ``--port``); its stderr goes to a
    temporary file, shown if it fails to start."""

    def __init__(self, command: list[str], name: str = "server") -> None:
        import subprocess
        import tempfile

        self.name, self.port = name, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile()
        self.process = subprocess.Popen([*command, "--port", str(self.port)], stdout=subprocess.DEVNULL,
                                        stderr=self.log)

    def wait_ready(self, timeout: float = 600) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.log.seek(0)
                sys.exit(f"the {self.name} exited:\n{self.log.read().decode(errors='replace')[-4000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        sys.exit(f"the {self.name} did not start within {timeout:.0f} s")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(60)
