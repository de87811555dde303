"""Render a method comparison (comparison.json's content) as Markdown tables and one PNG with two charts."""

from __future__ import annotations

from typing import Any

from matplotlib.figure import Figure

from multitask.reporting.header import size
from multitask.reporting.markdown import duration, percent
from multitask.reporting.plots import to_png


def _size(num_bytes: int | None) -> str:
    return "–" if num_bytes is None else size(num_bytes)


def _memory(cell: dict[str, Any]) -> str:
    gpu = cell.get("peak_gpu_memory_bytes")
    return f"{_size(gpu)} (GPU)" if gpu else _size(cell.get("peak_rss_bytes"))


def _step(cell: dict[str, Any]) -> str:
    seconds = cell.get("step_time_s")
    return "–" if seconds is None else f"{1000 * seconds:.0f} ms"


def render_comparison_markdown(results: dict[str, Any]) -> str:
    methods = results["methods"]
    tasks = sorted({task for m in methods.values() for task in m["tasks"]})
    lines = [f"# Method comparison: {results['experiment']}", "",
             f"Main metric of each task on the **{results['split']}** split (percent); "
             f"total wall time {duration(results.get('wall_time_s', 0.0))}.", "",
             "| Method | " + " | ".join(tasks) + " | Mean |", "| --- |" + " ---: |" * (len(tasks) + 1)]
    for method, data in methods.items():
        scores = [data["tasks"].get(t, {}).get("score") for t in tasks]
        known = [s for s in scores if s is not None]
        mean = sum(known) / len(known) if known else None
        lines.append(f"| {method} | " + " | ".join(percent(s) for s in scores) + f" | {percent(mean)} |")
    skipped = [f"- {method} was not trained: {data['skipped']}" for method, data in methods.items()
               if data.get("skipped")]
    lines += ["", *skipped] if skipped else []
    lines += ["", "## Cost per method and task", "",
              "| Method | Task | Main metric | Train wall time | Examples/s | Step time | Peak memory | Trainable params "
              "(% of encoder) | Frozen cache | Checkpoint |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for method, data in methods.items():
        for task in tasks:
            cell = data["tasks"].get(task)
            if cell is None:
                continue
            rate = cell.get("examples_per_s")
            lines.append(
                f"| {method} | {task} | {percent(cell['score'])} ({cell['main_metric']}) | "
                f"{duration(cell['wall_time_s'])} | {'–' if rate is None else f'{rate:.1f}'} | {_step(cell)} | "
                f"{_memory(cell)} | {cell['trainable_parameters']:,} ({cell['trainable_percent_of_encoder']:.2f}%) | "
                f"{_size(cell.get('frozen_cache_bytes'))} | {_size(cell['checkpoint_bytes'])} |"
            )
    lines += ["", "Multi-task methods train all tasks in one run, so their wall time, memory and checkpoint are "
              "shared by every task row; prefix_single trains one run per task."]
    if any(cell.get("curve") for m in methods.values() for cell in m["tasks"].values()):
        lines += learning_curve_lines(results, tasks)
    return "\n".join(lines) + "\n"


# A method "reaches" a task's target when it comes within this many points of the best final score of any method.
TARGET_MARGIN = 0.01


def time_to_reach(curve: list[list[float]], target: float) -> float | None:
    """Training minutes of the first evaluation at or above ``target`` (None: never reached)."""
    return next((minutes for minutes, score in curve if score >= target), None)


def learning_curve_lines(results: dict[str, Any], tasks: list[str]) -> list[str]:
    """Per task: each method's main metric at each evaluation (training minutes), and its time to the target."""
    methods = results["methods"]
    budget = results.get("budget_minutes")
    lines = ["", "## Learning curves against training time", "",
             (f"Every method had the same training-time budget of {budget:g} minutes (tokenisation and evaluation "
              f"not counted). " if budget else "") +
             "Each cell is `minutes: score` at an evaluation of the validation split. The target of a task is the "
             f"best final score of any method minus {100 * TARGET_MARGIN:g} point; 'time to target' is the training "
             "time of the first evaluation that reached it."]
    for task in tasks:
        finals = [m["tasks"][task]["score"] for m in methods.values()
                  if task in m["tasks"] and m["tasks"][task]["score"] is not None]
        if not finals:
            continue
        target = max(finals) - TARGET_MARGIN
        lines += ["", f"### {task} (target {percent(target)})", "", "| Method | Curve | Time to target |",
                  "| --- | --- | ---: |"]
        for method, data in methods.items():
            cell = data["tasks"].get(task)
            if cell is None:
                continue
            curve = cell.get("curve") or []
            points = ", ".join(f"{minutes:.1f}: {percent(score)}" for minutes, score in curve) or "–"
            reached = time_to_reach(curve, target)
            lines.append(f"| {method} | {points} | {'not reached' if reached is None else f'{reached:.1f} min'} |")
    return lines


def render_comparison_plot(results: dict[str, Any]) -> bytes | None:
    """Top left: main metric per task per method (grouped bars). Top right: mean metric against training wall time.
    Below (when runs evaluated along the way): one learning curve per method for each task, against minutes."""
    methods = results["methods"]
    tasks = sorted({task for m in methods.values() for task in m["tasks"]})
    if not tasks:
        return None
    curved = [t for t in tasks if any((m["tasks"].get(t) or {}).get("curve") for m in methods.values())]
    fig = Figure(figsize=(12, 4.5 * (2 if curved else 1)), dpi=100)
    grid = fig.add_gridspec(2 if curved else 1, max(2, len(curved)))
    bars = fig.add_subplot(grid[0, : max(1, grid.ncols // 2)])
    scatter = fig.add_subplot(grid[0, max(1, grid.ncols // 2):])
    for column, task in enumerate(curved):
        axis = fig.add_subplot(grid[1, column])
        for method, data in methods.items():
            curve = (data["tasks"].get(task) or {}).get("curve") or []
            if curve:
                axis.plot([m for m, _ in curve], [100 * s for _, s in curve], marker="o", label=method)
        axis.set_title(f"{task}: learning curve")
        axis.set_xlabel("training minutes")
        axis.set_ylabel(f"main metric on {results['split']} (%)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    width = 0.8 / max(1, len(methods))
    for index, (method, data) in enumerate(methods.items()):
        scores = [100 * (data["tasks"].get(t, {}).get("score") or 0.0) for t in tasks]
        bars.bar([x + index * width for x in range(len(tasks))], scores, width, label=method)
        cells = [c for c in data["tasks"].values() if c.get("score") is not None]
        if cells:
            runs = {c["run_dir"]: c["wall_time_s"] for c in cells}
            scatter.scatter(sum(runs.values()), 100 * sum(c["score"] for c in cells) / len(cells), label=method, s=60)
    bars.set_xticks([x + width * (len(methods) - 1) / 2 for x in range(len(tasks))], tasks)
    bars.set_ylabel(f"main metric on {results['split']} (%)")
    bars.set_title("Main metric per task")
    bars.legend(fontsize=8)
    scatter.set_xlabel("training wall time (s)")
    scatter.set_ylabel("mean main metric (%)")
    scatter.set_title("Quality against training time")
    scatter.grid(alpha=0.3)
    scatter.legend(fontsize=8)
    return to_png(fig)
