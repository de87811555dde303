"""Small data files of all three task types, their task YAMLs, an experiment YAML, and a tiny encoder saved
to a local directory (so the real loading code runs, offline)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from tests.tiny import tiny_encoder, tiny_tokenizer

POSITIVE = ["good movie", "great fun film", "i love this plot", "great acting", "good fun"]
NEGATIVE = ["bad movie", "boring film", "i hate this plot", "bad acting", "boring and bad"]
NER_SENTENCES = [
    (["john", "smith", "was", "born", "in", "paris"], ["B-PER", "I-PER", "O", "O", "O", "B-LOC"]),
    (["london", "is", "a", "city"], ["B-LOC", "O", "O", "O"]),
    (["john", "did", "love", "london"], ["B-PER", "O", "O", "B-LOC"]),
    (["the", "river", "in", "france"], ["O", "O", "O", "B-LOC"]),
]
QA_ITEMS = [
    ("paris is the capital of france .", "what is the capital of france ?", "paris"),
    ("john smith was born in london .", "where was john smith born ?", "london"),
    ("the film was boring .", "what was boring ?", "the film"),
    ("北京是中国的首都", "中国的首都是哪里 ?", "北京"),
]


def write_data(root: Path, seed: int = 0) -> None:
    rng = random.Random(seed)
    rows = [(text, "1") for text in POSITIVE] + [(text, "0") for text in NEGATIVE]
    for split, count in (("train", 40), ("dev", 12)):
        lines = ["sentence\tlabel"] + [f"{t}\t{label}" for t, label in (rng.choice(rows) for _ in range(count))]
        (root / "cls").mkdir(parents=True, exist_ok=True)
        (root / "cls" / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for split, count in (("train", 24), ("dev", 8)):
        blocks = []
        for tokens, tags in (rng.choice(NER_SENTENCES) for _ in range(count)):
            blocks.append("\n".join(f"{tok} {tag}" for tok, tag in zip(tokens, tags)))
        (root / "ner").mkdir(parents=True, exist_ok=True)
        (root / "ner" / f"{split}.txt").write_text("\n\n".join(blocks) + "\n", encoding="utf-8")
    articles = []
    for index in range(8):
        context, question, answer = QA_ITEMS[index % len(QA_ITEMS)]
        qas = [{"id": f"q{index}", "question": question,
                "answers": [{"text": answer, "answer_start": context.index(answer)}]}]
        articles.append({"title": f"article{index}", "paragraphs": [{"context": context, "qas": qas}]})
    (root / "qa").mkdir(parents=True, exist_ok=True)
    (root / "qa" / "data.json").write_text(json.dumps({"version": "1.1", "data": articles}), encoding="utf-8")


TASK_YAMLS = {
    "cls.yaml": """
name: cls
type: classification
data:
  train: {path: cls/train.tsv, format: tsv}
  validation: {path: cls/dev.tsv, format: tsv}
fields: {text: sentence, label: label}
max_length: 16
""",
    "ner.yaml": """
name: ner
type: ner
data:
  train: {path: ner/train.txt, format: conll}
  validation: {path: ner/dev.txt, format: conll}
max_length: 16
""",
    "qa.yaml": """
name: qa
type: qa
data:
  train: {path: qa/data.json, format: squad}
  carve: {validation_fraction: 0.25, group_field: title, seed: 1}
max_length: 32
options: {doc_stride: 8, max_answer_length: 6, max_question_length: 12}
""",
}


def write_project(root: Path, mode: str = "per_task", max_steps: int = 12) -> Path:
    """Data, tasks/, a saved tiny encoder and configs/exp.yaml under ``root``; returns the config path."""
    data = root / "data"
    write_data(data)
    (root / "tasks").mkdir(parents=True, exist_ok=True)
    for name, text in TASK_YAMLS.items():
        (root / "tasks" / name).write_text(text.lstrip(), encoding="utf-8")
    encoder_dir = root / "encoder"
    if not encoder_dir.exists():
        tiny_encoder("bert").save_pretrained(encoder_dir)
        tiny_tokenizer(encoder_dir)
    (root / "configs").mkdir(parents=True, exist_ok=True)
    config = root / "configs" / "exp.yaml"
    config.write_text(f"""
name: tiny
encoder: {{name: {encoder_dir}}}
prefix: {{mode: {mode}, prefix: {{length: 4, mlp_hidden_size: 16}}}}
tasks:
  - {{file: ../tasks/cls.yaml, batch_size: 8}}
  - {{file: ../tasks/ner.yaml, batch_size: 4}}
  - {{file: ../tasks/qa.yaml, batch_size: 4}}
optimization: {{max_steps: {max_steps}, prefix_lr: 0.01, head_lr: 0.01, warmup_ratio: 0.0}}
evaluation: {{every_steps: 6, batch_size: 8}}
data_root: {data}
output_dir: {root / "runs" / "tiny"}
cache_dir: {root / "cache"}
seed: 3
precision: fp32
device: cpu
""".lstrip(), encoding="utf-8")
    return config
