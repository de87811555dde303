"""Reporting: JSON shape and round trip, Markdown/HTML content, self-contained HTML, atomic writes."""

from __future__ import annotations

import json
import re

import pytest

from multitask.errors import DataError
from multitask.reporting import (
    RunReport,
    SplitResult,
    TaskReport,
    load_report,
    render_html,
    render_markdown,
    report_from_json,
    report_to_json,
    write_reports,
)
from multitask.reporting import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _stats(p: float, r: float, f: float, n: int) -> dict:
    return {"precision": p, "recall": r, "f1": f, "support": n}


def _classification(name: str = "sentiment") -> TaskReport:
    labels = ["negative", "neutral", "positive"]
    matrix = [[40, 5, 5], [4, 30, 6], [2, 3, 55]]
    details = {
        "per_class": {
            "negative": _stats(0.8696, 0.8, 0.8333, 50),
            "neutral": _stats(0.7895, 0.75, 0.7692, 40),
            "positive": _stats(0.8485, 0.9167, 0.8813, 60),
        },
        "confusion_matrix": {"labels": labels, "matrix": matrix},
    }
    return TaskReport(
        name=name,
        type="classification",
        main_metric="accuracy",
        splits={
            "validation": SplitResult({"accuracy": 0.83333, "macro_f1": 0.8279}, details, 150),
            "train": SplitResult({"accuracy": 0.95, "macro_f1": 0.94}, {}, 1200),
        },
        metric_history=[(100, "validation", 0.7), (200, "validation", 0.8), (300, "validation", 0.83333)],
        loss_history=[(step, 1.2 / (1 + step / 50)) for step in range(0, 300, 5)],
    )


def _ner() -> TaskReport:
    details = {"per_type": {"PER": _stats(0.93, 0.91, 0.92, 300), "LOC": _stats(0.88, 0.86, 0.87, 250)}}
    return TaskReport(
        name="conll",
        type="ner",
        main_metric="f1",
        splits={"validation": SplitResult({"f1": 0.9, "precision": 0.91, "recall": 0.89}, details, 500)},
        metric_history=[(100, "validation", 0.8), (300, "validation", 0.9)],
        loss_history=[(100, 0.5), (200, 0.3), (300, 0.2)],
    )


def _qa() -> TaskReport:
    return TaskReport(
        name="squad",
        type="qa",
        main_metric="f1",
        splits={
            "validation": SplitResult({"exact_match": 0.7, "f1": 0.8}, {"missing": 2}, 400),
            "train": SplitResult({"exact_match": 0.75, "f1": 0.85}, {}, 4000),
        },
    )


@pytest.fixture
def report() -> RunReport:
    meta = {"run_name": "demo", "encoder": "bert-base-uncased", "prefix_mode": "per_task",
            "steps": 300, "wall_time_s": 3725.4, "best_step": 300, "created": "2024-01-01T00:00:00"}
    tasks = [_classification(), _ner(), _qa()]
    return RunReport(tasks={t.name: t for t in tasks}, meta=meta)


def test_json_has_documented_shape_and_aggregate(report: RunReport, tmp_path) -> None:
    paths = write_reports(report, tmp_path)
    assert {p.name for p in paths.values()} == {"report.json", "report.md", "report.html"}
    data = json.loads(paths["json"].read_text())
    assert set(data) >= {"tasks", "aggregate", "meta"}
    ner = data["tasks"]["conll"]
    assert ner["type"] == "ner" and ner["main_metric"] == "f1"
    assert ner["metrics"] == {"validation": {"f1": 0.9, "precision": 0.91, "recall": 0.89}}
    assert ner["details"]["validation"]["per_type"]["PER"]["f1"] == 0.92
    assert ner["num_examples"] == {"validation": 500}
    assert ner["history"] == {"metric": [[100, "validation", 0.8], [300, "validation", 0.9]],
                              "loss": [[100, 0.5], [200, 0.3], [300, 0.2]]}
    assert data["aggregate"]["validation"] == pytest.approx((0.83333 + 0.9 + 0.8) / 3)
    assert data["aggregate"]["train"] == pytest.approx((0.95 + 0.85) / 2)  # conll has no train split
    assert data["meta"]["encoder"] == "bert-base-uncased"


