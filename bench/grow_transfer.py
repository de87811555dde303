"""Growing a trained model with little data: a new task's prefix started from the base's prefixes (prefix.transfer)
against the prefix from scratch, LoRA and full fine-tuning, on the validation split.

Every method trains the new task alone for the same number of steps (a LoRA or full fine-tuning step costs more
than a prefix step, so equal steps give them more time than the prefix: the comparison leans their way) and keeps its
best validation evaluation (each trained to its plateau). `auto`'s choice, made on held-back training data, is
timed in the run's wall time. With --sweep every single base prefix is also tried as the source, to show what `auto`
should find (the source auto picked is not trained twice: auto's run is that run).

    python bench/grow_transfer.py --base runs/demo --targets wnut17,bc5cdr,trec_coarse --sizes 100 --seeds 13

--set key.path=value changes every run's experiment (e.g. optimization.ema_decay=0.98); prefix:key=value,
lora:key=value or full_ft:key=value only that method's runs (prefix: scratch, auto, mixture, alone and the sweep).

Writes grow_transfer.json and grow_transfer.md (mean and spread per cell) under --output.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

from multitask.config.overrides import apply_overrides
from multitask.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
# Each method: (method, prefix.transfer); a transfer of None trains without the base. scratch grows the base with a
# fresh prefix (the same model as alone, plus the base's tasks); alone is the task trained on its own (growing's
# wall-time reference); mixture mixes every base prefix per input.
METHODS = {"scratch": ("prefix", "none"), "auto": ("prefix", "auto"), "mixture": ("prefix", "mixture"),
           "alone": ("prefix", None), "lora": ("lora", None), "full_ft": ("full_ft", None)}


def experiment(args, target: str, size: int, seed: int, method: str, transfer: str | None) -> dict:
    config = {
        "name": f"{target}-{size}-{method}-{seed}",
        "method": method,
        "tasks": [{"file": str(REPO / "tasks" / f"{target}.yaml"), "limit_train": size, "limit_eval": args.limit_eval,
                   "batch_size": args.batch_size}],
        "optimization": {"max_steps": args.steps},
        "evaluation": {"every_steps": args.every, "batch_size": 64},
        "seed": seed,
        "precision": args.precision,
    }
    if transfer is not None:
        config["base"] = str(Path(args.base).resolve())
        config["prefix"] = {"transfer": transfer}
    try:
        return apply_overrides(config, method_settings(args.set, method), source=f"--set ({method})")
    except ConfigError as error:
        raise SystemExit(str(error)) from None


def method_settings(settings: list[str], method: str) -> list[str]:
    """The --set values for one method: unprefixed ones apply to all, ``method:key=value`` to that method only."""
    chosen = []
    for item in settings:
        target, colon, rest = item.partition(":")
        if colon and "=" not in target:
            if target in {"prefix", "lora", "full_ft"}:
                chosen += [rest] if target == method else []
                continue
            raise SystemExit(f"--set {item!r}: expected prefix:, lora: or full_ft: before the key, got {target!r}")
        chosen.append(item)
    return chosen


def train(config: dict, run_dir: Path) -> dict:
    """Train in a fresh process (skipped when the run already finished); its report.json. A finished run of other
    settings (another --set, --steps, ...) is refused rather than reported as this one."""
    written = run_dir / "experiment.yaml"
    if written.exists() and yaml.safe_load(written.read_text()) != config:
        raise SystemExit(f"{written}: a run of other settings is already there; use another --output")
    if not (run_dir / "report.json").exists():
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "experiment.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        command = [sys.executable, "-m", "multitask", "train", str(run_dir / "experiment.yaml"), "--output-dir",
                   str(run_dir), "--no-progress"]
        if (run_dir / "state").exists():
            command.append("--resume")
        with open(run_dir / "stderr.log", "w", encoding="utf-8") as log:
            if subprocess.run(command, stdout=subprocess.DEVNULL, stderr=log, check=False).returncode != 0:
                raise SystemExit(f"run failed: see {run_dir / 'stderr.log'}")
    return json.loads((run_dir / "report.json").read_text())


def auto_run_that_picked(cell: Path, seed: int, source: str) -> Path | None:
    """auto's finished run at this target, size and seed if it picked ``source``: the run that names ``source``
    trains exactly as it does (tests/test_grow.py), so a sweep reuses it instead of training it again."""
    report = cell / "auto" / str(seed) / "report.json"
    if not report.exists():
        return None
    chosen = next(iter(json.loads(report.read_text())["meta"].get("transfer", {}).values()), {}).get("source")
    return report.parent if chosen == source else None


def best_validation(report: dict) -> tuple[float, int]:
    """The best validation score along the run (its plateau) and the step it was reached at."""
    (task,) = report["tasks"].values()
    history = [(value, step) for step, split, value in task["history"]["metric"] if split == "validation"]
    value, step = max(history)
    return 100.0 * value, step


def summarise(values: list[float]) -> str:
    """Mean ± standard deviation over seeds (one seed: its score)."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the trained run to grow (configs/demo.yaml's run)")
    parser.add_argument("--targets", default="wnut17,bc5cdr,trec_coarse")
    parser.add_argument("--sizes", default="100")
    parser.add_argument("--seeds", default="13")
    parser.add_argument("--methods", default="scratch,auto,lora,full_ft")
    parser.add_argument("--sweep", action="store_true", help="also start from each single base prefix")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--limit-eval", type=int, default=1000)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--output", default="runs/grow-transfer")
    parser.add_argument("--set", action="append", default=[], metavar="[METHOD:]KEY=VALUE",
                        help="an experiment override for every run, or (prefix:, lora:, full_ft:) one method's runs")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    output = Path(args.output)
    base_meta = json.loads((Path(args.base) / "checkpoint" / "meta.json").read_text())
    sources = [name for name in base_meta["prefix_layout"]["prefixes"]]
    methods = {m: METHODS[m] for m in args.methods.split(",")}
    if args.sweep:
        methods.update({f"from {s}": ("prefix", s) for s in sources})
    rows = []
    for target in args.targets.split(","):
        for size in map(int, args.sizes.split(",")):
            for label, (method, transfer) in methods.items():
                for seed in map(int, args.seeds.split(",")):
                    run_dir = output / target / str(size) / label.replace(" ", "_") / str(seed)
                    picked = auto_run_that_picked(output / target / str(size), seed, transfer) \
                        if label.startswith("from ") else None
                    report = json.loads((picked / "report.json").read_text()) if picked else \
                        train(experiment(args, target, size, seed, method, transfer), run_dir)
                    if picked:  # its preparation was auto's trials, which a named source does not run
                        report["meta"]["preparation_time_s"] = None
                    score, step = best_validation(report)
                    transfer_meta = report["meta"].get("transfer", {})
                    choice = next(iter(transfer_meta.values()), {})
                    chosen = choice.get("source")
                    rows.append({"target": target, "size": size, "method": label, "seed": seed, "best": score,
                                 "best_step": step, "wall_time_s": report["meta"]["wall_time_s"],
                                 "preparation_time_s": report["meta"].get("preparation_time_s"),
                                 "train_time_s": report["meta"]["train_time_s"], "source": chosen,
                                 "within_noise": choice.get("trial", {}).get("within_noise"),
                                 "trials_best": choice.get("trial", {}).get("trials_best", chosen)})
                    print(f"{target} {size} {label} seed {seed}: best validation {score:.2f} at step {step}"
                          f"{f' (auto chose {chosen})' if label == 'auto' else ''}; "
                          f"{report['meta']['wall_time_s']:.0f} s training and evaluation, "
                          f"{report['meta'].get('preparation_time_s') or 0:.0f} s preparation", flush=True)
    (output / "grow_transfer.json").write_text(json.dumps(rows, indent=2))
    text = tables(rows, list(methods))
    (output / "grow_transfer.md").write_text(text)
    print(text)


