"""Markdown report, plus the text formatting it shares with the HTML report.

Both human-facing formats show scores as percentages with two decimals; the helpers here are
the single place that decides how a number, a duration or a breakdown table is spelled.
"""

from __future__ import annotations

import json
import math
from typing import Any

from multitask.reporting.model import RunReport, TaskReport

MISSING = "–"
BREAKDOWN_COLUMNS = ("precision", "recall", "f1", "support")
# Meta keys shown first, with readable names; any other meta key follows in insertion order.
META_LABELS = {
    "encoder": "Encoder",
    "prefix_mode": "Prefix mode",
    "steps": "Steps",
    "best_step": "Best step",
    "wall_time_s": "Wall time",
    "created": "Created",
}


def percent(value: Any) -> str:
    """A fraction as a percentage with two decimals (0.91234 -> '91.23'); a dash if absent."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return MISSING
    return f"{100 * value:.2f}"


def duration(seconds: float) -> str:
    """Seconds as '1h 02m 03s' / '4m 05s' / '12.3s': wall times span seconds to days."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


def run_title(report: RunReport) -> str:
    """Report heading; names the run when the metadata knows it."""
    name = report.meta.get("run_name")
    return f"Evaluation report: {name}" if name else "Evaluation report"


def meta_items(report: RunReport) -> list[tuple[str, str]]:
    """(label, text) pairs for the header, well-known keys first and formatted for reading."""
    meta = {k: v for k, v in report.meta.items() if k != "run_name" and v is not None}
    ordered = [k for k in META_LABELS if k in meta] + [k for k in meta if k not in META_LABELS]
    return [(META_LABELS.get(key, key), _meta_text(key, meta[key])) for key in ordered]


def breakdowns(details: dict[str, Any]) -> list[tuple[str, list[list[str]]]]:
    """(noun, rows) for each ``per_*`` table in a split's details: per_class -> "class", ...

    Each row is [name, precision %, recall %, f1 %, support], ready for either output format.
    """
    tables = []
    for key, value in details.items():
        if key.startswith("per_") and isinstance(value, dict) and value:
            noun = key[len("per_"):].replace("_", " ")
            tables.append((noun, [_breakdown_row(name, stats) for name, stats in value.items()]))
    return tables


def detail_notes(details: dict[str, Any]) -> list[tuple[str, str]]:
    """Scalar details (e.g. QA's ``missing`` count) that have no table of their own."""
    return [(k, str(v)) for k, v in details.items() if isinstance(v, (str, int, float, bool))]


def score_names(task: TaskReport) -> list[str]:
    """All score names of a task, main metric first, so the headline number leads each table."""
    names = dict.fromkeys([task.main_metric])
    for result in task.splits.values():
        names.update(dict.fromkeys(result.scores))
    return list(names)


def render_markdown(report: RunReport) -> str:
    """The whole report as Markdown: header, summary table, then one section per task."""
    parts = [f"# {_md(run_title(report))}", _meta_block(report), "## Summary", _summary_table(report)]
    parts += [_task_section(task) for task in report.tasks.values()]
    return "\n\n".join(p for p in parts if p) + "\n"


def _meta_text(key: str, value: Any) -> str:
    if key == "wall_time_s" and isinstance(value, (int, float)):
        return duration(float(value))
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _breakdown_row(name: str, stats: Any) -> list[str]:
    stats = stats if isinstance(stats, dict) else {}
    support = stats.get("support")
    return [str(name), *(percent(stats.get(k)) for k in BREAKDOWN_COLUMNS[:3]),
            MISSING if support is None else str(support)]


def _md(text: str) -> str:
    """Escape text for a Markdown table cell: pipes would split the cell, '<' could open raw HTML."""
    for char in "\\|`<>":
        text = text.replace(char, "\\" + char)
    return " ".join(text.split())


def _table(header: list[str], rows: list[list[str]], numeric_from: int) -> str:
    """A Markdown table; columns from ``numeric_from`` on are right-aligned so digits line up."""
    align = ["---" if i < numeric_from else "---:" for i in range(len(header))]
    lines = [header, align, *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def _meta_block(report: RunReport) -> str:
    return "\n".join(f"- **{_md(label)}:** {_md(text)}" for label, text in meta_items(report))


def _summary_table(report: RunReport) -> str:
    splits = report.split_names()
    rows = [
        [_md(t.name), _md(t.type), _md(t.main_metric), *(percent(t.main_score(s)) for s in splits)]
        for t in report.tasks.values()
    ]
    aggregate = report.aggregate()
    rows.append(["**Mean**", "", "", *(f"**{percent(aggregate.get(s))}**" for s in splits)])
    header = ["Task", "Type", "Main metric", *(_md(s) for s in splits)]
    return _table(header, rows, numeric_from=3) + "\n\nScores are percentages."


def _task_section(task: TaskReport) -> str:
    parts = [f"## {_md(task.name)} ({_md(task.type)})", f"Main metric: **{_md(task.main_metric)}**"]
    if task.splits:
        parts.append(_scores_table(task))
    for split, result in task.splits.items():
        for noun, rows in breakdowns(result.details):
            header = [_md(noun.capitalize()), "Precision", "Recall", "F1", "Support"]
            parts.append(f"### Per {_md(noun)} — {_md(split)}")
            parts.append(_table(header, [[_md(r[0]), *r[1:]] for r in rows], numeric_from=1))
        notes = detail_notes(result.details)
        if notes:
            parts.append(f"Notes ({_md(split)}): " + ", ".join(f"{_md(k)}: {_md(v)}" for k, v in notes))
    return "\n\n".join(parts)


def _scores_table(task: TaskReport) -> str:
    splits = list(task.splits)
    header = ["Metric", *(f"{_md(s)} (n={task.splits[s].num_examples})" for s in splits)]
    rows = [[_md(m), *(percent(task.splits[s].scores.get(m)) for s in splits)] for m in score_names(task)]
    return _table(header, rows, numeric_from=1)
