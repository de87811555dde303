"""Extractive question answering (SQuAD v1/v2, CMRC 2018): answer spans over sliding context windows."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from multitask.data.features import CharSpan, Feature, QAFeature
from multitask.data.records import Record
from multitask.errors import ConfigError, DataError
from multitask.metrics import MetricResult, squad_metrics
from multitask.tasks.base import TASK_TYPES, TaskType
from multitask.tasks.config import TaskConfig
from multitask.tuning import TuningDefaults

NO_ANSWER: tuple[int, int] = (0, 0)  # the target of windows without the answer: the first ([CLS] / <s>) token


@dataclass
class QAOptions:
    doc_stride: int = field(default=128, metadata={"help": "Tokens of overlap between consecutive context windows."})
    max_answer_length: int = field(default=30, metadata={"help": "Longest answer, in tokens, considered at decoding."})
    n_best: int = field(default=20, metadata={"help": "Top start and end positions per window paired at decoding."})
    language: Literal["en", "zh"] = field(
        default="en", metadata={"help": "Metric flavour: en (official SQuAD) or zh (CMRC 2018 character tokens)."}
    )
    allow_no_answer: bool = field(
        default=False, metadata={"help": "SQuAD v2: train on unanswerable questions and predict no answer."}
    )
    no_answer_threshold: float = field(
        default=0.0, metadata={"help": "Predict no answer when null score - best span score exceeds this."}
    )
    max_question_length: int = field(
        default=64, metadata={"help": "Cut questions to this many tokens so they leave room for the context."}
    )

    def __post_init__(self) -> None:
        for name in ("max_answer_length", "n_best", "max_question_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.doc_stride < 0:
            raise ValueError(f"doc_stride must be >= 0, got {self.doc_stride}")


@dataclass
class QAExample:
    guid: str
    question: str
    context: str
    answers: list[tuple[str, int]] | None = None  # (text, answer_start); None: unlabelled, []: unanswerable
    title: str | None = None


@dataclass
class Span:
    score: float
    start: int  # character offsets in the context
    end: int


def log_sum_exp(values: np.ndarray) -> float:
    """log(sum(exp(values))) shifted by the maximum, so it never overflows and is never below the maximum."""
    top = float(values.max())
    return top + math.log(float(np.exp(values - top).sum()))


def parse_answers(value: Any, source: str) -> list[tuple[str, int]]:
    """Answers as the squad reader gives them (list of {text, answer_start}) or as hub datasets do (dict of lists)."""
    if isinstance(value, dict):
        texts, starts = value.get("text"), value.get("answer_start")
        if not (isinstance(texts, list) and isinstance(starts, list) and len(texts) == len(starts)):
            raise DataError(f"{source}: 'answers' as an object needs equally long lists 'text' and 'answer_start'")
        value = [{"text": text, "answer_start": start} for text, start in zip(texts, starts)]
    if not isinstance(value, list):
        raise DataError(f"{source}: 'answers' must be a list of {{text, answer_start}} objects")
    if not all(map(is_answer, value)):
        raise DataError(f"{source}: each answer needs a string 'text' and an integer 'answer_start'")
    return [(answer["text"], int(answer["answer_start"])) for answer in value]


def is_answer(answer: Any) -> bool:
    """A {text: str, answer_start: int} mapping (a bool is no answer_start, though Python calls it an int)."""
    if not isinstance(answer, dict):
        return False
    start = answer.get("answer_start")
    return isinstance(answer.get("text"), str) and isinstance(start, (int, np.integer)) and not isinstance(start, bool)


def answer_chars(example: QAExample) -> CharSpan | None:
    """Character span of the first answer found verbatim at its answer_start (CMRC alternatives use -1)."""
    for text, start in example.answers or ():
        if start >= 0 and text.strip() and example.context[start : start + len(text)] == text:
            return start + len(text) - len(text.lstrip()), start + len(text.rstrip())
    return None


def token_span(offsets: Sequence[CharSpan | None], start_char: int, end_char: int) -> tuple[int, int]:
    """Token indices covering the characters, or NO_ANSWER when the window does not hold all of them."""
    context = [i for i, span in enumerate(offsets) if span is not None]
    if not context or offsets[context[0]][0] > start_char or offsets[context[-1]][1] < end_char:
        return NO_ANSWER
    start = max(i for i in context if offsets[i][0] <= start_char)
    end = min(i for i in context if offsets[i][1] >= end_char)
    return start, end


def trimmed(span: CharSpan, context: str) -> CharSpan | None:
    """Drop whitespace that byte-level BPE offsets include (" Paris"); None for a token of whitespace only."""
    start, end = span
    while start < end and context[start].isspace():
        start += 1
    while end > start and context[end - 1].isspace():
        end -= 1
    return (start, end) if start < end else None


def context_offsets(sequence_ids: list[int | None], offsets: list[CharSpan], context: str) -> list[CharSpan | None]:
    return [trimmed(span, context) if seq == 1 else None for seq, span in zip(sequence_ids, offsets)]


def truncate_questions(questions: list[str], tokenizer, max_tokens: int) -> list[str]:
    """Cut each question after its max_tokens-th token, so a long question cannot crowd the context out."""
    encoded = tokenizer(questions, add_special_tokens=False, return_offsets_mapping=True)
    return [
        question if len(spans) <= max_tokens else question[: spans[max_tokens - 1][1]]
        for question, spans in zip(questions, encoded["offset_mapping"])
    ]


class QATask(TaskType):
    name = "qa"
    accepts_plain_text = False
    input_schema = {
        "type": "object", "required": ["question", "context"],
        "properties": {"question": {"type": "string"}, "context": {"type": "string"}, "id": {"type": "string"}},
    }
    head_kind = "span"
    # Separate attention to the prefix: ahead of joint on every measured all-layer ner/qa run (docs/tuning.md).
    tuning_defaults = TuningDefaults(prefix_attention="separate")
    required_fields = ("question", "context")
    optional_fields = ("answers", "id", "title")
    metric_names = ("f1", "exact_match")
    default_main_metric = "f1"
    options_type = QAOptions
    has_labels = False

    def __init__(self, config: TaskConfig, options: QAOptions | None = None) -> None:
        super().__init__(config, options if options is not None else QAOptions())

    @property
    def num_outputs(self) -> int:
        return 2

    # ---- records -> examples
    def example_from_record(self, record: Record, index: int) -> QAExample:
        answers = self.field_value(record, "answers", required=False)
        guid = self.field_value(record, "id", required=False)
        title = self.field_value(record, "title", required=False)
        return QAExample(
            str(guid if guid is not None else index),
            str(self.field_value(record, "question")),
            str(self.field_value(record, "context")),
            None if answers is None else parse_answers(answers, record.source),
            None if title is None else str(title),
        )

    def example_from_raw(self, raw: dict[str, Any], index: int) -> QAExample:
        """Prediction input: ``{"question": ..., "context": ...}`` with an optional id."""
        if not isinstance(raw, dict) or not all(isinstance(raw.get(key), str) for key in ("question", "context")):
            raise DataError(f"input line {index + 1}: expected an object with string 'question' and 'context'")
        return QAExample(str(raw.get("id", index)), raw["question"], raw["context"])

    def example_is_labelled(self, example: QAExample) -> bool:
        """Gold answers may be empty (unanswerable) yet still scored; only prediction inputs carry None."""
        return example.answers is not None

    # ---- examples -> features
    def check_window(self, tokenizer) -> None:
        """The tokenizer panics unless the stride is below the context room, so say what to change instead."""
        specials = tokenizer.num_special_tokens_to_add(pair=True)
        room = self.config.max_length - self.options.max_question_length - specials
        if self.options.doc_stride >= room:
            raise ConfigError(
                f"task {self.config.name!r}: doc_stride {self.options.doc_stride} must be below the context room of "
                f"a window (max_length {self.config.max_length} - max_question_length "
                f"{self.options.max_question_length} - {specials} special tokens = {room}); raise max_length or "
                f"lower doc_stride / max_question_length"
            )

    def target(self, example: QAExample, offsets: list[CharSpan | None]) -> tuple[int, int] | None:
        """(start, end) tokens; None when there is nothing to learn (unlabelled, or no answer found in the text)."""
        if example.answers is None:
            return None
        chars = answer_chars(example)
        if chars is not None:
            return token_span(offsets, *chars)
        return NO_ANSWER if not example.answers and self.options.allow_no_answer else None

    def featurize(self, examples: list[QAExample], tokenizer, training: bool) -> list[QAFeature]:
        self.check_window(tokenizer)
        if not examples:  # the tokenizer cannot encode an empty batch
            return []
        questions = truncate_questions([e.question for e in examples], tokenizer, self.options.max_question_length)
        encoded = tokenizer(
            questions,
            [e.context for e in examples],
            truncation="only_second",
            max_length=self.config.max_length,
            stride=self.options.doc_stride,
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
        )
        features = []
        for i, example_index in enumerate(encoded["overflow_to_sample_mapping"]):
            example = examples[example_index]
            offsets = context_offsets(encoded.sequence_ids(i), encoded["offset_mapping"][i], example.context)
            target = self.target(example, offsets)
            if training and target is None:
                continue
            features.append(
                QAFeature(
                    input_ids=encoded["input_ids"][i],
                    example_index=example_index,
                    token_type_ids=encoded["token_type_ids"][i] if "token_type_ids" in encoded else None,
                    target=target,
                    offsets=offsets,
                )
            )
        return features

    # ---- batches -> loss
    def collate_targets(self, features: Sequence[Feature], length: int) -> torch.Tensor | None:
        """(B, 3): start, end and the feature's unpadded length, which loss needs to mask the padding."""
        if any(f.target is None for f in features):
            return None
        return torch.tensor([[*f.target, len(f)] for f in features], dtype=torch.long)

    def evidence_rows(self, inputs: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One row per position before the padding; two columns: whether the answer starts there, and ends there."""
        start, end, length = (int(value) for value in target)
        columns = torch.zeros(length, 2)
        columns[start, 0] = columns[end, 1] = 1.0
        return inputs[:length], columns

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean of start and end cross-entropy over the positions, padding excluded."""
        positions = torch.arange(logits.shape[1], device=logits.device)
        padding = positions[None, :] >= targets[:, 2:3]
        masked = logits.float().masked_fill(padding[..., None], torch.finfo(torch.float32).min)
        start = torch.nn.functional.cross_entropy(masked[..., 0], targets[:, 0])
        end = torch.nn.functional.cross_entropy(masked[..., 1], targets[:, 1])
        return (start + end) / 2

    # ---- logits -> predictions
    def best_span(self, offsets: list[CharSpan | None], logits: np.ndarray) -> Span | None:
        """Best pair of the n-best starts and ends in the context with end >= start and a bounded length."""
        context = np.array([i for i, span in enumerate(offsets) if span is not None], dtype=np.int64)
        if context.size == 0:
            return None
        starts = context[np.argsort(-logits[context, 0], kind="stable")[: self.options.n_best]]
        ends = context[np.argsort(-logits[context, 1], kind="stable")[: self.options.n_best]]
        lengths = ends[None, :] - starts[:, None] + 1
        valid = (lengths >= 1) & (lengths <= self.options.max_answer_length)
        if not valid.any():
            return None
        scores = np.where(valid, logits[starts, 0][:, None] + logits[ends, 1][None, :], -np.inf)
        row, column = np.unravel_index(int(scores.argmax()), scores.shape)
        return Span(float(scores[row, column]), offsets[starts[row]][0], offsets[ends[column]][1])

    def span_logits(self, offsets: list[CharSpan | None], logits: np.ndarray) -> np.ndarray:
        """Logits (start + end) of every span of the window that ``best_span`` could choose, without its n-best cut:
        context tokens, end >= start, at most max_answer_length tokens. Computed band by band (span length)."""
        context = np.array([i for i, span in enumerate(offsets) if span is not None], dtype=np.int64)
        starts, ends = logits[context, 0], logits[context, 1]
        bands = []
        for shift in range(min(self.options.max_answer_length, context.size)):
            lengths = context[shift:] - context[: context.size - shift] + 1
            bands.append((starts[: context.size - shift] + ends[shift:])[lengths <= self.options.max_answer_length])
        return np.concatenate(bands) if bands else np.zeros(0, dtype=logits.dtype)

    def predict(self, example: QAExample, windows: list[tuple[QAFeature, np.ndarray]]) -> dict[str, Any]:
        """Best span over all windows; no answer when allowed and the [CLS] score beats it by the threshold.

        ``score`` is the answer's probability under one softmax over the candidates: every span of every window
        (``span_logits``), and no answer (the lowest [CLS] logit sum of the windows) when it is allowed or no span
        exists; so scores lie in [0, 1] and compare across inputs and tasks. ``logit`` keeps the logit sum.
        """
        null_score = min(float(logits[0, 0] + logits[0, 1]) for _, logits in windows)
        spans = [self.best_span(feature.offsets, logits) for feature, logits in windows]
        best = max((span for span in spans if span is not None), key=lambda span: span.score, default=None)
        options = self.options
        candidates = [self.span_logits(feature.offsets, logits).astype(np.float64) for feature, logits in windows]
        if options.allow_no_answer or best is None:
            candidates.append(np.array([null_score]))
        log_total = log_sum_exp(np.concatenate(candidates))
        if best is None or (options.allow_no_answer and null_score - best.score > options.no_answer_threshold):
            return {"answer": "", "start": -1, "end": -1, "score": math.exp(null_score - log_total),
                    "logit": null_score}
        return {"answer": example.context[best.start : best.end], "start": best.start, "end": best.end,
                "score": math.exp(best.score - log_total), "logit": best.score}

    def decode(self, examples: list[QAExample], features: list[QAFeature], logits: list[np.ndarray]) -> list[dict]:
        windows: dict[int, list[tuple[QAFeature, np.ndarray]]] = defaultdict(list)
        for feature, rows in zip(features, logits):
            windows[feature.example_index].append((feature, rows))
        return [self.predict(example, windows[index]) for index, example in enumerate(examples)]

    # ---- predictions -> metrics
    def score(self, examples: list[QAExample], predictions: list[dict[str, Any]]) -> MetricResult:
        """SQuAD / CMRC EM and F1 over the labelled examples, max over each question's gold answers."""
        labelled = [(e, p) for e, p in zip(examples, predictions) if self.example_is_labelled(e)]
        return squad_metrics(
            {e.guid: p["answer"] for e, p in labelled},
            {e.guid: [text for text, _ in e.answers] for e, _ in labelled},
            language=self.options.language,
        )

    def prediction_record(self, example: QAExample, prediction: dict[str, Any]) -> dict[str, Any]:
        row: dict[str, Any] = {"id": example.guid, "question": example.question}
        if example.answers is not None:
            row["gold"] = [text for text, _ in example.answers]
        return {**row, **prediction}


TASK_TYPES.register("qa", QATask)