def tables(rows: list[dict], methods: list[str]) -> str:
    """Best validation score per cell (mean ± spread over seeds), each method's gain over the fresh prefix (paired by
    seed), seconds per run (preparation, which holds auto's trials, plus training and evaluation), auto's choices."""
    cells = sorted({(r["target"], r["size"]) for r in rows}, key=lambda cell: (cell[0], cell[1]))

    def runs(target, size, label):
        return {r["seed"]: r for r in rows if (r["target"], r["size"], r["method"]) == (target, size, label)}

    score_lines = ["| target | examples | " + " | ".join(methods) + " |", "|---|---:|" + "---:|" * len(methods)]
    gain_lines = ["| target | examples | " + " | ".join(f"{m} − scratch" for m in methods if m != "scratch") + " |",
                  "|---|---:|" + "---:|" * (len(methods) - 1)]
    time_lines = ["| target | examples | " + " | ".join(methods) + " |", "|---|---:|" + "---:|" * len(methods)]
    for target, size in cells:
        scratch = runs(target, size, "scratch")
        scores, gains, seconds = [], [], []
        for label in methods:
            found = runs(target, size, label)
            scores.append(summarise([r["best"] for r in found.values()]))
            seconds.append(summarise([(r["preparation_time_s"] or 0) + r["wall_time_s"] for r in found.values()]))
            if label != "scratch":
                gains.append(summarise([r["best"] - scratch[seed]["best"] for seed, r in found.items()
                                        if seed in scratch]))
        score_lines.append(f"| {target} | {size} | " + " | ".join(scores) + " |")
        gain_lines.append(f"| {target} | {size} | " + " | ".join(gains) + " |")
        time_lines.append(f"| {target} | {size} | " + " | ".join(seconds) + " |")
    choices = [f"{r['target']} {r['size']} seed {r['seed']}: {r['source']}" for r in rows if r["method"] == "auto"]
    gain_text = "\n\nGain over the fresh prefix (paired by seed)\n\n" + "\n".join(gain_lines) \
        if "scratch" in methods and len(methods) > 1 else ""
    return ("Best validation score\n\n" + "\n".join(score_lines) + gain_text
            + "\n\nSeconds per run (preparation + training and evaluation)\n\n"
            + "\n".join(time_lines) + "\n\nauto chose: " + "; ".join(choices) + "\n" + sweep_table(rows, methods))


