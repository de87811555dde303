"""Single-file HTML report: inline CSS, charts as base64 PNG data URIs, no scripts.

One self-contained file can be mailed, attached to an issue or opened from a cluster's scratch
disk without a web server or network access. Every piece of text from the report goes through
``html.escape``: task and label names come from user data files.
"""

from __future__ import annotations

import base64
from html import escape

from multitask.reporting import plots
from multitask.reporting.header import Cell, Table, build_header
from multitask.reporting.markdown import (
    breakdowns,
    detail_notes,
    percent,
    run_title,
    score_names,
)
from multitask.reporting.model import RunReport, TaskReport

# Breakdown tables longer than this start collapsed, so one 50-class task does not bury the rest.
OPEN_TABLE_ROWS = 20

CSS = """
body { font: 14px/1.45 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: #1f2328; margin: 0; background: #f6f8fa; }
main { max-width: 1100px; margin: 0 auto; padding: 24px 32px 48px; background: #fff; }
h1 { font-size: 24px; margin: 0 0 8px; overflow-wrap: anywhere; }
h2 { font-size: 19px; margin: 36px 0 8px; padding-top: 12px; border-top: 1px solid #d0d7de; overflow-wrap: anywhere; }
h3 { font-size: 15px; margin: 20px 0 6px; }
.meta { display: flex; flex-wrap: wrap; gap: 4px 20px; margin: 0 0 8px; padding: 0;
        list-style: none; color: #57606a; }
.meta b { color: #1f2328; font-weight: 600; }
.facts { display: grid; grid-template-columns: max-content minmax(0, 1fr); gap: 3px 16px; margin: 10px 0 8px; }
.facts dt { font-weight: 600; }
.facts dd { margin: 0; color: #57606a; overflow-wrap: anywhere; }
.scroll { max-width: 100%; overflow-x: auto; }
.src { display: block; color: #57606a; font-size: 12px; font-weight: 400; line-height: 1.25; }
.src.set { color: #9a6700; font-weight: 600; }
.header-table th, .header-table td { padding: 4px 10px; vertical-align: top; }
.type { display: inline-block; padding: 1px 8px; border-radius: 10px; background: #ddf4ff;
        color: #0969da; font-size: 12px; font-weight: 500; vertical-align: middle; }
table { border-collapse: collapse; margin: 6px 0 12px; font-variant-numeric: tabular-nums; }
th, td { padding: 4px 12px; border-bottom: 1px solid #d8dee4; text-align: left; }
th { background: #f6f8fa; font-weight: 600; }
td.num, th.num { text-align: right; }
tr.mean td { font-weight: 700; border-top: 2px solid #8c959f; }
tr.main td { font-weight: 600; }
.note { color: #57606a; font-size: 13px; }
.row { display: flex; flex-wrap: wrap; gap: 12px 32px; align-items: flex-start; }
.chart { max-width: 100%; height: auto; }
details summary { cursor: pointer; color: #0969da; margin: 8px 0; }
a { color: #0969da; text-decoration: none; }
@media (max-width: 700px) { main { padding: 16px 12px 32px; } .facts { grid-template-columns: minmax(0, 1fr); }
                            .facts dd { margin-bottom: 6px; } }
"""


def render_html(report: RunReport) -> str:
    """The whole report as one HTML document (string), ready to be written to disk."""
    body = [
        f"<h1>{escape(run_title(report))}</h1>",
        _header(report),
        "<h2>Summary</h2>",
        _summary_table(report),
        '<p class="note">Scores are percentages; the mean row averages each split over the tasks '
        "evaluated on it.</p>",
        _training_charts(report),
        *(_task_section(i, task) for i, task in enumerate(report.tasks.values())),
    ]
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{escape(run_title(report))}</title>\n<style>{CSS}</style>\n</head>\n"
        "<body>\n<main>\n" + "\n".join(part for part in body if part) + "\n</main>\n</body>\n</html>\n"
    )


def _img(png: bytes | None, alt: str) -> str:
    """An inline <img> for a chart; empty when the chart had nothing to draw."""
    if png is None:
        return ""
    data = base64.b64encode(png).decode("ascii")
    return f'<img class="chart" alt="{escape(alt)}" src="data:image/png;base64,{data}">'


def _table(
    header: list[str], rows: list[list[str]], numeric_from: int, row_classes: list[str] | None = None,
    css_class: str = "",
) -> str:
    """An HTML table from already-escaped cells; columns from ``numeric_from`` on are right-aligned."""

    def cells(tag: str, values: list[str]) -> str:
        return "".join(
            f'<{tag} class="num">{v}</{tag}>' if i >= numeric_from else f"<{tag}>{v}</{tag}>"
            for i, v in enumerate(values)
        )

    classes = row_classes or [""] * len(rows)
    body = "".join(
        f'<tr class="{cls}">{cells("td", row)}</tr>' if cls else f"<tr>{cells('td', row)}</tr>"
        for cls, row in zip(classes, rows)
    )
    table = f'<table class="{css_class}">' if css_class else "<table>"
    head = f"<thead><tr>{cells('th', header)}</tr></thead>"
    return f'<div class="scroll">{table}{head}<tbody>{body}</tbody></table></div>'


