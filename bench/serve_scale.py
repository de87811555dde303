"""Serving many tasks from one process: a model store of N tasks grown from one trained run, against one task.

    python bench/serve_scale.py RUN_DIR [--tasks 1,100,1000] [--runs 8,100] [--requests 600] [--rounds 3]

Every store task is a copy of one of RUN_DIR's classification tasks (its prefix and head, perturbed so that no two
are alike) saved as a run of its own, the way growing a model task by task produces them. Reported, side by side:

1. Startup and memory: in a fresh process per N of --tasks, the time to load a store of N tasks and the RSS it
   adds; the cost of each further task.
2. Distinct tasks in one pass: a batch of --batch sentences, each row from a different task, against the same
   batch all from one task (the "distinct" case of multi-adapter serving), in process, interleaved rounds.
   Target >= 0.95x.
3. Requests spread over K runs against all to one run, at concurrency 32 against a live `multitask serve --store`,
   for each K of --runs. Target >= 0.95x.
4. Zipf(1.0) traffic over the largest store: p99 latency of the rarest tenth of tasks over that of the most
   popular tenth. Target <= 1.2x.
5. A run added to the store of a live server under load: seconds until it answers (target <= 1 s at p99), failed
   requests while it loads (target 0), and the p99 latency of the other tasks before and during the add
   (target <= 1.1x).

The client runs on the same machine as the server: quote ratios.
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import torch

import common
from multitask.checkpoint import read_checkpoint, write_checkpoint
from multitask.data.root import data_root
from multitask.tasks.loading import load_task_data
from multitask.utils.memory import rss_bytes

SENTENCES_PER_TASK = 200


# ---------------------------------------------------------------- the store
def build_store(run_dir: Path, store: Path, count: int, seed: int = 0) -> list[str]:
    """``count`` single-task runs under ``store``, each a perturbed copy of a classification task of the run."""
    meta, weights = read_checkpoint(run_dir)
    candidates = [t for t in meta["tasks"] if t["config"]["type"] == "classification"]
    if not candidates:
        sys.exit(f"{run_dir} has no classification task to copy")
    source = candidates[0]["config"]["name"]
    layout = meta["prefix_layout"]
    prefixes = layout["task_prefixes"][source]
    generator = torch.Generator().manual_seed(seed)
    names = []
    for index in range(count):
        name = f"t{index:04d}"
        state = {}
        for key, value in weights.items():
            if key.startswith(f"heads.{source}.") or any(key.startswith(f"prefix_bank.encoders.{p}.") for p in prefixes):
                noise = torch.randn(value.shape, generator=generator) * (0.01 * value.float().std() + 1e-6)
                state[key] = (value.float() + noise).to(value.dtype)
        task_meta = {**meta, "tasks": [candidates[0]],
                     "prefix_layout": {**layout, "task_prefixes": {source: prefixes},
                                       "prefixes": {p: layout["prefixes"][p] for p in prefixes},
                                       "attention": {p: layout.get("attention", {}).get(p, "joint") for p in prefixes}}}
        task_meta.pop("model_sha256", None)
        task_meta.pop("format_version", None)
        task_meta.pop("base", None)
        write_checkpoint(store / name, state, task_meta)
        names.append(name)
    return names


def sentences(run_dir: Path, task: str) -> list[str]:
    from multitask.run import load_run

    run = load_run(run_dir, device="cpu")
    examples = load_task_data(run.tasks[task], data_root(run.experiment.data_root), task).examples["validation"]
    return [example.text for example in examples[:SENTENCES_PER_TASK]]


# ---------------------------------------------------------------- 1. startup and memory (fresh process each)
def startup_worker(store: Path) -> None:
    from multitask.serve import load_fleet

    before = rss_bytes("VmRSS")
    started = time.perf_counter()
    fleet = load_fleet([], store, device="cpu")
    seconds = time.perf_counter() - started
    print(json.dumps({"tasks": len(fleet.catalog.tasks), "seconds": seconds, "rss_added": rss_bytes("VmRSS") - before}))


def measure_startup(store: Path) -> dict[str, Any]:
    done = subprocess.run([sys.executable, __file__, "--startup-worker", str(store)], stdout=subprocess.PIPE,
                          text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- 2. distinct tasks in one pass (in process)
def distinct_vs_same(store: Path, texts: list[str], batch: int, rounds: int) -> dict[str, float]:
    from multitask.serve import load_fleet

    catalog = load_fleet([], store, device="cpu", batch_size=batch).catalog
    names = sorted(catalog.tasks)
    rows = texts[:batch]
    same = [item for text in rows for item in catalog.parse(names[0], [text])]
    distinct = [item for i, text in enumerate(rows) for item in catalog.parse(names[i % len(names)], [text])]
    variants = {"same task": same, "distinct tasks": distinct}
    times: dict[str, list[float]] = {name: [] for name in variants}
    with torch.no_grad():
        catalog.predict(same)  # warm-up
        for index in range(rounds):
            for name in (list(variants) if index % 2 == 0 else list(reversed(variants))):
                started = time.perf_counter()
                for _ in range(3):
                    catalog.predict(variants[name])
                times[name].append((time.perf_counter() - started) / 3)
    return {name: statistics.median(values) for name, values in times.items()}


# ---------------------------------------------------------------- live servers
def store_server(store: Path, max_batch: int) -> common.ServerProcess:
    return common.ServerProcess([sys.executable, "-m", "multitask", "serve", "--store", str(store), "--device", "cpu",
                                 "--max-batch", str(max_batch), "--scan-seconds", "0.2", "--log-level", "warning"])


async def fire(url: str, requests: list[tuple[str, str]], concurrency: int):
    """Keep ``concurrency`` requests in flight: (seconds, [(task, latency, status)])."""
    answers: list[tuple[str, float, int]] = []
    queue = iter(requests)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        async def worker() -> None:
            for task, text in queue:
                started = time.perf_counter()
                response = await client.post("/v1/predict", json={"task": task, "inputs": [text]})
                answers.append((task, time.perf_counter() - started, response.status_code))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - started, answers


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


def spread_vs_one(url: str, runs: list[str], task: str, texts: list[str], count: int, rounds: int) -> dict[str, float]:
    one = [(f"{runs[0]}/{task}", texts[i % len(texts)]) for i in range(count)]
    spread = [(f"{runs[i % len(runs)]}/{task}", texts[i % len(texts)]) for i in range(count)]
    asyncio.run(fire(url, one[:64], 32))  # warm-up
    rates: dict[str, list[float]] = {"one run": [], "spread": []}
    for index in range(rounds):
        for name, requests in ((("one run", one), ("spread", spread)) if index % 2 == 0 else
                               (("spread", spread), ("one run", one))):
            seconds, _ = asyncio.run(fire(url, requests, 32))
            rates[name].append(len(requests) / seconds)
    return {name: statistics.median(values) for name, values in rates.items()}


def zipf_tails(url: str, runs: list[str], task: str, texts: list[str], count: int, seed: int) -> dict[str, float]:
    weights = [1.0 / (rank + 1) for rank in range(len(runs))]
    generator = random.Random(seed)
    ranks = generator.choices(range(len(runs)), weights=weights, k=count)
    requests = [(f"{runs[r]}/{task}", texts[i % len(texts)]) for i, r in enumerate(ranks)]
    _, answers = asyncio.run(fire(url, requests, 32))
    rank_of = {f"{run}/{task}": rank for rank, run in enumerate(runs)}
    tenth = len(runs) // 10
    popular = [latency for name, latency, _ in answers if rank_of[name] < tenth]
    rare = [latency for name, latency, _ in answers if rank_of[name] >= len(runs) - tenth]
    return {"popular_p99": p99(popular), "rare_p99": p99(rare), "rare_requests": len(rare),
            "popular_requests": len(popular)}


def live_add(url: str, store: Path, template: Path, runs: list[str], task: str, texts: list[str],
             adds: int) -> dict[str, Any]:
    """Add runs to the store under load: time until each answers, failures, other tasks' p99 before and during."""
    requests = [(f"{runs[i % len(runs)]}/{task}", texts[i % len(texts)]) for i in range(100000)]

    async def scenario():
        stop = asyncio.Event()
        answers: list[tuple[float, float, int]] = []  # (time sent, latency, status)
        limits = httpx.Limits(max_connections=40, max_keepalive_connections=40)
        async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
            queue = iter(requests)

            async def worker():
                for task, text in queue:
                    if stop.is_set():
                        return
                    sent = time.perf_counter()
                    response = await client.post("/v1/predict", json={"task": task, "inputs": [text]})
                    answers.append((sent, time.perf_counter() - sent, response.status_code))

            workers = [asyncio.create_task(worker()) for _ in range(32)]
            await asyncio.sleep(5)
            windows, delays, servable = [], [], []
            for index in range(adds):
                name = f"added{index}"
                staging = store / f".{name}"
                shutil.copytree(template, staging)
                appeared = time.perf_counter()
                staging.rename(store / name)
                # Servable: a request naming it is taken (an empty one: no model pass, so no queueing behind the load).
                while (await client.post("/v1/predict", json={"task": f"{name}/{task}", "inputs": []})).status_code != 200:
                    await asyncio.sleep(0.01)
                servable.append(time.perf_counter() - appeared)
                while True:
                    response = await client.post("/v1/predict", json={"task": f"{name}/{task}", "inputs": ["fine"]})
                    if response.status_code == 200:
                        break
                    await asyncio.sleep(0.01)
                delays.append(time.perf_counter() - appeared)
                windows.append((appeared, time.perf_counter()))
                await asyncio.sleep(2)
            stop.set()
            await asyncio.gather(*workers)
            return answers, windows, delays, servable

    answers, windows, delays, servable = asyncio.run(scenario())
    during = [lat for sent, lat, _ in answers if any(a <= sent <= b for a, b in windows)]
    before = [lat for sent, lat, _ in answers if sent < windows[0][0]]
    return {"servable_seconds": servable, "add_seconds": delays, "failed": sum(status != 200 for _, _, status in answers),
            "p99_before": p99(before), "p99_during": p99(during) if during else float("nan"), "requests": len(answers)}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--startup-worker":
        return startup_worker(Path(sys.argv[2]))
    parser = common.parser_for(__doc__)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--tasks", default="1,100,1000")
    parser.add_argument("--runs", default="8,100")
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--adds", type=int, default=5)
    parser.add_argument("--output", type=Path, default=None, help="where the stores are built (default: a temp dir)")
    parser.add_argument("--parts", default="startup,distinct,spread,live",
                        help="which measurements: startup, distinct, spread, live (Zipf and the live add)")
    args = parser.parse_args()
    common.setup(args)
    sizes = [int(n) for n in args.tasks.split(",")]
    ks = [int(k) for k in args.runs.split(",")]
    root = args.output or Path(tempfile.mkdtemp(prefix="serve-scale-"))
    largest = max(sizes + ks)
    full = root / f"store-{largest}"
    if not full.exists():
        build_store(args.run_dir, full, largest, args.seed)
    names = sorted(p.name for p in full.iterdir() if not p.name.startswith("."))
    meta, _ = read_checkpoint(full / names[0])
    task = meta["tasks"][0]["config"]["name"]  # every store run's one task
    texts = sentences(args.run_dir, task)

    def store_of(count: int) -> Path:
        store = root / f"store-{count}"
        if not store.exists():
            store.mkdir()
            for name in names[:count]:
                (store / name).symlink_to(full / name)
        return store

    print(f"serving at scale: tasks copied from {args.run_dir} ({task}), threads "
          f"{args.threads or 'default'}")
    parts = set(args.parts.split(","))
    startup = {n: measure_startup(store_of(n)) for n in sizes} if "startup" in parts else {}
    rows = [[str(n), f"{s['seconds']:.2f}", f"{1000 * s['seconds'] / n:.1f}", f"{s['rss_added'] / 2**20:.0f}"]
            for n, s in startup.items()]
    if rows:
        common.print_table(["tasks", "startup (s)", "ms per task", "RSS added (MiB)"], rows)
    if len(startup) > 1:
        low, high = min(sizes), max(sizes)
        per_task = (startup[high]["rss_added"] - startup[low]["rss_added"]) / (high - low)
        print(f"RSS per further task between {low} and {high} tasks: {per_task / 1024:.0f} KiB")

    timing = distinct_vs_same(store_of(largest), texts, args.batch, args.rounds * 3) if "distinct" in parts else None
    if timing:
        print(f"\none pass of {args.batch} rows, {largest} tasks served: same task {1000 * timing['same task']:.0f} "
              f"ms, distinct tasks {1000 * timing['distinct tasks']:.0f} ms: throughput ratio "
              f"{timing['same task'] / timing['distinct tasks']:.3f}x (target >= 0.95)")

    for k in ks if "spread" in parts else []:
        server = store_server(store_of(k), args.batch)
        try:
            server.wait_ready()
            rates = spread_vs_one(server.url, names[:k], task, texts, args.requests, args.rounds)
        finally:
            server.stop()
        print(f"K={k} runs, concurrency 32: one run {rates['one run']:.1f} req/s, spread {rates['spread']:.1f} req/s: "
              f"{rates['spread'] / rates['one run']:.3f}x (target >= 0.95)")

    if "live" not in parts:
        return
    store = root / "live"
    shutil.rmtree(store, ignore_errors=True)
    store.mkdir()
    for name in names[:largest]:
        (store / name).symlink_to(full / name)
    server = store_server(store, args.batch)
    try:
        server.wait_ready()
        tails = zipf_tails(server.url, names[:largest], task, texts, args.requests * 3, args.seed)
        print(f"Zipf(1.0) over {largest} tasks: p99 rarest tenth {1000 * tails['rare_p99']:.0f} ms "
              f"({tails['rare_requests']} requests), most popular tenth {1000 * tails['popular_p99']:.0f} ms "
              f"({tails['popular_requests']}): {tails['rare_p99'] / tails['popular_p99']:.3f}x (target <= 1.2)")
        added = live_add(server.url, store, full / names[0], names[:8], task, texts, args.adds)
        print(f"live add under load (concurrency 32, {added['requests']} requests): seconds until servable (a request "
              f"naming it is taken) {', '.join(f'{s:.2f}' for s in added['servable_seconds'])} (max "
              f"{max(added['servable_seconds']):.2f}; target <= 1); until its first answer, queued behind the load, "
              f"{', '.join(f'{s:.2f}' for s in added['add_seconds'])}; failed requests {added['failed']}, p99 of other "
              f"tasks {1000 * added['p99_before']:.0f} ms "
              f"before, {1000 * added['p99_during']:.0f} ms during ({added['p99_during'] / added['p99_before']:.2f}x; "
              f"target <= 1.1)")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
