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


# --- the header: settings, cosines, cache counters and times in words and numbers ---------------------------------

def _settings_sentence(task: str, kind: str, length_source: str = "") -> str:
    """What TaskTuning.describe() writes into meta["settings"]."""
    length = f"prefix_length 32 ({length_source})" if length_source else f"prefix_length 16 ({kind} default)"
    return (f"task {task}: {length}, reparameterize False ({kind} default), prefix_dropout 0.0 ({kind} default), "
            f"prefix_lr 0.02 ({kind} default), head_lr 0.001 (experiment), warmup_ratio 0.06 ({kind} default), "
            f"prefix_attention joint ({kind} default)")


FULL_META = {
    "run_name": "demo", "encoder": "offline:minilm", "method": "prefix", "prefix_mode": "per_task",
    "steps": 1600, "best_step": 1600, "wall_time_s": 1213.957, "train_time_s": 938.061,
    "evaluation_time_s": 243.456, "preparation_time_s": 35.143,
    "evaluation_minutes": {"800": 9.7857, "1600": 15.6343},
    "precision": "fp32", "precision_reason": "auto: no native bf16 on this cpu", "device": "cpu", "tf32": False,
    "frozen_encoder_dtype": None,
    "settings": {"sentiment": _settings_sentence("sentiment", "classification", "task file"),
                 "conll": _settings_sentence("conll", "ner"), "squad": _settings_sentence("squad", "qa")},
    "prefix_init_cosine": {"task_sentiment": -0.00045822898391634226, "task_conll": 0.006545408628880978,
                           "task_squad": -4.702011574408971e-05},
    "parameters": "prefix parameters 184,320 (0.817% of encoder) | head parameters 5,005 (0.022%) | "
                  "encoder parameters 22,565,376 (0 trainable) | trainable total 189,325 (0.839%)",
    "trainable_parameters": 189325, "encoder_parameters": 22565376, "train_examples_seen": 49738,
    "peak_rss_bytes": 3161468928,
    "frozen_cache": {"boundaries": {"sentiment": 3, "squad": 3}, "location": "host", "hits": 14016,
                     "misses": 21456, "stored_inputs": 21456, "stored_bytes": 376825344},
    "peak_gpu_memory_bytes": None,
    "base": {"path": "/runs/base", "checkpoint_sha256": "ec72da728fe47076f072be0f13ab054d", "tasks": ["a", "b"]},
    "transfer": {"conll": {"setting": "auto", "source": "task_a",
                           "trial": {"steps": 40, "folds": 3, "criterion": "metric", "metric": "f1"},
                           "held_back": {"none": {"metric": 0.412, "loss": 0.48},
                                         "task_a": {"metric": 0.556, "loss": 0.2555}},
                           "skipped": {"task_b": "prefix 'task_b' lives in layers [3, 4, 5], so it cannot start a "
                                                 "prefix in layers [0, 1, 2, 3, 4, 5]"}, "head_from": None},
                 "wnut": {"setting": "auto", "source": "task_a", "head_from": None,
                          "trial": {"criterion": "evidence", "metric": "f1", "examples": 100, "within_noise": [],
                                    "prior": "same_type", "same_type": ["task_a"], "trials_best": "task_a"},
                          "held_back": {"none": {"evidence": 1.370755}, "task_a": {"evidence": 1.401647}}}},
    "some_new_counter": {"nested": {"x": 1}, "listed": [1, 2]},
}
RAW_REPRS = ("{'", '{"', "['", '["', "[(", "':", '":', "}", "]", "e-0", "e-1", "None", "True", "False")


def _full_report() -> RunReport:
    tasks = [_classification(), _ner(), _qa()]
    return RunReport(tasks={t.name: t for t in tasks}, meta=json.loads(json.dumps(FULL_META)))


def _html_header_text(page: str) -> str:
    """The text a person sees above the summary: tags dropped, entities decoded."""
    import html as html_module

    header = page[page.index("<main>"):page.index("<h2>Summary</h2>")]
    return html_module.unescape(re.sub(r"<[^>]+>", " ", header))


def test_header_has_no_raw_dicts_or_lists() -> None:
    report = _full_report()
    html_text = _html_header_text(render_html(report))
    markdown = render_markdown(report)
    md_header = markdown[:markdown.index("## Summary")]
    for text in (html_text, md_header):
        for raw in RAW_REPRS:
            assert raw not in text, (raw, text)
        assert "3161468928" not in text and "376825344" not in text and "1213.957" not in text