def _header(report: RunReport) -> str:
    """Short facts in a row, then one line per longer fact (label: sentence), then the settings tables."""
    header = build_header(report)
    facts = "".join(f"<li><b>{escape(k)}:</b> {escape(v)}</li>" for k, v in header.facts)
    lines = "".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in header.lines)
    parts = [f'<ul class="meta">{facts}</ul>' if facts else "", f'<dl class="facts">{lines}</dl>' if lines else ""]
    parts += [_header_table(table) for table in header.tables]
    return "\n".join(part for part in parts if part)


def _header_table(table: Table) -> str:
    def cell(c: Cell) -> str:
        if not c.note:
            return escape(c.text)
        return f'{escape(c.text)}<span class="src{" set" if c.marked else ""}">{escape(c.note)}</span>'

    parts = [f"<h3>{escape(table.title)}</h3>"]
    if table.rows:
        parts.append(_table([escape(c) for c in table.columns], [[cell(c) for c in row] for row in table.rows],
                            table.numeric_from, css_class="header-table"))
    parts += [f'<p class="note">{escape(note)}</p>' for note in table.notes]
    return "\n".join(parts)


def _summary_table(report: RunReport) -> str:
    splits = report.split_names()
    rows = [
        [f'<a href="#task-{i}">{escape(t.name)}</a>', escape(t.type), escape(t.main_metric),
         *(percent(t.main_score(s)) for s in splits)]
        for i, t in enumerate(report.tasks.values())
    ]
    aggregate = report.aggregate()
    rows.append(["Mean", "", "", *(percent(aggregate.get(s)) for s in splits)])
    header = ["Task", "Type", "Main metric", *(escape(s) for s in splits)]
    return _table(header, rows, numeric_from=3, row_classes=[""] * (len(rows) - 1) + ["mean"])


def _training_charts(report: RunReport) -> str:
    """Loss and metric curves; absent entirely when the run recorded no history."""
    charts = [
        _img(plots.loss_plot(report), "training loss per task"),
        _img(plots.metric_plot(report), "main metric per task over training"),
    ]
    charts = [c for c in charts if c]
    return "<h2>Training</h2>\n" + "\n".join(charts) if charts else ""


def _task_section(index: int, task: TaskReport) -> str:
    parts = [
        f'<h2 id="task-{index}">{escape(task.name)} <span class="type">{escape(task.type)}</span></h2>',
        f'<p class="note">Main metric: <b>{escape(task.main_metric)}</b></p>',
    ]
    if task.splits:
        parts.append(_scores_table(task))
    parts += [_split_details(task, split) for split in task.splits]
    return "\n".join(part for part in parts if part)


def _scores_table(task: TaskReport) -> str:
    splits = list(task.splits)
    header = ["Metric", *(f"{escape(s)} <span class=\"note\">(n={task.splits[s].num_examples})</span>"
                          for s in splits)]
    rows = [[escape(m), *(percent(task.splits[s].scores.get(m)) for s in splits)] for m in score_names(task)]
    classes = ["main" if m == task.main_metric else "" for m in score_names(task)]
    return _table(header, rows, numeric_from=1, row_classes=classes)


def _split_details(task: TaskReport, split: str) -> str:
    """Breakdown tables of one split, each next to its chart (confusion matrix or F1 bars)."""
    details = task.splits[split].details
    charts = _img(plots.confusion_plot(task, split), f"{task.name} confusion matrix ({split})")
    charts += _img(plots.entity_f1_plot(task, split), f"{task.name} F1 per entity type ({split})")
    tables = [_breakdown(noun, rows, split) for noun, rows in breakdowns(details)]
    notes = detail_notes(details)
    parts = [f'<div class="row"><div>{"".join(tables)}</div>{charts}</div>' if tables or charts else ""]
    if notes:
        text = ", ".join(f"{escape(k)}: {escape(v)}" for k, v in notes)
        parts.append(f'<p class="note">Notes ({escape(split)}): {text}</p>')
    labels, _ = plots.confusion_data(task, split)
    if len(labels) > plots.MAX_CONFUSION_LABELS:
        parts.append(f'<p class="note">Confusion matrix ({escape(split)}) omitted: {len(labels)} labels.</p>')
    return "\n".join(part for part in parts if part)


def _breakdown(noun: str, rows: list[list[str]], split: str) -> str:
    header = [escape(noun.capitalize()), "Precision", "Recall", "F1", "Support"]
    table = _table(header, [[escape(r[0]), *r[1:]] for r in rows], numeric_from=1)
    title = f"Per {escape(noun)} — {escape(split)}"
    if len(rows) <= OPEN_TABLE_ROWS:
        return f"<h3>{title}</h3>{table}"
    return f"<details><summary>{title} ({len(rows)} rows)</summary>{table}</details>"
