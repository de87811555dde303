"""Time one prefix training step in fp32 against bf16 autocast (what ``precision: auto`` picks on a CPU with
native bf16), side by side, with full fine-tuning in fp32 for scale.

    python bench/precision_step.py [--encoder offline:minilm] [--batch 32] [--length 128] [--steps 6]

All variants see the same random batch and alternate round by round. Quote the ratio, not the absolute times.
``precision`` on the header line says whether this device computes bf16 natively (``auto`` would pick it).
"""

from __future__ import annotations

import common
from multitask.device import autocast
from multitask.precision import resolve_precision
from multitask.prefix.config import PrefixConfig

TARGET = 0.8  # bf16 prefix step / fp32 prefix step (bench/README.md)
BF16 = "prefix, bf16 autocast"


def main() -> None:
    parser = common.parser_for(__doc__)
    common.add_shape_args(parser)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    if args.quick:
        args.batch, args.length, args.steps = 4, 32, 2
    device = common.setup(args)
    prefix = PrefixConfig(length=args.prefix_length, reparameterize=False, dropout=0.0)
    models = {common.PREFIX: common.build_model(args.encoder, common.CLASSIFIER, prefix),
              BF16: common.build_model(args.encoder, common.CLASSIFIER, prefix),
              common.FULL: common.build_model(args.encoder, common.CLASSIFIER, None)}
    inputs, labels = common.random_batch(models[common.FULL], args, device)
    variants = {name: common.step_variant(model, inputs, labels, device) for name, model in models.items()}
    fp32_bf16 = variants[BF16]
    variants[BF16] = lambda round_: _in_bf16(fp32_bf16, round_, device)
    times = common.run_rounds(variants, rounds=args.steps)

    medians = {name: common.median(values) for name, values in times.items()}
    native = resolve_precision("auto", device)
    common.print_header("training step: fp32 vs bf16 autocast (prefix model)", args, device,
                        batch=f"{args.batch}x{args.length}", prefix=args.prefix_length, steps=args.steps,
                        auto=f"{native[0]} ({native[1]})")
    common.print_table(["variant", "median step (ms)", "vs fp32 prefix"],
                       [[name, f"{medians[name] * 1000:.0f}", f"{medians[name] / medians[common.PREFIX]:.3f}"]
                        for name in models])
    common.report_ratio("bf16 prefix step / fp32 prefix step", medians[BF16] / medians[common.PREFIX], TARGET)
    common.print_footer()


def _in_bf16(variant, round_: int, device) -> list[float]:
    with autocast(device, "bf16"):
        return variant(round_)


if __name__ == "__main__":
    main()
