"""Peak training memory of the prefix model against full fine-tuning of the same encoder.

    python bench/memory.py [--batch 32] [--length 128] [--prefix-length 16] [--steps 3] [--repeats 2]

Each variant trains for a few steps in a fresh process of its own (this script re-run with --worker), so one
variant's allocations cannot raise the other's peak; the variants alternate over ``--repeats`` and medians are
kept. On CPU the figure is the process's peak resident set (VmHWM from /proc/self/status; ru_maxrss elsewhere);
on CUDA it is torch.cuda.max_memory_allocated. Both include the encoder's weights, as a user's machine must
hold them. Target: prefix peak <= 0.85x full fine-tuning.

(Why VmHWM rather than ru_maxrss: see multitask/utils/memory.py.)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch

import common
from multitask.prefix.config import PrefixConfig
from multitask.utils.memory import rss_bytes

TARGET = 0.85  # prefix peak / full fine-tuning peak
VARIANTS = (common.PREFIX, common.FULL)
MIB = 2**20


def worker(args, variant: str) -> None:
    """Train ``variant`` for a few steps and print its memory figures as one JSON line."""
    device = common.setup(args)
    prefix = PrefixConfig(length=args.prefix_length) if variant == common.PREFIX else None
    model = common.build_model(args.encoder, common.CLASSIFIER, prefix).to(device)
    inputs, labels = common.random_batch(model, args, device)
    optimizer = common.optimizer_for(model)
    loaded = rss_bytes("VmRSS")
    for _ in range(args.steps):
        common.train_step(model, optimizer, inputs, labels)
    cuda = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    print(json.dumps({"peak_rss": rss_bytes("VmHWM"), "loaded_rss": loaded, "cuda_peak": cuda,
                      "trainable": common.trainable_count(model), "device": str(device)}))


def measure(variant: str) -> dict:
    command = [sys.executable, __file__, *sys.argv[1:], "--worker", variant]
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = common.parser_for(__doc__)
    common.add_shape_args(parser)
    parser.add_argument("--steps", type=int, default=3, help="training steps per process (the peak is reached by 2)")
    parser.add_argument("--repeats", type=int, default=2, help="processes per variant, alternating")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)  # internal: be one measured process
    args = parser.parse_args()
    if args.quick:
        args.batch, args.length, args.steps, args.repeats = 4, 32, 2, 1
    if args.worker:
        return worker(args, args.worker)

    common.setup(args)  # threads as the workers will have them, for the header
    runs: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    for repeat in range(args.repeats):
        for name in VARIANTS if repeat % 2 == 0 else reversed(VARIANTS):
            runs[name].append(measure(name))
    med = lambda name, key: common.median([r[key] for r in runs[name]])  # noqa: E731
    on_cuda = runs[common.PREFIX][0]["cuda_peak"] is not None
    device = torch.device(runs[common.PREFIX][0]["device"])
    common.print_header("peak training memory: prefix model vs full fine-tuning (one fresh process per run)", args,
                        device, batch=f"{args.batch}x{args.length}", prefix=args.prefix_length, steps=args.steps,
                        repeats=args.repeats)
    headers = ["method", "peak RSS (MiB)", "RSS after load (MiB)", "training increase (MiB)", "trainable params"]
    rows = [[name, f"{med(name, 'peak_rss') / MIB:.0f}", f"{med(name, 'loaded_rss') / MIB:.0f}",
             f"{(med(name, 'peak_rss') - med(name, 'loaded_rss')) / MIB:.0f}", runs[name][0]["trainable"]]
            for name in VARIANTS]
    if on_cuda:
        headers.append("peak CUDA allocated (MiB)")
        for row, name in zip(rows, VARIANTS):
            row.append(f"{med(name, 'cuda_peak') / MIB:.0f}")
    common.print_table(headers, rows)
    key, what = ("cuda_peak", "peak CUDA allocated") if on_cuda else ("peak_rss", "peak RSS")
    common.report_ratio(f"prefix / full fine-tuning, {what}", med(common.PREFIX, key) / med(common.FULL, key), TARGET)
    common.print_footer()


if __name__ == "__main__":
    main()
