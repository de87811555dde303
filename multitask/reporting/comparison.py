"""Render a method comparison (comparison.json's content) as Markdown tables and one PNG with two charts."""

from __future__ import annotations

from typing import Any

from matplotlib.figure import Figure

from multitask.reporting.markdown import duration, percent
from multitask.reporting.plots import to_png


def _size(num_bytes: int | None) -> str:
    if num_bytes is None:
        return "–"
    for unit in ("B", "KB", "MB", "GB"):
        if num_bytes < 1024 or unit == "GB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    return "–"


def _memory(cell: dict[str, Any]) -> str:
    gpu = cell.get("peak_gpu_memory_bytes")
    return f"{_size(gpu)} (GPU)" if gpu else _size(cell.get("peak_rss_bytes"))


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
    lines += ["", "## Cost per method and task", "",
              "| Method | Task | Main metric | Train wall time | Examples/s | Peak memory | Trainable params "
              "(% of encoder) | Checkpoint |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for method, data in methods.items():
        for task in tasks:
            cell = data["tasks"].get(task)
            if cell is None:
                continue
            rate = cell.get("examples_per_s")
            lines.append(
                f"| {method} | {task} | {percent(cell['score'])} ({cell['main_metric']}) | "
                f"{duration(cell['wall_time_s'])} | {'–' if rate is None else f'{rate:.1f}'} | {_memory(cell)} | "
                f"{cell['trainable_parameters']:,} ({cell['trainable_percent_of_encoder']:.2f}%) | "
                f"{_size(cell['checkpoint_bytes'])} |"
            )
    lines += ["", "Multi-task methods train all tasks in one run, so their wall time, memory and checkpoint are "
              "shared by every task row; prefix_single trains one run per task."]
    return "\n".join(lines) + "\n"


def render_comparison_plot(results: dict[str, Any]) -> bytes | None:
    """Left: main metric per task per method (grouped bars). Right: mean metric against training wall time."""
    methods = results["methods"]
    tasks = sorted({task for m in methods.values() for task in m["tasks"]})
    if not tasks:
        return None
    fig = Figure(figsize=(12, 4.5), dpi=100)
    bars, scatter = fig.subplots(1, 2)
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