def test_json_round_trip(report: RunReport, tmp_path) -> None:
    assert report_from_json(json.loads(json.dumps(report_to_json(report)))) == report
    paths = write_reports(report, tmp_path)
    assert load_report(paths["json"]) == report


def test_load_report_names_bad_file(tmp_path) -> None:
    bad = tmp_path / "report.json"
    bad.write_text('{"tasks": {"x": {}}}')
    with pytest.raises(DataError, match="report.json"):
        load_report(bad)
    with pytest.raises(DataError, match="missing.json"):
        load_report(tmp_path / "missing.json")


def test_markdown_lists_tasks_as_percentages(report: RunReport) -> None:
    text = render_markdown(report)
    for name in ("sentiment", "conll", "squad"):
        assert name in text
    assert "| sentiment | classification | accuracy | 83.33 | 95.00 |" in text
    assert "bert-base-uncased" in text and "1h 02m 05s" in text
    assert "| negative | 86.96 | 80.00 | 83.33 | 50 |" in text  # per-class row
    assert "| PER | 93.00 | 91.00 | 92.00 | 300 |" in text  # per-type row
    assert "**84.44**" in text  # mean of validation main metrics
    assert "missing: 2" in text


def test_html_is_self_contained(report: RunReport) -> None:
    page = render_html(report)
    # loss, metric, confusion matrix and NER F1 charts
    assert page.count('src="data:image/png;base64,') == 4
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page
    assert "83.33" in page and "92.00" in page


def test_html_escapes_task_names(report: RunReport) -> None:
    evil = _classification(name="<script>alert(1)</script>")
    report.tasks = {evil.name: evil}
    page = render_html(report)
    assert "<script" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "\\<script\\>" in render_markdown(report)


def test_empty_histories_and_details_still_render(tmp_path) -> None:
    task = TaskReport("bare", "qa", "f1", {"validation": SplitResult({"f1": 0.5}, {}, 10)})
    report = RunReport(tasks={"bare": task}, meta={})
    assert plots.loss_plot(report) is None and plots.metric_plot(report) is None
    paths = write_reports(report, tmp_path, prefix="bare")
    page = paths["html"].read_text()
    assert "data:image/png" not in page and "Training" not in page
    assert "50.00" in paths["md"].read_text()
    assert RunReport(tasks={}, meta={}).aggregate() == {}
    assert "Evaluation report" in render_html(RunReport(tasks={}, meta={}))


def test_rewriting_leaves_no_temp_files(report: RunReport, tmp_path) -> None:
    write_reports(report, tmp_path)
    report.meta["steps"] = 600
    write_reports(report, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html", "report.json", "report.md"]
    assert load_report(tmp_path / "report.json").meta["steps"] == 600


def test_plots_return_png_and_skip_huge_confusion_matrices() -> None:
    task = _classification()
    assert plots.confusion_plot(task, "validation").startswith(PNG_MAGIC)
    assert plots.confusion_plot(task, "train") is None  # no matrix on that split
    assert plots.entity_f1_plot(_ner(), "validation").startswith(PNG_MAGIC)
    n = plots.MAX_CONFUSION_LABELS + 1
    labels = [f"label{i}" for i in range(n)]
    task.splits["validation"].details["confusion_matrix"] = {
        "labels": labels, "matrix": [[int(i == j) for j in range(n)] for i in range(n)]}
    assert plots.confusion_plot(task, "validation") is None
    assert f"omitted: {n} labels" in render_html(RunReport({task.name: task}, {}))


def test_smoothing_keeps_short_series_and_tames_noise() -> None:
    assert plots.smooth([1.0, 3.0, 2.0]) == [1.0, 3.0, 2.0]
    noisy = [1.0 if i % 2 else 0.0 for i in range(1000)]
    smoothed = plots.smooth(noisy)
    assert len(smoothed) == 1000 and max(smoothed[500:]) - min(smoothed[500:]) < 0.2
