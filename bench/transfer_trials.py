"""How `prefix.transfer: auto` ranks its candidates under different plans, without training the runs.

`auto` scores every candidate start (a fresh prefix, and each base prefix) on a new task's training examples: by
default by the evidence of a linear head on its features (``evidence``), or by a trial of a few steps scored on
held-back examples (steps, folds, criterion). This script runs only the scoring, for several plans side by side on
the same task, base and seed, and prints each candidate's score, the best-scored and the pick after the same-type
prior. Compare the picks with `bench/grow_transfer.py --sweep`, which trains every single source to its plateau.

    python bench/transfer_trials.py --base runs/demo-base --targets trec_coarse,wnut17,bc5cdr --size 100 \
        --plans evidence,20x1:loss,20x1:metric,20:metric,60x1:metric

Writes transfer_trials.json and transfer_trials.md under --output.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def parse_plan(text: str):
    """'50x3:metric' -> TrialPlan(steps=50, folds=3, criterion='metric'); '20:metric' leaves the folds to auto's
    default (enough to score on 100 held-back examples); 'evidence' scores untrained candidates (auto's default)."""
    from multitask.training.prefix_transfer import TrialPlan

    if text == "evidence":
        return TrialPlan(0, criterion="evidence")
    shape, _, criterion = text.partition(":")
    steps, _, folds = shape.partition("x")
    return TrialPlan(int(steps), int(folds) if folds else None, criterion or "metric")


def grown_trainer(args, target: str, seed: int, work: Path):
    """A grown run's trainer for ``target`` (fresh prefix; nothing trained): the model, data and tokenizer to score
    candidates with."""
    from multitask.config import load_config
    from multitask.experiment import ExperimentConfig
    from multitask.training.trainer import Trainer

    config = {
        "name": f"trials-{target}-{seed}", "base": str(Path(args.base).resolve()),
        "tasks": [{"file": str(REPO / "tasks" / f"{target}.yaml"), "limit_train": args.size, "limit_eval": 10,
                   "batch_size": args.batch_size}],
        "prefix": {"transfer": "none"}, "optimization": {"max_steps": 1}, "seed": seed, "precision": args.precision,
    }
    path = work / f"{target}-{seed}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return Trainer(load_config(ExperimentConfig, path), work / f"{target}-{seed}", config_path=path, progress=False)


def cell(score: dict) -> str:
    """A candidate's evidence, its held-back metric with how often it matched the best in the paired resamples, or its
    loss."""
    if "evidence" in score:
        return f"{score['evidence']:.4f}"
    if "metric" not in score:
        return f"{score['loss']:.3f}"
    return f"{score['metric']:.3f} [{score['matches_best']:.2f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the trained run to grow (configs/demo.yaml's run)")
    parser.add_argument("--targets", default="trec_coarse,wnut17,bc5cdr")
    parser.add_argument("--size", type=int, default=100, help="training examples of the new task")
    parser.add_argument("--seeds", default="13")
    parser.add_argument("--plans", default="20x1:loss,20x1:metric,20:metric,60x1:metric",
                        help="comma-separated STEPSxFOLDS:CRITERION")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--output", default="runs/transfer-trials")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from multitask.training.grow import new_prefix_name
    from multitask.training.prefix_transfer import FRESH, best_candidate, candidates, choose, score_starts

    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    rows = []
    for target in args.targets.split(","):
        for seed in map(int, args.seeds.split(",")):
            trainer = grown_trainer(args, target, seed, output)
            (runtime,) = trainer.tasks
            name = new_prefix_name(runtime.name)
            fitted, skipped = candidates(trainer.model, name, trainer.base.prefix_names)
            tuning = trainer.tunings[runtime.name]
            same_type = [n for n in trainer.base.prefixes_of_type(runtime.task.config.type) if n in fitted]
            for plan_text in args.plans.split(","):
                plan = parse_plan(plan_text)
                started = time.perf_counter()
                scores = score_starts(trainer.model, runtime, name, {FRESH: None, **fitted},
                                      (tuning.prefix_lr, tuning.head_lr), plan, trainer.tokenizer, trainer.device,
                                      trainer.precision, trainer.pad_id, seed)
                seconds = time.perf_counter() - started
                best, chosen = best_candidate(scores, plan.criterion), choose(scores, plan, same_type)
                rows.append({"target": target, "seed": seed, "plan": plan_text, "best": best, "chosen": chosen,
                             "seconds": round(seconds, 1), "skipped": skipped,
                             "scores": {n: s.describe() for n, s in scores.items()}})
                cells = ", ".join(f"{n} {cell(s.describe())}" for n, s in scores.items())
                print(f"{target} seed {seed} plan {plan_text}: best-scored {best}, chose {chosen} ({cells}); "
                      f"{seconds:.0f} s", flush=True)
    (output / "transfer_trials.json").write_text(json.dumps(rows, indent=2))
    lines = ["| target | seed | plan | best-scored | chosen (same-type prior) | candidates: evidence, or metric "
             "[share of resamples at least the best's], or loss | seconds |", "|---|---:|---|---|---|---|---:|"]
    for row in rows:
        cells = ", ".join(f"{n} {cell(s)}" for n, s in row["scores"].items())
        lines.append(f"| {row['target']} | {row['seed']} | {row['plan']} | {row['best']} | {row['chosen']} | {cells} | "
                     f"{row['seconds']} |")
    (output / "transfer_trials.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
