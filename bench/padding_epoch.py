"""One SST-2 training epoch of the prefix model: dynamic padding with length-grouped batches against padding
every batch to 128 tokens.

    python bench/padding_epoch.py [--task tasks/sst2.yaml] [--batch 32] [--pad-to 128] [--limit N]

SST-2 sentences average about a dozen tokens, so a fixed 128-token batch is mostly padding, and the encoder pays
for every padded position. Both variants train the same model on the same examples (real data, read and
featurized by the package: the task YAML, its reader, its tokenization) with the package's batch streams: one
pass of TaskBatchStream with ``length_grouped=True`` padded to each batch's longest feature, against one pass in
plain shuffled order padded to ``--pad-to``. Steps alternate between the two, so the epoch times are sums of
interleaved steps. Target: the dynamic epoch at least 3x faster. ``--limit`` measures on the first N training
examples only; nothing is extrapolated.
"""

from __future__ import annotations

import math

import torch

import common
from multitask.data.batching import TaskBatchStream
from multitask.model import ModelInputs
from multitask.prefix.config import PrefixConfig
from multitask.runtime import load_tokenizer
from multitask.tasks.loading import load_task

TARGET = 3.0  # padded epoch time / dynamic epoch time


def widen(inputs: ModelInputs, length: int, pad_id: int) -> ModelInputs:
    """The batch padded on the right to ``length`` tokens (pad ids, attention mask 0)."""
    def pad(t: torch.Tensor | None, value: int = 0) -> torch.Tensor | None:
        return None if t is None else torch.nn.functional.pad(t, (0, length - t.shape[1]), value=value)

    return ModelInputs(pad(inputs.input_ids, pad_id), pad(inputs.attention_mask), inputs.task_ids,
                       pad(inputs.token_type_ids))


def main() -> None:
    parser = common.parser_for(__doc__)
    parser.add_argument("--task", default=str(common.REPO / "tasks" / "sst2.yaml"), help="task YAML (classification)")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N training examples")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--pad-to", type=int, default=128, help="fixed length of the padded variant")
    parser.add_argument("--prefix-length", type=int, default=16)
    args = parser.parse_args()
    if args.quick:
        args.limit, args.batch = 64, 8
    device = common.setup(args)
    task, tokenizer = load_task(args.task), load_tokenizer(args.encoder)
    features = common.task_features(task, args.task, "train", args.limit, tokenizer, training=True)
    lengths = [len(f) for f in features]
    if max(lengths) > args.pad_to:
        parser.error(f"--pad-to {args.pad_to} is shorter than the longest feature ({max(lengths)} tokens)")
    num_batches = math.ceil(len(features) / args.batch)
    pad_id = tokenizer.pad_token_id or 0

    def epoch(length_grouped: bool, pad_to: int | None) -> list[tuple[ModelInputs, torch.Tensor]]:
        """One pass of the package's batch stream, collated by the task and padded to ``pad_to`` if given."""
        stream = TaskBatchStream(task.config.name, len(features), args.batch, args.seed,
                                 length_grouped=length_grouped, lengths=lengths)
        batches = []
        for _ in range(num_batches):
            batch = task.collate([features[i] for i in stream.next_batch()], pad_id)
            inputs = ModelInputs.of_task(batch, 0).to(device)
            batches.append((widen(inputs, pad_to, pad_id) if pad_to else inputs, batch.targets.to(device)))
        return batches

    epochs = {"dynamic + length-grouped": epoch(True, None), f"padded to {args.pad_to}": epoch(False, args.pad_to)}
    model = common.build_model(args.encoder, common.task_heads([task]), PrefixConfig(length=args.prefix_length))
    model.to(device)
    optimizer = common.optimizer_for(model)

    def variant(batches):
        """Round i trains on batch i; the timings are of forward + backward + optimiser step only."""
        step = lambda inputs, targets: common.train_step(model, optimizer, inputs, targets, task.loss)  # noqa: E731
        return lambda index: [common.timed(lambda: step(*batches[index]), device)]

    # Same model for both: a step's cost does not depend on the weights' values.
    times = common.run_rounds({name: variant(batches) for name, batches in epochs.items()}, rounds=num_batches)
    totals = {name: sum(values) for name, values in times.items()}

    real_tokens = sum(lengths)
    common.print_header(f"one {task.config.name} training epoch: dynamic padding vs fixed padding (prefix model)",
                        args, device, examples=len(features), batches=f"{num_batches}x{args.batch}",
                        prefix=args.prefix_length)
    rows = []
    for name, batches in epochs.items():
        computed = sum(inputs.input_ids.numel() for inputs, _ in batches)
        rows.append([name, f"{totals[name]:.2f}", f"{common.median(times[name]) * 1000:.0f}", computed,
                     f"{100 * (1 - real_tokens / computed):.0f}%"])
    common.print_table(["batching", "epoch (s)", "median step (ms)", "tokens computed", "padding"], rows)
    scope = "all" if args.limit is None else "the first"
    print(f"measured on {scope} {len(features)} training examples" + ("" if args.limit is None else " (--limit)"))
    dynamic, padded = totals.values()
    common.report_ratio("padded epoch / dynamic epoch (speed-up)", padded / dynamic, TARGET, at_most=False)
    common.print_footer()


if __name__ == "__main__":
    main()
