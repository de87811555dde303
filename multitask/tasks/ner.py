"""Named-entity recognition as IOB2 token tagging (CoNLL-2003, OntoNotes, MSRA, People's Daily)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import groupby
from typing import Any, Literal

import numpy as np
import torch
from seqeval.metrics.sequence_labeling import get_entities

from multitask.data.features import TaggingFeature
from multitask.data.records import Record
from multitask.data.tag_schemes import split_tag, to_iob2
from multitask.errors import ConfigError, DataError
from multitask.metrics import MetricResult, ner_metrics
from multitask.tasks.base import TASK_TYPES, TaskType, softmax
from multitask.tasks.config import TaskConfig
from multitask.tuning import TuningDefaults

IGNORE_INDEX = -100  # target of special tokens and non-first subwords; cross-entropy skips it

# BERT's CJK ideograph blocks: text in these scripts has no spaces, so it is tagged per character.
_CJK_RANGES = (
    (0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F),
)

WordSplit = Literal["auto", "punctuation", "characters", "whitespace"]

# Words whose period belongs to them, as CoNLL-2003 tokenizes them ("Mr.", "Inc.", "vs."); single capital letters
# (initials, "M.") keep theirs too. Words that often end a sentence ("no", "in") are left out on purpose.
ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof st jr sr inc corp ltd co bros vs etc gen gov sen rep sgt capt col lt mt ft "
    "jan feb mar apr aug sep sept oct nov dec calif fla".split()
)
# One CoNLL-style token at a time, first match wins. Letter-dot abbreviations (U.S., a.m.) and numbers with
# separators (3.5, 1,000, 10:30) stay whole; so do currencies (US$), hyphenated and apostrophe words (German-born,
# O'Brien, whose clitics are split off after) and S&P; any other mark is a token, a run of the same mark (..., --)
# one token.
_TOKEN = re.compile(r"""
      [^\W\d_](?:\.[^\W\d_])+\.?
    | \d+(?:[.,:/]\d+)+
    | [A-Z]{1,3}\$
    | \w+(?:[-'\u2019&]\w+)*
    | ([^\w\s])\1*
""", re.VERBOSE)
# English clitics CoNLL splits off their word: Lee's -> Lee 's, don't -> do n't.
_CLITIC = re.compile(r"(?i)(?:n['\u2019]t|['\u2019](?:s|re|m|ve|ll|d))$")


@dataclass(frozen=True)
class Word:
    """A word of a raw text with its character span, so entities map back to the text exactly."""

    text: str
    start: int
    end: int


@dataclass
class NerOptions:
    word_split: WordSplit = field(default="auto", metadata={"help": (
        "How raw prediction text becomes words: punctuation (CoNLL-style: punctuation apart, clitics 's and n't "
        "split off, U.S., 3.5 and well-known kept whole), characters (one word per character, as Chinese NER data "
        "is tagged), whitespace, or auto: characters when the text holds a CJK character, else punctuation. "
        "Token-list inputs are kept as given.")})


def is_cjk(char: str) -> bool:
    code = ord(char)
    return any(low <= code <= high for low, high in _CJK_RANGES)


def punctuation_words(text: str) -> list[Word]:
    """CoNLL-style words (see ``_TOKEN``); an abbreviation takes its period, a clitic becomes a word of its own."""
    words: list[Word] = []
    position = 0
    while (match := _TOKEN.search(text, position)) is not None:
        start, end = match.span()
        if text[end : end + 1] == "." and _keeps_period(match[0]):
            end += 1
        clitic = _CLITIC.search(text, start, end)
        if clitic is not None and clitic.start() > start:
            words.append(Word(text[start : clitic.start()], start, clitic.start()))
            start = clitic.start()
        words.append(Word(text[start:end], start, end))
        position = end
    return words


def _keeps_period(token: str) -> bool:
    return token.lower() in ABBREVIATIONS or (len(token) == 1 and token.isupper())


def split_words(text: str, how: WordSplit = "auto") -> list[Word]:
    """Raw prediction text into words as the task's training data has them (``NerOptions.word_split``)."""
    if how == "auto":
        how = "characters" if any(map(is_cjk, text)) else "punctuation"
    if how == "characters":
        return [Word(char, i, i + 1) for i, char in enumerate(text) if not char.isspace()]
    if how == "whitespace":
        return [Word(m[0], m.start(), m.end()) for m in re.finditer(r"\S+", text)]
    return punctuation_words(text)


def tag_entities(tokens: list[str], tags: list[str], confidences: Sequence[float] = (),
                 text: str | None = None, spans: Sequence[tuple[int, int]] = ()) -> list[dict[str, Any]]:
    """Entity spans of valid IOB2 tags, in word offsets with an exclusive end.

    ``score``: the mean of the entity's words' tag probabilities (given ``confidences``, one per word). With the
    raw ``text`` and the words' character ``spans``, an entity also carries ``char_start`` / ``char_end`` and its
    text is that slice of the input. Otherwise its words are joined: character-tokenized CJK sentences had no spaces
    between words, so entity texts get none back.
    """
    cjk_sentence = all(len(t) == 1 for t in tokens) and any(map(is_cjk, tokens))
    joiner = "" if cjk_sentence else " "
    entities = []
    for kind, start, last in get_entities(tags):
        entity: dict[str, Any] = {"type": kind, "start": start, "end": last + 1}
        if text is not None:
            char_start, char_end = spans[start][0], spans[last][1]
            entity.update(text=text[char_start:char_end], char_start=char_start, char_end=char_end)
        else:
            entity["text"] = joiner.join(tokens[start : last + 1])
        if confidences:
            entity["score"] = float(np.mean(confidences[start : last + 1]))
        entities.append(entity)
    return entities


@dataclass
class TaggingExample:
    guid: str
    tokens: list[str]
    tags: list[str] | None = None
    text: str | None = None  # the raw text the tokens were split from (prediction inputs only)
    spans: list[tuple[int, int]] | None = None  # each token's character span in ``text``


def first_subwords(word_ids: Sequence[int | None]) -> list[tuple[int, int]]:
    """(word, position) of each word's first subword; special tokens (None) are skipped."""
    return [
        (word, position)
        for position, word in enumerate(word_ids)
        if word is not None and (position == 0 or word_ids[position - 1] != word)
    ]


def windows(word_ids: list[int | None], max_length: int) -> list[list[int]]:
    """Token positions kept by each window: the special tokens around consecutive whole words that fit.

    Windows do not overlap, so every word is predicted (and scored) exactly once; a word longer
    than a whole window keeps its first subwords, which is all tagging needs.
    """
    if len(word_ids) <= max_length:
        return [list(range(len(word_ids)))]
    body = [position for position, word in enumerate(word_ids) if word is not None]
    head, tail = list(range(body[0])), list(range(body[-1] + 1, len(word_ids)))
    budget = max_length - len(head) - len(tail)
    kept: list[list[int]] = [[]]
    for _, positions in groupby(body, key=word_ids.__getitem__):
        pieces = list(positions)[:budget]
        if len(kept[-1]) + len(pieces) > budget:
            kept.append([])
        kept[-1].extend(pieces)
    return [head + window + tail for window in kept]


class NerTask(TaskType):
    name = "ner"
    input_schema = {
        "oneOf": [
            {"type": "string", "description": "the text, split into words as the task's options.word_split says "
                                              "(default: per character for CJK text, else words and punctuation)"},
            {"type": "object", "required": ["text"], "properties": {"text": {"type": "string"}, "id": {"type": "string"}}},
            {"type": "object", "required": ["tokens"], "properties": {
                "tokens": {"type": "array", "items": {"type": "string"}}, "id": {"type": "string"}}},
        ]
    }
    head_kind = "token"
    # Separate attention to the prefix: ahead of joint on every measured all-layer ner/qa run (docs/tuning.md).
    tuning_defaults = TuningDefaults(prefix_attention="separate")
    required_fields = ("tokens", "tags")
    optional_fields = ("id",)
    metric_names = ("f1", "precision", "recall", "accuracy")
    default_main_metric = "f1"
    options_type = NerOptions

    def __init__(self, config: TaskConfig, options: NerOptions | None = None) -> None:
        super().__init__(config, options if options is not None else NerOptions())

    def example_from_record(self, record: Record, index: int) -> TaggingExample:
        tokens = self.field_value(record, "tokens")
        tags = self.field_value(record, "tags", required=False)
        guid = self.field_value(record, "id", required=False)
        if not isinstance(tokens, list) or (tags is not None and not isinstance(tags, list)):
            raise DataError(f"{record.source}: 'tokens' and 'tags' must be lists")
        if tags is not None and len(tags) != len(tokens):
            raise DataError(f"{record.source}: {len(tokens)} tokens but {len(tags)} tags")
        return TaggingExample(
            str(guid if guid is not None else index),
            [str(token) for token in tokens],
            None if tags is None else [str(tag) for tag in tags],
        )

    def example_from_raw(self, raw: dict[str, Any], index: int) -> TaggingExample:
        """Prediction input: ``{"tokens": [...]}`` (kept as given) or ``{"text": ...}`` (split into words that keep
        their character spans); a bare string is taken as the text."""
        if isinstance(raw, str):
            raw = {"text": raw}
        guid = str(raw.get("id", index)) if isinstance(raw, dict) else ""
        if isinstance(raw, dict) and isinstance(raw.get("tokens"), list):
            return TaggingExample(guid, [str(token) for token in raw["tokens"]])
        if isinstance(raw, dict) and isinstance(raw.get("text"), str):
            words = split_words(raw["text"], self.options.word_split)
            return TaggingExample(guid, [w.text for w in words], text=raw["text"],
                                  spans=[(w.start, w.end) for w in words])
        raise DataError(f"input line {index + 1}: expected an object with 'tokens' (a list) or 'text' (a string)")

    def example_labels(self, example: TaggingExample) -> list[str]:
        return example.tags or []

    def fit_labels(self, train_examples: list[TaggingExample]) -> None:
        """Always hold "O" (decoding falls back to it) and only IOB2 tags (decoding repairs spans in IOB2)."""
        listed = bool(self.labels)
        super().fit_labels(train_examples)
        if "O" not in self.labels:
            if listed:
                raise ConfigError(f"task {self.config.name!r}: 'labels' must include 'O'")
            self.labels = sorted([*self.labels, "O"])
        invalid = [label for label in self.labels if split_tag(label)[0] not in ("O", "B", "I")]
        if invalid:
            raise ConfigError(f"task {self.config.name!r}: label {invalid[0]!r} is not an IOB2 tag "
                              "(O, B-TYPE or I-TYPE)")

    def featurize(self, examples: list[TaggingExample], tokenizer, training: bool) -> list[TaggingFeature]:
        """One batch call for all sentences; sentences too long for ``max_length`` are cut into windows."""
        encoded = tokenizer([e.tokens for e in examples], is_split_into_words=True, verbose=False)
        label_ids = {label: i for i, label in enumerate(self.labels)}
        features = []
        for index, example in enumerate(examples):
            word_ids = encoded.word_ids(index)
            tag_ids = None if example.tags is None else [label_ids[tag] for tag in example.tags]
            for kept in windows(word_ids, self.config.max_length):
                features.append(self._window_feature(encoded, index, [word_ids[p] for p in kept], kept, tag_ids))
        return features

    @staticmethod
    def _window_feature(
        encoded, index: int, word_ids: list[int | None], kept: list[int], tag_ids: list[int] | None
    ) -> TaggingFeature:
        """A feature from the kept token positions; its target labels only each word's first subword."""
        word_positions = first_subwords(word_ids)
        target = None
        if tag_ids is not None:
            target = [IGNORE_INDEX] * len(kept)
            for word, position in word_positions:
                target[position] = tag_ids[word]
        types = encoded.get("token_type_ids")
        return TaggingFeature(
            input_ids=[encoded["input_ids"][index][p] for p in kept],
            token_type_ids=None if types is None else [types[index][p] for p in kept],
            example_index=index,
            target=target,
            word_positions=word_positions,
        )

    def collate_targets(self, features: Sequence[TaggingFeature], length: int) -> torch.Tensor | None:
        if any(f.target is None for f in features):
            return None
        targets = torch.full((len(features), length), IGNORE_INDEX, dtype=torch.long)
        for row, feature in enumerate(features):
            targets[row, : len(feature.target)] = torch.tensor(feature.target)
        return targets

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean over labelled positions; a batch without any gives 0, not NaN."""
        total = torch.nn.functional.cross_entropy(
            logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        return total / (targets != IGNORE_INDEX).sum().clamp(min=1)

    def evidence_rows(self, inputs: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One row per labelled position, its tag one-hot."""
        labelled = target != IGNORE_INDEX
        return inputs[labelled], torch.nn.functional.one_hot(target[labelled], self.num_outputs).float()

    def loss_terms(self, targets: torch.Tensor) -> int:
        """The loss averages over labelled positions, not sentences."""
        return int((targets != IGNORE_INDEX).sum())

    def decode(self, examples: list[TaggingExample], features: list[TaggingFeature], logits: list[np.ndarray]):
        """Words without a subword stay "O"; invalid I- tags that open a span become B- (valid IOB2).

        Each word's confidence is the softmax probability of its chosen tag, at its first subword; an entity's
        ``score`` is the mean over its words.
        """
        tags = [["O"] * len(example.tokens) for example in examples]
        confidences = [[float("nan")] * len(example.tokens) for example in examples]
        for feature, scores in zip(features, logits):
            best = scores.argmax(-1)
            probabilities = softmax(scores.astype(np.float64))
            for word, position in feature.word_positions:
                tags[feature.example_index][word] = self.labels[int(best[position])]
                confidences[feature.example_index][word] = float(probabilities[position, best[position]])
        predictions = []
        for example, sentence_tags, sentence_confidences in zip(examples, tags, confidences):
            repaired = to_iob2(sentence_tags, "iob2")
            entities = tag_entities(example.tokens, repaired, sentence_confidences, example.text, example.spans or ())
            predictions.append({"tags": repaired, "entities": entities})
        return predictions

    def score(self, examples: list[TaggingExample], predictions: list[dict[str, Any]]) -> MetricResult:
        return ner_metrics([e.tags for e in examples], [p["tags"] for p in predictions])

    def prediction_record(self, example: TaggingExample, prediction: dict[str, Any]) -> dict[str, Any]:
        row: dict[str, Any] = {"id": example.guid, "tokens": example.tokens}
        if example.tags is not None:
            row["gold"] = example.tags
        return {**row, **prediction}


TASK_TYPES.register("ner", NerTask)
