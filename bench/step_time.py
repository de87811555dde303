"""Time one training step of the prefix model against full fine-tuning of the same encoder, side by side.

    python bench/step_time.py [--encoder offline:minilm] [--batch 32] [--length 128] [--steps 6]

Both models see the same random batch; steps alternate between the two so that machine noise hits both alike.
The printed ratio (prefix step / full fine-tuning step) is the figure to quote, not the absolute times.
bench/peft_step_time.py adds PEFT prefix tuning as a third variant.
"""

from __future__ import annotations

import common
from multitask.prefix.config import PrefixConfig

TARGET = 0.75  # prefix step / full fine-tuning step (bench/README.md)


def main() -> None:
    parser = common.parser_for(__doc__)
    common.add_shape_args(parser)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    if args.quick:
        args.batch, args.length, args.steps = 4, 32, 2
    device = common.setup(args)
    prefix = PrefixConfig(length=args.prefix_length)
    models = {common.PREFIX: common.build_model(args.encoder, common.CLASSIFIER, prefix),
              common.FULL: common.build_model(args.encoder, common.CLASSIFIER, None)}
    inputs, labels = common.random_batch(models[common.FULL], args, device)
    variants = {name: common.step_variant(model, inputs, labels, device) for name, model in models.items()}
    times = common.run_rounds(variants, rounds=args.steps)

    medians = {name: common.median(values) for name, values in times.items()}
    common.print_header("training step: prefix model vs full fine-tuning", args, device,
                        batch=f"{args.batch}x{args.length}", prefix=args.prefix_length, steps=args.steps)
    common.print_table(["method", "median step (ms)", "trainable params"],
                       [[name, f"{medians[name] * 1000:.0f}", common.trainable_count(m)] for name, m in models.items()])
    common.report_ratio("prefix step / full fine-tuning step", medians[common.PREFIX] / medians[common.FULL], TARGET)
    common.print_footer()


if __name__ == "__main__":
    main()
