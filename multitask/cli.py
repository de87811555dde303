"""Command line: multitask train | evaluate | predict | serve | validate | compare | tasks | remove | types."""

from __future__ import annotations

import argparse
import logging
import subprocess
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
    """Train in this process, or, with --nproc N > 1, under torchrun on N local processes. Under torchrun every
    rank runs this; rank 0 alone writes the run directory (train.log included) and prints the report."""
    from multitask import parallel

    if args.nproc != 1:
        _launch_torchrun(args)
        return
    from multitask.reporting.markdown import render_markdown
    from multitask.training.trainer import Trainer
    from multitask.utils.atomic import ensure_writable

    experiment = _load_experiment(args.config, args.set)
    run_dir = Path(args.output_dir or experiment.output_dir or Path("runs") / experiment.name)
    if parallel.is_main():
        ensure_writable(run_dir)  # before the log file opens there
    _setup_logging(run_dir if parallel.is_main() else None)
    if not parallel.is_main():
        logging.getLogger().setLevel(logging.WARNING)  # one copy of the progress lines, from rank 0
    try:
        report = Trainer(experiment, run_dir, config_path=Path(args.config), resume=args.resume,
                         progress=not args.no_progress).train()
    finally:
        parallel.shutdown()
    if report is not None:
        print(render_markdown(report))
        print(f"run written to {run_dir} (report.json, report.md, report.html, checkpoint/, predictions/)")


def _launch_torchrun(args: argparse.Namespace) -> None:
    """Start this same `train` command (minus --nproc) under torchrun on this machine; several machines run
    torchrun themselves (docs/training.md, "Several processes")."""
    from multitask.parallel import launched_by_torchrun

    if args.nproc < 1:
        raise MultitaskError(f"--nproc must be at least 1, got {args.nproc}")
    if launched_by_torchrun():
        raise MultitaskError("--nproc starts torchrun itself; leave it out when running under torchrun")
    _check_gpus_for(args.nproc, _load_experiment(args.config, args.set).device)
    forwarded = [args.config, *(f"--set={item}" for item in args.set)]
    forwarded += ["--output-dir", args.output_dir] if args.output_dir else []
    forwarded += ["--resume"] if args.resume else []
    forwarded += ["--no-progress"] if args.no_progress else []
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               "-m", "multitask", "train", *forwarded]
    status = subprocess.run(command, check=False).returncode
    if status != 0:
        raise MultitaskError(f"torchrun exited with status {status} (the ranks' errors are above)")


def _check_gpus_for(processes: int, device_name: str) -> None:
    """On GPUs each process drives one of this machine's: more processes than GPUs would fail in every rank."""
    from multitask.device import resolve_device

    device = resolve_device(device_name)
    if device.type != "cuda":
        return
    import torch

    visible = torch.cuda.device_count()
    if processes > visible:
        raise MultitaskError(f"--nproc {processes} on device {device_name!r}: this machine shows {visible} GPU(s), one "
                             f"per process; use --nproc {visible} or fewer (CUDA_VISIBLE_DEVICES says which)")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from multitask.reporting.markdown import render_markdown
    from multitask.run import evaluate_run, load_run

    if args.file and not args.task:
        raise MultitaskError("--file needs --task: the file is read in that task's format")
    output_dir = Path(args.output_dir or Path(args.run_dir) / "evaluation")
    _setup_logging()
    run = _load_run(args)
    report = evaluate_run(run, output_dir, args.task, Path(args.file) if args.file else None, args.split_name)
    print(render_markdown(report))
    print(f"evaluation written to {output_dir}")


def _load_run(args: argparse.Namespace):
    from multitask.run import load_run

    return load_run(args.run_dir, device=args.device, precision=args.precision, batch_size=args.batch_size,
                    progress=True)


