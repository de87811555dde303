"""Per-run evaluation reports: one ``RunReport`` written as JSON for tools, Markdown and HTML for people."""

from __future__ import annotations

import os
from pathlib import Path

from multitask.errors import DataError
from multitask.reporting.html import render_html
from multitask.reporting.markdown import render_markdown
from multitask.reporting.model import (
    RunReport,
    SplitResult,
    TaskReport,
    report_from_json,
    report_to_json,
)
from multitask.utils.atomic import write_json, write_text
from multitask.utils.readback import read_json_file, require_shape

__all__ = [
    "RunReport",
    "SplitResult",
    "TaskReport",
    "load_report",
    "render_html",
    "render_markdown",
    "report_from_json",
    "report_to_json",
    "write_reports",
]


def write_reports(report: RunReport, out_dir: str | os.PathLike, prefix: str = "report") -> dict[str, Path]:
    """Write ``<prefix>.json``, ``.md`` and ``.html`` into ``out_dir``; returns format -> path.

    Each file is replaced atomically, so a dashboard polling the directory during training
    never reads a half-written report.
    """
    out = Path(out_dir)
    paths = {fmt: out / f"{prefix}.{fmt}" for fmt in ("json", "md", "html")}
    write_json(paths["json"], report_to_json(report))
    write_text(paths["md"], render_markdown(report))
    write_text(paths["html"], render_html(report))
    return paths


# What ``report_from_json`` indexes; the values inside are checked as they are converted.
REPORT_SHAPE = {"tasks": {str: {"type": str, "main_metric": str, "metrics": {str: dict}}}}


def load_report(path: str | os.PathLike) -> RunReport:
    """Read a ``report.json`` back; a missing or malformed file raises DataError naming it (one line)."""
    try:
        data = read_json_file(path, "report", error=DataError)
        require_shape(data, REPORT_SHAPE, str(path), "report", error=DataError)
        return report_from_json(data)
    except OSError as exc:
        raise DataError(f"{path}: cannot read report ({exc.strerror or exc})") from None
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError) as exc:
        raise DataError(f"{path}: not a valid report ({type(exc).__name__}: {exc})") from None
