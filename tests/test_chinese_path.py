"""The Chinese quick start offline: JSONL reviews with Chinese label names (负面 / 正面) through training, the
report, predict and serve, on a tiny in-process BERT with a Chinese character vocabulary."""

from __future__ import annotations

import json
import random
from pathlib import Path

from fastapi.testclient import TestClient

from multitask.cli import main
from multitask.config import load_config
from multitask.experiment import ExperimentConfig
from multitask.run import load_run
from multitask.serve import Limits, ServeSettings, create_app, load_catalog
from multitask.training.trainer import Trainer
from tests.tiny import tiny_chinese_model

POSITIVE = ["酒店很干净，服务好", "服务热情，值得再来", "电影精彩，推荐", "我们很喜欢"]
NEGATIVE = ["房间脏，失望", "很吵，不会再来", "电影无聊", "服务差，讨厌"]
TASK = """
name: sentiment_zh
type: classification
data:
  train: {path: reviews/train.jsonl, format: jsonl}
  validation: {path: reviews/dev.jsonl, format: jsonl}
fields: {text: text, label: label}
labels: ["0", "1"]
label_names: {"0": 负面, "1": 正面}
max_length: 24
"""


def write_reviews(root: Path) -> None:
    rng = random.Random(0)
    rows = [(text, "1") for text in POSITIVE] + [(text, "0") for text in NEGATIVE]
    (root / "reviews").mkdir(parents=True)
    for split, count in (("train", 48), ("dev", 16)):
        lines = [json.dumps({"text": t, "label": label}, ensure_ascii=False) for t, label in
                 (rng.choice(rows) for _ in range(count))]
        (root / "reviews" / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_chinese_project(root: Path) -> Path:
    write_reviews(root / "data")
    (root / "tasks").mkdir()
    (root / "tasks" / "sentiment.yaml").write_text(TASK.lstrip(), encoding="utf-8")
    encoder = tiny_chinese_model(root / "encoder")
    config = root / "chinese.yaml"
    config.write_text(f"""
name: chinese-sentiment
encoder: {{name: {encoder}}}
tasks: [{{file: tasks/sentiment.yaml, batch_size: 8}}]
optimization: {{max_steps: 30, prefix_lr: 0.05, head_lr: 0.05, warmup_ratio: 0.0}}
evaluation: {{every_steps: 15}}
data_root: {root / "data"}
cache_dir: {root / "cache"}
precision: fp32
device: cpu
seed: 1
""".lstrip(), encoding="utf-8")
    return config


def test_chinese_reviews_from_jsonl_train_report_predict_and_serve(tmp_path):
    config = write_chinese_project(tmp_path)
    run_dir = tmp_path / "run"
    Trainer(load_config(ExperimentConfig, config), run_dir, config_path=config, progress=False).train()

    report = json.loads((run_dir / "report.json").read_text(encoding="utf-8"))
    assert list(report["tasks"]) == ["sentiment_zh"]
    assert "正面" in (run_dir / "report.md").read_text(encoding="utf-8")
    assert "负面" in (run_dir / "report.html").read_text(encoding="utf-8")  # written as characters, not escapes
    saved = [json.loads(line) for line in
             (run_dir / "predictions" / "sentiment_zh.validation.jsonl").read_text(encoding="utf-8").splitlines()]
    assert {row["gold"] for row in saved} == {"负面", "正面"}

    run = load_run(run_dir)
    answers = run.predict("sentiment_zh", ["服务热情，推荐", "房间很脏"])
    assert all(a["label"] in ("负面", "正面") and 0.5 <= a["score"] <= 1.0 for a in answers)
    assert [a["label_id"] for a in answers] == [{"负面": "0", "正面": "1"}[a["label"]] for a in answers]

    inputs = tmp_path / "reviews.jsonl"
    inputs.write_text('{"text": "电影精彩"}\n{"text": "很失望"}\n', encoding="utf-8")
    assert main(["predict", str(run_dir), "--task", "sentiment_zh", "--input", str(inputs),
                 "--output", str(tmp_path / "out.jsonl")]) == 0
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [row["label"] for row in out] == [a["label"] for a in run.predict("sentiment_zh", ["电影精彩", "很失望"])]
    assert "正面" in (tmp_path / "out.jsonl").read_text(encoding="utf-8") or "负面" in out[0]["label"]

    with TestClient(create_app(load_catalog([str(run_dir)]), ServeSettings(limits=Limits()))) as client:
        response = client.post("/v1/predict", json={"task": "sentiment_zh", "inputs": ["服务热情，推荐"]})
        assert response.status_code == 200, response.text
        served = response.json()["results"][0]["predictions"][0]
        assert served["label"] == answers[0]["label"] and abs(served["score"] - answers[0]["score"]) < 1e-5


def test_charts_with_chinese_names_warn_once_where_no_font_draws_them(monkeypatch, caplog, recwarn):
    from multitask.reporting import plots

    def chart() -> bytes:
        fig, ax = plots._figure(4, 3)
        ax.set_xticks([0, 1], ["负面", "正面"])
        return plots.to_png(fig)

    monkeypatch.setattr(plots, "font_family", lambda: ("DejaVu Sans",))  # as on a machine without CJK fonts
    plots._no_font_for_glyphs.cache_clear()
    for _ in range(2):
        assert plots.with_fonts(chart)().startswith(b"\x89PNG")
    lines = [r.getMessage() for r in caplog.records if "no installed font" in r.getMessage()]
    assert len(lines) == 1 and "fonts-noto-cjk" in lines[0]  # one line, not matplotlib's warning per character
    assert not [w for w in recwarn if "missing from font" in str(w.message)]