def sweep_table(rows: list[dict], methods: list[str]) -> str:
    """Per target, size and seed: every single start's best score, the sweep's best start, auto's pick, the trials'
    best (auto's pick unless prefix.transfer_prior overrode it) and the candidates the trials could not tell from
    their best (within noise); empty without --sweep."""
    starts = ["scratch"] + [m for m in methods if m.startswith("from ")]
    if len(starts) == 1 or "auto" not in methods:
        return ""
    by_key = {(r["target"], r["size"], r["seed"], r["method"]): r for r in rows}
    lines = ["| target | examples | seed | " + " | ".join(starts) + " | sweep's best | auto's pick | auto − best "
             "| trials' best | within noise of it |",
             "|---|---:|---:|" + "---:|" * len(starts) + "---|---|---:|---|---|"]
    for target, size, seed in sorted({(r["target"], r["size"], r["seed"]) for r in rows}):
        found = {m: by_key[(target, size, seed, m)]["best"] for m in starts if (target, size, seed, m) in by_key}
        auto = by_key.get((target, size, seed, "auto"))
        if not found or auto is None:
            continue
        best = max(found, key=found.get)
        lines.append(f"| {target} | {size} | {seed} | " + " | ".join(
            f"{found[m]:.1f}" if m in found else "–" for m in starts)
            + f" | {best} | {auto['source']} ({auto['best']:.1f}) | {auto['best'] - found[best]:+.1f} | "
            + f"{auto.get('trials_best') or auto['source']} | {', '.join(auto['within_noise'] or []) or 'none'} |")
    return "\n\nEvery single start against auto's pick\n\n" + "\n".join(lines) + "\n"

if __name__ == "__main__":
    main()
