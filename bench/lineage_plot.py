"""The lineage's learning curves side by side: one panel per task and budget, one line per method.

Reads the comparison.json files that bench/lineage.sh writes (several per panel may be given, e.g. a method rerun
into another folder) and draws them into one PNG, with a Markdown table of each method's final score.

    .venv/bin/python bench/lineage_plot.py runs/lineage/*/comparison.json --output docs/lineage_curves.png
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from matplotlib.figure import Figure

# The lineage in its historical order, each with the colour it keeps in every panel.
METHODS = {"prompt_tuning": "#1f77b4", "p_tuning_v1": "#ff7f0e", "prefix_tuning": "#2ca02c",
           "prefix_per_task": "#d62728"}
LABELS = {"prompt_tuning": "prompt tuning", "p_tuning_v1": "P-Tuning v1", "prefix_tuning": "prefix tuning",
          "prefix_per_task": "P-Tuning v2"}


def panels(paths: list[Path]) -> dict[tuple[str, float], dict[str, dict]]:
    """(task, budget minutes) -> method -> its cell (score, curve, costs), later files overriding earlier ones."""
    found: dict[tuple[str, float], dict[str, dict]] = defaultdict(dict)
    for path in paths:
        comparison = json.loads(path.read_text(encoding="utf-8"))
        for method, result in comparison["methods"].items():
            for task, cell in result["tasks"].items():
                found[task, comparison["budget_minutes"]][method] = cell
    return dict(sorted(found.items()))


def draw(found: dict[tuple[str, float], dict[str, dict]], output: Path) -> None:
    """One row of panels per budget, one column per task."""
    tasks = sorted({task for task, _ in found})
    budgets = sorted({minutes for _, minutes in found})
    fig = Figure(figsize=(5 * len(tasks), 4.2 * len(budgets)), dpi=100)
    for (task, minutes), cells in found.items():
        ax = fig.add_subplot(len(budgets), len(tasks), budgets.index(minutes) * len(tasks) + tasks.index(task) + 1)
        for method, color in METHODS.items():
            if method in cells and cells[method]["curve"]:
                minutes_at, scores = zip(*cells[method]["curve"])
                ax.plot(minutes_at, [100 * s for s in scores], marker="o", color=color, label=LABELS[method])
        metric = next(iter(cells.values()))["main_metric"]
        ax.set_title(f"{task}, {minutes:g} minutes", fontsize=12)
        ax.set_xlabel("training minutes")
        ax.set_ylabel(f"validation {metric} (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9)
    fig.tight_layout()
    fig.savefig(output, format="png")


def table(found: dict[tuple[str, float], dict[str, dict]]) -> str:
    rows = ["| task, budget | " + " | ".join(LABELS.values()) + " |", "|---|" + "---:|" * len(METHODS)]
    for (task, minutes), cells in found.items():
        scores = [f"{100 * cells[m]['score']:.2f}" if m in cells else "–" for m in METHODS]
        rows.append(f"| {task}, {minutes:g} min | " + " | ".join(scores) + " |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("comparisons", nargs="+", type=Path)
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    found = panels(args.comparisons)
    draw(found, args.output)
    print(table(found))


if __name__ == "__main__":
    main()
