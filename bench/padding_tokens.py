"""Tokens the encoder computes per training epoch (padding included) under each batching: random batches,
length-grouped batches, and length-grouped batches shuffled within runs (``group_spread``). Pure counting on the
real features of a task, no model: what length grouping saves, independent of the machine.

    python bench/padding_tokens.py [--config bench/configs/conll_peft_settings.yaml] [--spread 8]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from multitask.config import load_config
from multitask.data.batching import TaskBatchStream
from multitask.experiment import ExperimentConfig
from multitask.runtime import load_tokenizer, prepare_tasks

REPO = Path(__file__).resolve().parents[1]


def epoch_tokens(lengths: list[int], batch_size: int, seed: int, grouped: bool, spread: int) -> tuple[int, int]:
    """(tokens computed with each batch padded to its longest input, real tokens) over one pass."""
    stream = TaskBatchStream("task", len(lengths), batch_size, seed, length_grouped=grouped, lengths=lengths,
                             group_spread=spread)
    computed = real = 0
    for _ in range(-(-len(lengths) // batch_size)):
        batch = stream.next_batch()
        computed += max(lengths[i] for i in batch) * len(batch)
        real += sum(lengths[i] for i in batch)
    return computed, real


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "bench" / "configs" / "conll_peft_settings.yaml"))
    parser.add_argument("--spread", type=int, default=8)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    experiment = load_config(ExperimentConfig, Path(args.config), [])
    tokenizer = load_tokenizer(experiment.encoder.name)
    for runtime in prepare_tasks(experiment, Path(args.config), tokenizer, splits=("train",)):
        lengths = [len(feature) for feature in runtime.features["train"]]
        print(f"{runtime.name}: {len(lengths):,} training features, batch {runtime.batch_size}")
        for label, grouped, spread in (("random", False, 1), ("length-grouped", True, 1),
                                       (f"length-grouped, group_spread {args.spread}", True, args.spread)):
            computed, real = epoch_tokens(lengths, runtime.batch_size, experiment.seed, grouped, spread)
            print(f"  {label:<36} tokens computed {computed:>10,}  padding {1 - real / computed:6.1%}")


if __name__ == "__main__":
    main()
