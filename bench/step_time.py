"""Time one training step of the prefix model against full fine-tuning of the same encoder, side by side.

    python bench/step_time.py [--encoder offline:minilm] [--batch 32] [--length 128] [--steps 6]

Both models see the same random batch; steps alternate between the two so that machine noise hits both alike.
The printed ratio (prefix step / full fine-tuning step) is the figure to quote, not the absolute times.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from multitask.backbone import encoder_shape, load_encoder
from multitask.heads import HEADS, HeadConfig
from multitask.model import ModelInputs, MultiTaskModel
from multitask.prefix.bank import TaskPrefixRequest, plan_layout
from multitask.prefix.config import PrefixBankConfig, PrefixConfig


def build(encoder_name: str, prefix_length: int | None) -> MultiTaskModel:
    encoder = load_encoder(encoder_name)
    hidden = encoder_shape(encoder.config).hidden_size
    heads = {"task": HEADS.get("sequence")(HeadConfig(), hidden, 2)}
    if prefix_length is None:  # full fine-tuning: no prefix, every encoder weight trains
        return MultiTaskModel(encoder, heads, layout=None, freeze_encoder=False).train()
    layout = plan_layout(PrefixBankConfig(mode="per_task", prefix=PrefixConfig(length=prefix_length)),
                         [TaskPrefixRequest("task")])
    return MultiTaskModel(encoder, heads, layout).train()


def step(model: MultiTaskModel, optimizer: torch.optim.Optimizer, inputs: ModelInputs, labels: torch.Tensor) -> float:
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    logits, _ = model(inputs)["task"]
    torch.nn.functional.cross_entropy(logits, labels).backward()
    optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", default="offline:minilm")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--prefix-length", type=int, default=16)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    torch.manual_seed(0)
    models = {"prefix (P-Tuning v2)": build(args.encoder, args.prefix_length), "full fine-tuning": build(args.encoder, None)}
    optimizers = {name: torch.optim.AdamW(m.trainable_parameters(), lr=1e-4) for name, m in models.items()}
    vocab = models["full fine-tuning"].encoder.config.vocab_size
    inputs = ModelInputs(
        torch.randint(1000, vocab, (args.batch, args.length)),
        torch.ones(args.batch, args.length, dtype=torch.long),
        torch.zeros(args.batch, dtype=torch.long),
    )
    labels = torch.randint(0, 2, (args.batch,))
    times: dict[str, list[float]] = {name: [] for name in models}
    for index in range(args.steps + 1):  # the first step of each is warm-up and not counted
        for name, model in models.items():
            elapsed = step(model, optimizers[name], inputs, labels)
            if index:
                times[name].append(elapsed)
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"encoder={args.encoder} batch={args.batch}x{args.length} threads={torch.get_num_threads()} steps={args.steps}")
    print(f"{'method':<24}{'median step (ms)':>18}{'trainable params':>20}")
    for name, model in models.items():
        trainable = sum(p.numel() for p in model.trainable_parameters())
        print(f"{name:<24}{medians[name] * 1000:>18.0f}{trainable:>20,}")
    ratio = medians["prefix (P-Tuning v2)"] / medians["full fine-tuning"]
    print(f"ratio prefix step / full fine-tuning step: {ratio:.3f}")


if __name__ == "__main__":
    main()
