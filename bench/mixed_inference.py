"""Inference throughput of mixed-task batches against the same inputs run task by task.

    python bench/mixed_inference.py [--config configs/demo.yaml] [--per-task 96] [--batch 32] [--rounds 5]

The package lets one batch mix tasks: each example attends to its own task's prefix and goes to its own head,
so one frozen encoder serves many tasks in one forward. This measures what mixing costs. The inputs are the first
``--per-task`` validation features of each task of the experiment (the demo: SST-2 classification, CoNLL-2003
NER, SQuAD QA windows), featurized by the package; the model has one prefix per task, folded as a served
checkpoint is. "mixed" runs batches of ``--batch`` inputs drawn from all tasks with per-example task ids;
"task by task" runs each task's inputs in batches of the same size. Both pad each batch to its longest input.

Two orders are measured, interleaved in one run: "arrival" (requests of the three tasks interleaved, as a server
would receive them; every mixed batch holds all tasks and so pads short inputs to the longest QA window), and
"length-sorted" (inputs sorted by length before batching, as the package's evaluation does; mixed batches then
hold tasks of similar lengths). Target: mixed throughput >= 0.9x task by task, inputs per second.
"""

from __future__ import annotations

from pathlib import Path

import torch

import common
from multitask.config import load_config
from multitask.data.batching import eval_batches
from multitask.data.features import Feature
from multitask.experiment import ExperimentConfig
from multitask.model import ModelInputs
from multitask.runtime import load_tasks, load_tokenizer
from multitask.tasks.base import pad_features

TARGET = 0.9  # mixed throughput / task-by-task throughput


def batches_of(items: list[tuple[int, Feature]], size: int, sort: bool) -> list[list[tuple[int, Feature]]]:
    """Batches of (task id, feature): in the given order, or length-sorted as the package's evaluation does."""
    order = eval_batches([len(f) for _, f in items], size) if sort else [
        list(range(start, min(start + size, len(items)))) for start in range(0, len(items), size)]
    return [[items[i] for i in batch] for batch in order]


def collate(batch: list[tuple[int, Feature]], pad_id: int, device: torch.device) -> ModelInputs:
    ids, mask, types = pad_features([f for _, f in batch], pad_id)
    return ModelInputs(ids, mask, torch.tensor([t for t, _ in batch]), types).to(device)


def main() -> None:
    parser = common.parser_for(__doc__)
    parser.add_argument("--config", default=str(common.REPO / "configs" / "demo.yaml"),
                        help="experiment whose tasks (with their overrides) and prefix settings to use")
    parser.add_argument("--per-task", type=int, default=96, help="validation inputs (features) per task")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5, help="timed passes over all inputs, per variant")
    args = parser.parse_args()
    if args.quick:
        args.per_task, args.batch, args.rounds = 6, 4, 1
    device = common.setup(args)
    experiment = load_config(ExperimentConfig, args.config)
    tokenizer = load_tokenizer(args.encoder)
    loaded = load_tasks(experiment, Path(args.config))
    tasks = [task for _, task, _ in loaded]
    features = [common.task_features(task, source, "validation", args.per_task, tokenizer, training=False,
                                     root=experiment.data_root)[: args.per_task] for _, task, source in loaded]
    model = common.build_model(args.encoder, common.task_heads(tasks), experiment.prefix.prefix).to(device).eval()
    model.prefix_bank.fold()
    pad_id = tokenizer.pad_token_id or 0

    # Arrival order interleaves the tasks request by request.
    arrival = [(t, task_features[i]) for i in range(args.per_task) for t, task_features in enumerate(features)
               if i < len(task_features)]
    plans: dict[str, list[ModelInputs]] = {}
    for order, sort in (("arrival", False), ("length-sorted", True)):
        mixed = batches_of(arrival, args.batch, sort)
        single = [b for t, f in enumerate(features) for b in batches_of([(t, x) for x in f], args.batch, sort)]
        plans[f"{order}: mixed"] = [collate(b, pad_id, device) for b in mixed]
        plans[f"{order}: task by task"] = [collate(b, pad_id, device) for b in single]

    def variant(batches: list[ModelInputs]):
        def run(_round: int) -> list[float]:
            with torch.inference_mode():
                return [common.timed(lambda: [model(inputs) for inputs in batches], device)]
        return run

    times = common.run_rounds({name: variant(batches) for name, batches in plans.items()}, rounds=args.rounds)
    count = len(arrival)
    throughput = {name: count / common.median(values) for name, values in times.items()}

    common.print_header("inference: mixed-task batches vs task by task", args, device,
                        tasks="+".join(t.config.name for t in tasks), inputs=count, batch=args.batch,
                        rounds=args.rounds)
    real = sum(len(f) for _, f in arrival)
    common.print_table(
        ["variant", "inputs/s", "forwards", "tokens computed", "padding"],
        [[name, f"{throughput[name]:.1f}", len(batches), sum(b.input_ids.numel() for b in batches),
          f"{100 * (1 - real / sum(b.input_ids.numel() for b in batches)):.0f}%"] for name, batches in plans.items()],
    )
    for order in ("arrival", "length-sorted"):
        common.report_ratio(f"{order}: mixed / task-by-task throughput",
                            throughput[f"{order}: mixed"] / throughput[f"{order}: task by task"], TARGET, at_most=False)
    common.print_footer()


if __name__ == "__main__":
    main()
