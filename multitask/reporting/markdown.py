"""Markdown report, plus the text formatting it shares with the HTML report.

Both human-facing formats show scores as percentages with two decimals; the helpers here (and, for the header,
header.py) are the single place that decides how a number, a duration or a breakdown table is spelled.
"""

from __future__ import annotations

import math
from typing import Any

from multitask.reporting.header import MISSING, Cell, Header, Table, build_header, duration
from multitask.reporting.model import RunReport, TaskReport

__all__ = ["MISSING", "breakdowns", "detail_notes", "duration", "percent", "render_markdown", "run_title",
           "score_names"]

BREAKDOWN_COLUMNS = ("precision", "recall", "f1", "support")


def percent(value: Any) -> str:
    """A fraction as a percentage with two decimals (0.91234 -> '91.23'); a dash if absent."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return MISSING
    return f"{100 * value:.2f}"


def run_title(report: RunReport) -> str:
    """Report heading; names the run when the metadata knows it."""
    name = report.meta.get("run_name")
    return f"Evaluation report: {name}" if name else "Evaluation report"


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
    """The header: facts and sentences as a list, then each table with its notes."""
    header: Header = build_header(report)
    items = "\n".join(f"- **{_md(label)}:** {_md(text)}" for label, text in header.facts + header.lines)
    return "\n\n".join(part for part in [items, *(_header_table(t) for t in header.tables)] if part)


def _header_table(table: Table) -> str:
    def cell(c: Cell) -> str:
        return f"{_md(c.text)} ({_md(c.note)})" if c.note else _md(c.text)

    parts = [f"### {_md(table.title)}"]
    if table.rows:
        parts.append(_table([_md(c) for c in table.columns], [[cell(c) for c in row] for row in table.rows],
                            table.numeric_from))
    parts += [_md(note) for note in table.notes]
    return "\n\n".join(parts)


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
