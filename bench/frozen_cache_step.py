"""A training step with prefixes only in the top k layers and a warm frozen-layer cache, against full fine-tuning
and the all-layer prefix, side by side; then peak training memory at one k against full fine-tuning.

    python bench/frozen_cache_step.py [--batch 32] [--length 128] [--ks 1,2,3] [--steps 6] [--memory-k 2]

"top-k, warm cache": the hidden states entering layer L-k come from the cache (per input, padded per batch, as the
trainer does), so a step runs only the top k layers forward and backward. "top-k, no cache" runs the whole
encoder forward; autograd stops below layer L-k by itself. Steps alternate between variants so that machine noise
hits all alike. Memory: each variant trains in a fresh process (this script with --worker); the figure is the peak
resident set above the resident set once the model is loaded (what training adds; the loaded encoder and the
Python runtime are the same for all), and the whole peak beside it. Targets (issue 10): k=1 warm <= 0.2x and k=2
warm <= 0.3x a full fine-tuning step; training memory at k=2 <= 0.3x full fine-tuning's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch

import common
from multitask.encoder_stages import pad_states
from multitask.model import ModelInputs
from multitask.prefix.config import PrefixConfig
from multitask.utils.memory import rss_bytes

STEP_TARGETS = {1: 0.2, 2: 0.3}  # warm top-k step / full fine-tuning step
MEMORY_TARGET = 0.3  # training memory at --memory-k / full fine-tuning's
MIB = 2**20


def build(variant: str, args, k: int | None = None):
    if variant == common.FULL:
        return common.build_model(args.encoder, common.CLASSIFIER, None)
    layers = "all" if k is None else {"top": k}
    return common.build_model(args.encoder, common.CLASSIFIER, PrefixConfig(length=args.prefix_length, layers=layers))


def cached_inputs(model, inputs: ModelInputs) -> tuple[list[torch.Tensor], int]:
    """Per-input states entering the lowest prefixed layer, as the cache holds them (float32 here)."""
    boundary = model.frozen_below()
    model.eval()
    with torch.no_grad():
        states = model.encode_lower(inputs, boundary)
    model.train()
    return [row for row in states], boundary


def warm_variant(model, inputs: ModelInputs, labels: torch.Tensor, device: torch.device):
    states, boundary = cached_inputs(model, inputs)
    optimizer = common.optimizer_for(model)

    def step() -> None:  # the trainer's work on a cache hit: pad the stored states, run the top layers
        batch = ModelInputs(inputs.input_ids, inputs.attention_mask, inputs.task_ids,
                            states=pad_states(states, inputs.input_ids.shape[1]).float(), boundary=boundary)
        common.train_step(model, optimizer, batch, labels)

    return lambda _round: [common.timed(step, device)]


def worker(args, variant: str) -> None:
    device = common.setup(args)
    k = None if variant == common.FULL else int(variant.split("=")[1])
    model = build(variant, args, k).to(device)
    inputs, labels = common.random_batch(model, args, device)
    if k is not None:
        states, boundary = cached_inputs(model, inputs)
        inputs = ModelInputs(inputs.input_ids, inputs.attention_mask, inputs.task_ids,
                             states=pad_states(states, inputs.input_ids.shape[1]).float(), boundary=boundary)
    optimizer = common.optimizer_for(model)
    loaded = rss_bytes("VmRSS")
    for _ in range(args.steps):
        common.train_step(model, optimizer, inputs, labels)
    print(json.dumps({"peak": rss_bytes("VmHWM"), "loaded": loaded}))


def memory(variant: str) -> dict:
    command = [sys.executable, __file__, *sys.argv[1:], "--worker", variant]
    return json.loads(subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True).stdout.splitlines()[-1])


def main() -> None:
    parser = common.parser_for(__doc__)
    common.add_shape_args(parser)
    parser.add_argument("--ks", default="1,2,3", help="prefixed top layers to time")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--memory-k", type=int, default=2)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.batch, args.length, args.steps = 4, 32, 2
    if args.worker:
        worker(args, args.worker)
        return
    device = common.setup(args)
    ks = [int(k) for k in args.ks.split(",")]
    full = build(common.FULL, args)
    inputs, labels = common.random_batch(full, args, device)
    variants = {common.FULL: common.step_variant(full, inputs, labels, device),
                "prefix, all layers": common.step_variant(build(common.PREFIX, args), inputs, labels, device)}
    for k in ks:
        variants[f"top-{k} prefix, no cache"] = common.step_variant(build(common.PREFIX, args, k), inputs, labels,
                                                                    device)
        variants[f"top-{k} prefix, warm cache"] = warm_variant(build(common.PREFIX, args, k).to(device), inputs,
                                                               labels, device)
    times = {name: common.median(values) for name, values in common.run_rounds(variants, args.steps).items()}
    base = times[common.FULL]
    common.print_header("training step: top-k prefixes with a frozen-layer cache", args, device,
                        batch=f"{args.batch}x{args.length}", prefix=args.prefix_length, steps=args.steps)
    common.print_table(["variant", "median step (ms)", "/ full fine-tuning"],
                       [[name, f"{t * 1000:.0f}", f"{t / base:.3f}"] for name, t in times.items()])
    for k, target in STEP_TARGETS.items():
        if k in ks:
            common.report_ratio(f"top-{k} warm step / full fine-tuning step", times[f"top-{k} prefix, warm cache"] / base,
                                target)
    measured = {name: memory(name) for name in (common.FULL, f"top={args.memory_k}")}
    rows = [[name, f"{(m['peak'] - m['loaded']) / MIB:.0f}", f"{m['peak'] / MIB:.0f}"] for name, m in measured.items()]
    print()
    common.print_table(["variant (own process)", "training memory (MiB above loaded)", "peak RSS (MiB)"], rows)
    full_m, top_m = measured[common.FULL], measured[f"top={args.memory_k}"]
    common.report_ratio(f"training memory, top-{args.memory_k} warm / full fine-tuning",
                        (top_m["peak"] - top_m["loaded"]) / max(full_m["peak"] - full_m["loaded"], 1), MEMORY_TARGET)
    print(f"peak RSS, top-{args.memory_k} warm / full fine-tuning: {top_m['peak'] / full_m['peak']:.3f} "
          f"(includes the loaded encoder and the Python runtime)")
    common.print_footer()


if __name__ == "__main__":
    main()
