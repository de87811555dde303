"""Load test of `multitask serve`: a live server under concurrent mixed-task traffic, what one more served task
costs in memory against one more fine-tuned model, and mixed batching against one model copy per task.

    python bench/serve_load.py [RUN_DIR] [--concurrency 1,8,32] [--requests 300] [--rounds 3]
                               [--max-batch 32] [--max-wait-ms 5] [--memory-tasks 1,3,10]

RUN_DIR defaults to the newest runs/demo-* (`make demo`: SST-2, CoNLL-2003, SQuAD). Every request carries one
input: a real validation example of one of the run's tasks (read from the data root by the package's own
loaders), the tasks interleaved at random as independent clients would send them.

1. Load. The run is served by `multitask serve`'s app under uvicorn in a subprocess (this script re-run with
   --serve-worker); the client here keeps C requests in flight (C = each --concurrency) and records requests/s,
   latency percentiles and the mean micro-batch size (from the server's /metrics). Levels are interleaved over
   --rounds rounds in alternating order; the rows are medians of the rounds' throughput and percentiles of all
   latencies.
2. Memory. In a fresh process per variant (--memory-worker), RSS added by N more tasks served on the shared
   encoder (a copy of one task's prefix and head each) against N more separately fine-tuned models (a copy of
   the encoder and a head each), at each N of --memory-tasks, on top of the loaded run.
3. Mixed vs routed. The same traffic at the highest concurrency against two live servers, interleaved round by
   round: "mixed" serves every task from one model (inputs of all tasks share micro-batches), "routed" loads
   the run once per task and routes each task to its own model copy in the same process (a micro-batch then
   takes one model pass per task in it). Target: mixed / routed throughput >= 1.

The client runs on the same machine as the server: on a small machine it takes CPU from it, so quote ratios.
--encoder is not used (the run names its own encoder).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import gc
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

import common
from multitask.data.root import data_root
from multitask.serve.metrics import parse_samples
from multitask.tasks.loading import load_task_data
from multitask.utils.memory import rss_bytes

TARGET = 1.0  # mixed / routed throughput
SCALING_TARGET = 3.0  # throughput at the highest concurrency / at the lowest
TAIL_TARGET = 3.0  # p99 / p50 latency at concurrency 8
MIB = 2**20
Request = tuple[str, Any]  # task, one raw input


# ---------------------------------------------------------------- the traffic
def default_run() -> Path:
    runs = sorted((p for p in (common.REPO / "runs").glob("demo-*") if (p / "checkpoint").is_dir()),
                  key=lambda p: p.stat().st_mtime)
    if not runs:
        sys.exit("no trained runs/demo-* found: train one (`make demo`) or give a run directory")
    return runs[-1]


def raw_input(example: Any) -> Any:
    """A validation example as a client would send it (the prediction input of its task type)."""
    if hasattr(example, "question"):
        return {"question": example.question, "context": example.context}
    if hasattr(example, "tokens"):
        return {"tokens": example.tokens}
    return {"text": example.text, **({"text_pair": example.text_pair} if example.text_pair else {})}


def traffic(run, per_task: int, seed: int) -> list[Request]:
    """Up to ``per_task`` validation inputs of every task of the run, shuffled together."""
    root = data_root(run.experiment.data_root)
    requests = []
    for name, task in run.tasks.items():
        examples = load_task_data(task, root, f"{run.run_dir}: task {name}").examples["validation"][:per_task]
        requests += [(name, raw_input(example)) for example in examples]
    random.Random(seed).shuffle(requests)
    return requests


# ---------------------------------------------------------------- the server processes
def serve_worker(args: argparse.Namespace) -> None:
    """Serve the run as the variant asks until terminated (SIGTERM: uvicorn's graceful shutdown)."""
    import uvicorn

    from multitask.run import load_run
    from multitask.serve import Catalog, ServeSettings, create_app

    common.setup(args)
    load = lambda: load_run(args.run_dir, device=args.device, batch_size=args.max_batch)  # noqa: E731
    run = load()
    catalog = Catalog.from_runs({run.name: run})
    settings = ServeSettings(args.max_batch, args.max_wait_ms, max_queue=max(1024, 4 * args.max_batch))
    predict = None  # mixed: the catalog's one pass over every task
    if args.serve_worker == "routed":  # one whole model per task: a micro-batch takes one pass per task in it
        copies = {name: load() for name in run.tasks}

        def routed(items):
            by_task: dict[str, list[int]] = {}
            for index, item in enumerate(items):
                by_task.setdefault(item.task.task_name, []).append(index)
            results: list[Any] = [None] * len(items)
            for task, indices in by_task.items():
                answers = copies[task].predict_examples({task: [items[i].example for i in indices]})[task]
                for index, answer in zip(indices, answers):
                    results[index] = answer
            return results
        predict = routed
    config = uvicorn.Config(create_app(catalog, settings, predict=predict), host="127.0.0.1", port=args.port,
                            log_level="warning", access_log=False)
    uvicorn.Server(config).run()


class Server(common.ServerProcess):
    """A --serve-worker subprocess serving the run as ``variant`` asks."""

    def __init__(self, args: argparse.Namespace, variant: str) -> None:
        self.variant = variant
        super().__init__([sys.executable, __file__, str(args.run_dir), "--serve-worker", variant, *forwarded(args)],
                         f"{variant} server")


def forwarded(args: argparse.Namespace) -> list[str]:
    """The options a worker process needs from this one."""
    options = ["--device", args.device, "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms),
               "--seed", str(args.seed)]
    return options + (["--threads", str(args.threads)] if args.threads else [])


# ---------------------------------------------------------------- the client
async def _fire(url: str, requests: list[Request], concurrency: int) -> tuple[float, list[float], int]:
    """Keep ``concurrency`` requests in flight until all are answered: (seconds, latencies, failures)."""
    latencies: list[float] = []
    failures = 0
    queue = iter(requests)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        async def worker() -> None:
            nonlocal failures
            for task, raw in queue:
                started = time.perf_counter()
                response = await client.post("/v1/predict", json={"task": task, "inputs": [raw]})
                latencies.append(time.perf_counter() - started)
                failures += response.status_code != 200

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - started, latencies, failures


def batch_totals(url: str) -> tuple[float, float]:
    samples = parse_samples(httpx.get(f"{url}/metrics", timeout=30).text)
    return samples.get("multitask_batch_size_sum", 0.0), samples.get("multitask_batch_size_count", 0.0)


def measure(url: str, requests: list[Request], concurrency: int) -> dict[str, Any]:
    before = batch_totals(url)
    seconds, latencies, failures = asyncio.run(_fire(url, requests, concurrency))
    after = batch_totals(url)
    batches = after[1] - before[1]
    return {"rps": len(requests) / seconds, "latencies": latencies, "failures": failures,
            "mean_batch": (after[0] - before[0]) / batches if batches else 0.0}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def interleaved(names: list[Any], rounds: int, run_one) -> dict[Any, list[dict[str, Any]]]:
    """Every round runs each name once, in alternating order (common.run_rounds' habit)."""
    results: dict[Any, list[dict[str, Any]]] = {name: [] for name in names}
    for index in range(rounds):
        for name in names if index % 2 == 0 else reversed(names):
            results[name].append(run_one(name))
    return results


# ---------------------------------------------------------------- memory
def task_modules(model, task: str) -> list:
    """What serving one more task adds to a loaded model: its prefix encoder(s) and its head."""
    modules = [model.heads[task]]
    if model.prefix_bank is not None:
        modules += [model.prefix_bank.encoders[name] for name in model.prefix_bank.layout.task_prefixes[task]]
    return modules


def memory_worker(args: argparse.Namespace) -> None:
    """Print, as one JSON line, the RSS added at each N of --memory-tasks by N more tasks (shared encoder) or N
    more fine-tuned models (encoder copy + head)."""
    import torch

    from multitask.run import load_run

    common.setup(args)
    run = load_run(args.run_dir, device="cpu")  # it measures host memory (RSS), whatever device the server has
    names = list(run.tasks)
    held, added = [], {}
    gc.collect()
    start = rss_bytes("VmRSS")
    with torch.no_grad():
        for count in range(1, max(args.memory_tasks) + 1):
            name = names[(count - 1) % len(names)]
            if args.memory_worker == "task":
                held.append([copy.deepcopy(m) for m in task_modules(run.model, name)])
            else:
                held.append([copy.deepcopy(run.model.encoder), copy.deepcopy(run.model.heads[name])])
            if count in args.memory_tasks:
                gc.collect()
                added[count] = rss_bytes("VmRSS") - start
    print(json.dumps({"added": added, "loaded": start}))


def measure_memory(args: argparse.Namespace, variant: str) -> dict[str, Any]:
    command = [sys.executable, __file__, str(args.run_dir), "--memory-worker", variant, "--memory-tasks",
               ",".join(map(str, args.memory_tasks)), *forwarded(args)]
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {"loaded": result["loaded"], "added": {int(k): v for k, v in result["added"].items()}}


# ---------------------------------------------------------------- main
def model_alone(run, requests: list[Request], size: int) -> float:
    """Inputs per second of the engine alone (no HTTP, no queue) on the same stream in arrival order, ``size``
    inputs per pass: the ceiling a server's batching can reach on this machine."""
    run.engine.batch_size = size
    run.predict_many({requests[0][0]: [requests[0][1]]})  # warm up
    started = time.perf_counter()
    for start in range(0, len(requests), size):
        chunk: dict[str, list[Any]] = {}
        for task, raw in requests[start : start + size]:
            chunk.setdefault(task, []).append(raw)
        run.predict_many(chunk)
    return len(requests) / (time.perf_counter() - started)


def counts(text: str) -> list[int]:
    values = [int(part) for part in text.split(",") if part.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return values


def parse_args() -> argparse.Namespace:
    parser = common.parser_for(__doc__)
    parser.add_argument("run_dir", nargs="?", type=Path, help="a trained run (default: the newest runs/demo-*)")
    parser.add_argument("--concurrency", type=counts, default=[1, 8, 32], help="requests in flight, e.g. 1,8,32")
    parser.add_argument("--requests", type=int, default=300, help="requests per concurrency level and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--memory-tasks", type=counts, default=[1, 3, 10], help="task counts of the memory table")
    parser.add_argument("--serve-worker", choices=["mixed", "routed"], help=argparse.SUPPRESS)
    parser.add_argument("--memory-worker", choices=["task", "model"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.concurrency, args.requests, args.rounds, args.memory_tasks = [1, 4], 12, 1, [1, 3]
    args.run_dir = (args.run_dir or default_run()).resolve()
    return args


def main() -> None:
    args = parse_args()
    if args.serve_worker:
        return serve_worker(args)
    if args.memory_worker:
        return memory_worker(args)
    device = common.setup(args)

    from multitask.run import load_run

    run = load_run(args.run_dir, device=str(device))  # its tasks and data, and the model alone on the server's device
    requests = traffic(run, per_task=max(args.requests, 50), seed=args.seed)[: args.requests]
    tasks = "+".join(run.tasks)
    alone = {size: model_alone(run, requests, size) for size in (1, args.max_batch)}
    del run
    servers = {variant: Server(args, variant) for variant in ("mixed", "routed")}
    try:
        for server in servers.values():
            server.wait_ready()
        for server in servers.values():  # warm up: first passes allocate and tokenizers load their caches
            measure(server.url, requests[: min(len(requests), 16)], 4)
        load = interleaved(args.concurrency, args.rounds,
                           lambda c: measure(servers["mixed"].url, requests, c))
        top = max(args.concurrency)
        versus = interleaved(list(servers), args.rounds, lambda v: measure(servers[v].url, requests, top))
    finally:
        for server in servers.values():
            server.stop()
    memory = {variant: measure_memory(args, variant) for variant in ("task", "model")}

    print(f"serving: `multitask serve` under load\nrun={args.run_dir.name} tasks={tasks} device={device} "
          f"threads={args.threads or 'default'} max_batch={args.max_batch} max_wait_ms={args.max_wait_ms:g} "
          f"requests={len(requests)}x{args.rounds} rounds (one input each, mixed tasks)"
          + ("  [--quick: smoke run, the figures mean nothing]" if args.quick else ""))
    rows = []
    for c, results in load.items():
        latencies = [x for r in results for x in r["latencies"]]
        rows.append([str(c), f"{common.median([r['rps'] for r in results]):.1f}",
                     *(f"{1000 * percentile(latencies, q):.0f}" for q in (50, 95, 99)),
                     f"{common.median([r['mean_batch'] for r in results]):.1f}", sum(r["failures"] for r in results)])
    common.print_table(["concurrency", "requests/s", "p50 (ms)", "p95 (ms)", "p99 (ms)", "mean batch", "failed"], rows)
    rps = {c: common.median([r["rps"] for r in results]) for c, results in load.items()}
    low, high = min(rps), max(rps)
    common.report_ratio(f"throughput at concurrency {high} / at {low}", rps[high] / rps[low], SCALING_TARGET,
                        at_most=False)
    if 8 in load:
        latencies = [x for r in load[8] for x in r["latencies"]]
        common.report_ratio("p99 / p50 latency at concurrency 8", percentile(latencies, 99) / percentile(latencies, 50),
                            TAIL_TARGET)
    print(f"the engine alone on the same stream (no HTTP, no queue): {alone[1]:.1f} inputs/s one at a time, "
          f"{alone[args.max_batch]:.1f} at {args.max_batch} per pass ({alone[args.max_batch] / alone[1]:.2f}x: the "
          f"most batching can give on this machine)")

    print(f"\nmemory: RSS added on top of the loaded run ({memory['task']['loaded'] / MIB:.0f} MiB)")
    common.print_table(
        ["N added", "N tasks: prefix + head each (MiB)", "N models: encoder + head each (MiB)", "tasks / models"],
        [[str(n), f"{memory['task']['added'][n] / MIB:.2f}", f"{memory['model']['added'][n] / MIB:.1f}",
          f"{memory['task']['added'][n] / max(memory['model']['added'][n], 1):.4f}"] for n in args.memory_tasks])

    print(f"\nmixed-task server vs one model copy per task, concurrency {top}")
    throughput = {v: common.median([r["rps"] for r in results]) for v, results in versus.items()}
    common.print_table(["server", "requests/s", "mean batch", "failed"],
                       [[v, f"{throughput[v]:.1f}", f"{common.median([r['mean_batch'] for r in results]):.1f}",
                         sum(r["failures"] for r in results)] for v, results in versus.items()])
    common.report_ratio("mixed / routed throughput", throughput["mixed"] / throughput["routed"], TARGET,
                        at_most=False)
    common.print_footer()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