def test_header_states_times_cache_and_cosines_in_words() -> None:
    text = " ".join(_html_header_text(render_html(_full_report())).split())
    assert "20m 14s in all: preparation 35.1s, training 15m 38s, evaluation 4m 03s (20% of the wall time)" in text
    assert "every 800 steps from step 800 to 1,600, after 9.8 and 15.6 min of training" in text
    assert "14,016 hits, 21,456 misses (40% of lookups hit); 21,456 inputs, 359.4 MB stored in host memory" in text
    assert "layers below 3 cached for sentiment and squad" in text
    assert "task_sentiment -0.0005, task_conll 0.0065, task_squad 0.0000" in text
    assert "2.9 GB in RAM" in text and "49,738" in text and "fp32 (auto: no native bf16 on this cpu)" in text
    assert "/runs/base (checkpoint ec72da728fe4…, tasks a and b)" in text
    assert "none 0.412 (loss 0.480), task_a 0.556 (loss 0.256)" in text
    assert "auto trained each candidate 40 steps in each of 3 held-back fold(s) of the training data and chose by f1" \
        in text
    assert "none evidence 1.3708, task_a evidence 1.4016" in text
    assert "wnut: auto scored each candidate, untrained, by the evidence of a linear head on its features over 100 " \
        "training examples" in text
    assert "lives in layers 3–5" in text and "layers 0–5" in text
    assert "nested (x 1), listed (1, 2)" in text  # an unknown key, still readable


def test_settings_table_lists_each_task_with_sources() -> None:
    report = _full_report()
    page = render_html(report)
    table = page[page.index("<h3>Settings</h3>"):]
    table = table[:table.index("</table>")]
    rows = re.findall(r"<tr>(.*?)</tr>", table)
    assert len(rows) == 4  # header + one row per task
    assert "Prefix length" in rows[0] and "Head LR" in rows[0]
    for row, task in zip(rows[1:], ("sentiment", "conll", "squad")):
        assert row.startswith(f"<td>{task}</td>")
        assert row.count('class="src') == 7  # every value says where it came from
    assert '32<span class="src set">task file</span>' in rows[1]  # a chosen value stands out
    assert '0.001<span class="src set">experiment</span>' in rows[2]
    assert '16<span class="src">default</span>' in rows[2] and "no<span" in rows[2]
    markdown = render_markdown(report)
    assert "| Task | Prefix length | Reparameterize |" in markdown
    assert "| sentiment | 32 (task file) | no (default) |" in markdown
    assert "| conll | 16 (default) | no (default) | 0.0 (default) | 0.02 (default) | 0.001 (experiment) |" in markdown


def test_settings_of_a_task_type_not_in_the_report_keep_their_full_source() -> None:
    report = RunReport(tasks={}, meta={"settings": {"x": _settings_sentence("x", "ner")}})
    assert "| x | 16 (ner default) |" in render_markdown(report)


def test_old_and_odd_reports_still_render(tmp_path) -> None:
    old = {"tasks": {"sst2": {"type": "classification", "main_metric": "accuracy",
                              "metrics": {"validation": {"accuracy": 0.9}}}},
           "meta": {"run_name": "old", "encoder": "bert", "wall_time_s": 75.0}}
    path = tmp_path / "report.json"
    path.write_text(json.dumps(old))
    report = load_report(path)
    page, markdown = render_html(report), render_markdown(report)
    assert "Settings" not in page and "1m 15s" in page and "90.00" in page
    older_transfer = {"conll": {"setting": "auto", "source": "task_a",
                                "held_back_train_loss": {"none": 0.48, "task_a": 0.2555}}}
    assert "none 0.480, task_a 0.256" in render_markdown(RunReport(tasks={}, meta={"transfer": older_transfer}))
    assert "1m 15s" in markdown and "Settings" not in markdown
    odd = RunReport(tasks={}, meta={
        "settings": {"a": "something the parser does not know", "b": {"prefix_length": {"value": 8, "source": "x"}}},
        "frozen_cache": {"hits": 3}, "prefix_init_cosine": {}, "evaluation_minutes": {"late": "?"},
        "transfer": {"t": "none"}, "base": "elsewhere", "parameters": None, "trainable_parameters": 10})
    text = _html_header_text(render_html(odd))
    assert "a: something the parser does not know" in text and "8 x" in " ".join(text.split())
    assert "Frozen-layer cache" in text and "Grown from" in text and "10 trainable" in text
    assert "late ?" in text and "t: none" in text
    for raw in ("{'", "['", "[("):
        assert raw not in text and raw not in render_markdown(odd)
    write_reports(odd, tmp_path, prefix="odd")


def test_header_tables_scroll_inside_their_box() -> None:
    page = render_html(_full_report())
    assert page.count("<table") == page.count('<div class="scroll"><table')
    assert ".scroll { max-width: 100%; overflow-x: auto; }" in page
