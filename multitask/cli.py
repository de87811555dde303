"""Command line: multitask train | evaluate | predict | validate | types."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from multitask.errors import MultitaskError

log = logging.getLogger("multitask")


def _setup_logging(run_dir: Path | None = None) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(run_dir / "train.log", encoding="utf-8"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        handlers=handlers, force=True)
    for noisy in ("transformers", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _load_experiment(path: str, overrides: list[str]):
    from multitask.config import load_config
    from multitask.experiment import ExperimentConfig

    return load_config(ExperimentConfig, path, overrides)


def cmd_train(args: argparse.Namespace) -> None:
    from multitask.reporting.markdown import render_markdown
    from multitask.training.trainer import Trainer

    experiment = _load_experiment(args.config, args.set)
    run_dir = Path(args.output_dir or experiment.output_dir or Path("runs") / experiment.name)
    _setup_logging(run_dir)
    trainer = Trainer(experiment, run_dir, config_path=Path(args.config), resume=args.resume,
                      progress=not args.no_progress)
    report = trainer.train()
    print(render_markdown(report))
    print(f"run written to {run_dir} (report.json, report.md, report.html, checkpoint/, predictions/)")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from multitask.reporting.markdown import render_markdown
    from multitask.run import evaluate_run, load_run

    if args.file and not args.task:
        raise MultitaskError("--file needs --task: the file is read in that task's format")
    output_dir = Path(args.output_dir or Path(args.run_dir) / "evaluation")
    _setup_logging()
    run = load_run(args.run_dir)
    report = evaluate_run(run, output_dir, args.task, Path(args.file) if args.file else None, args.split_name)
    print(render_markdown(report))
    print(f"evaluation written to {output_dir}")


def cmd_predict(args: argparse.Namespace) -> None:
    from multitask.run import load_run, predict_file

    _setup_logging()
    run = load_run(args.run_dir)
    count = predict_file(run, args.task, Path(args.input), Path(args.output))
    print(f"{count} predictions written to {args.output}")


def cmd_validate(args: argparse.Namespace) -> None:
    from multitask.validation import validate_paths

    _setup_logging()
    print(validate_paths([Path(p) for p in args.paths], args.set))


def cmd_types(args: argparse.Namespace) -> None:
    from multitask.tasks import TASK_TYPES

    for name in TASK_TYPES.available():
        task_cls = TASK_TYPES.get(name)
        print(f"{name}: fields {', '.join(task_cls.required_fields)} (optional: "
              f"{', '.join(task_cls.optional_fields) or '-'}); metrics {', '.join(task_cls.metric_names)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="multitask", description="Multi-task NLU with P-Tuning v2 prefixes.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a joint model from an experiment YAML")
    train.add_argument("config")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    train.add_argument("--output-dir")
    train.add_argument("--resume", action="store_true", help="continue an interrupted run exactly")
    train.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    train.set_defaults(func=cmd_train)

    evaluate = sub.add_parser("evaluate", help="evaluate a trained run")
    evaluate.add_argument("run_dir")
    evaluate.add_argument("--task")
    evaluate.add_argument("--file", help="a file in the task's format (needs --task)")
    evaluate.add_argument("--split-name", default="custom")
    evaluate.add_argument("--output-dir")
    evaluate.set_defaults(func=cmd_evaluate)

    predict = sub.add_parser("predict", help="predict on raw inputs (JSONL in, JSONL out)")
    predict.add_argument("run_dir")
    predict.add_argument("--task", required=True)
    predict.add_argument("--input", required=True)
    predict.add_argument("--output", required=True)
    predict.set_defaults(func=cmd_predict)

    validate = sub.add_parser("validate", help="check task or experiment YAML files and their data")
    validate.add_argument("paths", nargs="+")
    validate.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    validate.set_defaults(func=cmd_validate)

    types = sub.add_parser("types", help="list the registered task types")
    types.set_defaults(func=cmd_types)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except MultitaskError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: resume with --resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