def add_inference_options(parser: argparse.ArgumentParser) -> None:
    """Where and how a loaded run computes: shared by evaluate, predict and serve."""
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default=None,
                        help="autocast precision (default: the run's own setting)")
    parser.add_argument("--batch-size", type=_positive_int, default=None,
                        help="inputs per forward pass (default: the run's evaluation batch size; serve: --max-batch)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def cmd_predict(args: argparse.Namespace) -> None:
    from multitask.run import predict_file

    _setup_logging()
    run = _load_run(args)
    count = predict_file(run, args.task, Path(args.input), Path(args.output), args.all_scores)
    print(f"{count} predictions written to {args.output}")


def cmd_serve(args: argparse.Namespace) -> None:
    from multitask.serve import Limits, ServeSettings, serve
    from multitask.serve.guard import allowed_hosts, read_key

    settings = ServeSettings(
        args.max_batch, args.max_wait_ms, args.max_queue,
        read_key(args.api_key, args.api_key_file, "MULTITASK_API_KEY", "--api-key"),
        Limits(args.max_request_bytes, args.max_inputs, args.max_input_chars, args.max_input_tokens),
        admin_key=read_key(args.admin_key, args.admin_key_file, "MULTITASK_ADMIN_KEY", "--admin-key"),
        scan_seconds=args.scan_seconds, max_queue_ms=args.max_queue_ms, max_pass_seconds=args.max_pass_seconds,
        graceful_timeout=args.graceful_timeout, body_timeout=args.body_timeout, max_connections=args.max_connections,
        allowed_hosts=allowed_hosts(args.allowed_hosts, args.host), docs=args.docs)
    _setup_logging()
    serve(args.runs, args.host, args.port, settings, log_level=args.log_level,
          store=Path(args.store) if args.store else None, device=args.device, precision=args.precision,
          batch_size=args.batch_size or args.max_batch)


def cmd_validate(args: argparse.Namespace) -> None:
    from multitask.validation import validate_paths

    _setup_logging()
    print(validate_paths([Path(p) for p in args.paths], args.set))


def cmd_compare(args: argparse.Namespace) -> None:
    from multitask.compare import compare, parse_methods

    methods = parse_methods(args.methods)
    experiment = _load_experiment(args.config, args.set)
    output_dir = Path(args.output_dir or Path("runs") / f"{experiment.name}-compare")
    _setup_logging(output_dir)
    compare(experiment, methods, output_dir, config_path=Path(args.config), in_process=args.in_process,
            budget_minutes=args.budget_minutes)
    print((output_dir / "comparison.md").read_text(encoding="utf-8"))
    print(f"comparison written to {output_dir} (comparison.json, comparison.md, comparison.png, runs/)")


def cmd_tasks(args: argparse.Namespace) -> None:
    from multitask.checkpoint import read_checkpoint
    from multitask.training.grow import task_rows

    meta, _ = read_checkpoint(Path(args.run_dir))
    rows = task_rows(meta)
    width = max(len(row["task"]) for row in rows)
    for row in rows:
        print(f"{row['task']:<{width}}  {row['type']:<14} {row['labels']:>4} labels  "
              f"{'; '.join(row['prefixes']) or '-'}  [{row['origin']}]")


def cmd_remove(args: argparse.Namespace) -> None:
    from multitask.training.grow import remove_task

    _setup_logging()
    written = remove_task(Path(args.run_dir), args.task, Path(args.output_dir))
    print(f"model without {args.task} written to {written.parent}")


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
    train.add_argument("--nproc", type=int, default=1, metavar="N",
                       help="train data-parallel on N local processes (starts torchrun for you)")
    train.set_defaults(func=cmd_train)

    evaluate = sub.add_parser("evaluate", help="evaluate a trained run")
    evaluate.add_argument("run_dir")
    evaluate.add_argument("--task")
    evaluate.add_argument("--file", help="a file in the task's format (needs --task)")
    evaluate.add_argument("--split-name", default="custom")
    evaluate.add_argument("--output-dir")
    add_inference_options(evaluate)
    evaluate.set_defaults(func=cmd_evaluate)

    predict = sub.add_parser("predict", help="predict on raw inputs (JSONL in, JSONL out)")
    predict.add_argument("run_dir")
    predict.add_argument("--task", required=True)
    predict.add_argument("--input", required=True)
    predict.add_argument("--output", required=True)
    predict.add_argument("--all-scores", action="store_true",
                         help="classification: give every label's probability (scores), not only the chosen one's")
    add_inference_options(predict)
    predict.set_defaults(func=cmd_predict)

    serve = sub.add_parser("serve", help="serve every task of one or more runs over HTTP (docs/serving.md)")
    serve.add_argument("runs", nargs="*", metavar="RUN", help="a run directory, or NAME=DIR to name its namespace")
    serve.add_argument("--store", metavar="DIR",
                       help="serve every run folder of DIR (named by its folder), following additions, changes and "
                            "removals while serving")
    serve.add_argument("--scan-seconds", type=float, default=1.0, help="how often --store is scanned")
    serve.add_argument("--admin-key", help="enable /v1/admin/* (add, remove runs; rescan the store) with this key "
                                           "(shown by ps: prefer --admin-key-file or MULTITASK_ADMIN_KEY)")
    serve.add_argument("--admin-key-file", metavar="FILE", help="read --admin-key from FILE")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--allowed-hosts", metavar="NAMES",
                       help="Host header names served, comma-separated, or '*' (default: loopback names when --host is "
                            "loopback, else any); others: 400")
    serve.add_argument("--max-batch", type=_positive_int, default=32,
                       help="windows (model inputs; a long text may be several) per model pass; for serve, "
                            "--batch-size defaults to it")
    serve.add_argument("--max-wait-ms", type=float, default=5.0,
                       help="how long an input waits for others to join its model pass")
    serve.add_argument("--max-queue", type=_positive_int, default=1024, help="windows waiting; beyond it: 503")
    serve.add_argument("--max-queue-ms", type=float, default=30_000,
                       help="a request waiting longer for its model pass gets 503 (0: no limit)")
    serve.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/* and /metrics (shown by ps: "
                                         "prefer --api-key-file or MULTITASK_API_KEY)")
    serve.add_argument("--api-key-file", metavar="FILE", help="read --api-key from FILE")
    serve.add_argument("--max-request-bytes", type=_positive_int, default=2 << 20, help="larger bodies: 413")
    serve.add_argument("--max-inputs", type=_positive_int, default=256, help="inputs per request; more: 422")
    serve.add_argument("--max-input-chars", type=_positive_int, default=20_000,
                       help="characters per input (all its strings); more: 422")
    serve.add_argument("--max-input-tokens", type=_positive_int, default=8192,
                       help="tokens per input over all its windows; more: 422")
    serve.add_argument("--body-timeout", type=float, default=30.0,
                       help="seconds a request body may take to arrive; slower: 408")
    serve.add_argument("--max-connections", type=_positive_int, default=512,
                       help="connections and requests at once (uvicorn's limit_concurrency); beyond it: 503")
    serve.add_argument("--max-pass-seconds", type=float, default=120.0,
                       help="a model pass running longer turns /health to 503 (0: never)")
    serve.add_argument("--graceful-timeout", type=float, default=30.0,
                       help="seconds in-flight requests get to finish on shutdown; what cannot finish gets 503")
    serve.add_argument("--docs", action="store_true",
                       help="serve /docs (Swagger UI; its scripts load from a CDN, so it is blank offline)")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    add_inference_options(serve)
    serve.set_defaults(func=cmd_serve)

    validate = sub.add_parser("validate", help="check task or experiment YAML files and their data")
    validate.add_argument("paths", nargs="+")
    validate.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    validate.set_defaults(func=cmd_validate)

    compare = sub.add_parser("compare", help="train several methods on the same tasks and compare them")
    compare.add_argument("config")
    compare.add_argument("--methods", default="prefix_shared,prefix_per_task,prefix_single,lora,full_ft,linear_probe",
                         help="comma-separated subset of the methods")
    compare.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    compare.add_argument("--output-dir")
    compare.add_argument("--budget-minutes", type=float, default=None,
                         help="give every method this much training time (not counting tokenisation and evaluation) "
                              "instead of the config's step count; comparison.md then shows learning curves")
    compare.add_argument("--in-process", action="store_true",
                         help="train every method in this process (peak memory is then not per method)")
    compare.set_defaults(func=cmd_compare)

    tasks = sub.add_parser("tasks", help="list the tasks of a trained run (and which came from its base)")
    tasks.add_argument("run_dir")
    tasks.set_defaults(func=cmd_tasks)

    remove = sub.add_parser("remove", help="write a trained run without one of its tasks (the others unchanged)")
    remove.add_argument("run_dir")
    remove.add_argument("task")
    remove.add_argument("--output-dir", required=True, help="where the smaller run is written (a new folder)")
    remove.set_defaults(func=cmd_remove)

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
    except OSError as error:  # a full disk or a folder we may not write: files already saved stay as they were
        where = f"{error.filename}: " if error.filename else ""
        print(f"error: {where}{error.strerror or error} (files written before this one are intact)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: resume with --resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
