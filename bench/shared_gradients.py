"""What each task asks of a prefix several tasks share: per-task gradients of the shared prefix on real batches.

    python bench/shared_gradients.py configs/quickstart_shared.yaml [--run RUN_DIR] [--batches 16]

For every task: its mean training loss, the norm of its gradient on the shared prefix per batch (before and after
the run's gradient clipping, which is what the optimiser sees), its share of Adam's second moment on the shared
prefix (the sum of squared gradients the tasks contribute under the run's sampler), and how consistent its own
batches are (cosine between the mean gradients of its two halves of batches). Then the cosine between tasks' mean
gradients: near 0 means the tasks pull the shared prefix in unrelated directions, below 0 against each other.

Without ``--run`` the model is at its initialisation; with it, the run's prefixes and heads are loaded (the
state the shared layout reaches). Nothing is trained: each batch's gradient is taken and thrown away.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from pathlib import Path

import torch

from multitask.config import load_config
from multitask.experiment import ExperimentConfig
from multitask.training.trainer import Trainer


def batch_gradients(trainer: Trainer, task: str, batches: int, shared: list[torch.nn.Parameter]):
    """Per batch: the loss, the gradient on the shared prefix (flat), and the norm of the whole gradient."""
    runtime = next(t for t in trainer.tasks if t.name == task)
    results = []
    trainer.model.train()
    for _ in range(batches):
        rows = trainer.streams[task].next_batch()
        batch = runtime.task.collate([runtime.features["train"][i] for i in rows], trainer.pad_id)
        weight = runtime.task.loss_terms(batch.targets) / trainer.mean_terms[task] if task in trainer.mean_terms else 1.0
        loss = trainer.batch_loss(runtime, rows, batch)
        (loss * weight).backward()
        flat = torch.cat([p.grad.flatten().float() for p in shared])
        total = math.sqrt(sum(float(p.grad.float().pow(2).sum()) for p in trainer.model.trainable_parameters()
                              if p.grad is not None))
        results.append((loss.item(), flat.clone(), total))
        trainer.model.zero_grad(set_to_none=True)
    return results


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("--run", help="a trained run of this experiment: measure at its prefixes and heads")
    parser.add_argument("--batches", type=int, default=16, help="training batches per task (default 16)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    config_path = Path(args.config)
    overrides = list(args.set) + ([f"prefix.init_from={Path(args.run).resolve()}"] if args.run else [])
    experiment = load_config(ExperimentConfig, config_path, overrides)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(experiment, Path(run_dir) / "run", config_path, progress=False)
        shared = trainer.model.prefix_bank.shared_parameters()
        if not shared:
            raise SystemExit("no trainable prefix is shared by several tasks in this experiment (prefix.mode per_task?)")
        clip = experiment.optimization.max_grad_norm
        shares = trainer.sampler.probabilities()
        rows, means = [], {}
        for task in shares:
            measured = batch_gradients(trainer, task, args.batches, shared)
            norms = [float(g.norm()) for _, g, _ in measured]
            clipped = [n * min(1.0, clip / total) if clip else n for n, (_, _, total) in zip(norms, measured)]
            half = len(measured) // 2
            first = torch.stack([g for _, g, _ in measured[:half]]).mean(0)
            second = torch.stack([g for _, g, _ in measured[half:]]).mean(0)
            means[task] = torch.stack([g for _, g, _ in measured]).mean(0)
            second_moment = shares[task] * sum(c * c for c in clipped) / len(clipped)
            rows.append((task, sum(l for l, _, _ in measured) / len(measured), sum(norms) / len(norms),
                         sum(clipped) / len(clipped), second_moment, cosine(first, second)))
    total_moment = sum(row[4] for row in rows)
    state = f"the prefixes and heads of {args.run}" if args.run else "initialisation"
    print(f"Shared-prefix gradients at {state}, {args.batches} training batches per task "
          f"({sum(p.numel() for p in shared):,} shared parameters; clipping at {clip})\n")
    print("| task | mean loss | grad norm | after clipping | share of Adam's 2nd moment | within-task cosine |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for task, loss, norm, clipped, moment, within in rows:
        print(f"| {task} | {loss:.3f} | {norm:.4f} | {clipped:.4f} | {moment / total_moment:.1%} | {within:.2f} |")
    tasks = list(means)
    print("\nCosine between tasks' mean gradients on the shared prefix:\n")
    print("| | " + " | ".join(tasks) + " |")
    print("| --- |" + " ---: |" * len(tasks))
    for a in tasks:
        print(f"| {a} | " + " | ".join(f"{cosine(means[a], means[b]):.2f}" for b in tasks) + " |")


if __name__ == "__main__":
    main()
