"""Extractive QA metrics: the official SQuAD v1.1/v2.0 evaluation (English) and CMRC 2018 (Chinese).

Reimplemented rather than imported so that no-answer questions, missing predictions and the
Chinese tokenisation are handled in one place with the same return type as every other metric.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from collections.abc import Callable

from multitask.metrics.result import MetricResult

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_ENGLISH_PUNCTUATION = frozenset(string.punctuation)
# The CMRC 2018 script's own list; the Unicode "P*" categories cover the remaining CJK punctuation.
_CMRC_PUNCTUATION = frozenset("-:_*^/\\~`+=，。：？！“”；’《》…·、「」（）－～『』")
_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_ZH_TOKEN = re.compile(rf"[{_CJK}]|[^\s{_CJK}]+")


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, drop punctuation and the articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _ENGLISH_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _english_tokens(text: str) -> list[str]:
    return normalize_answer(text).split()


def _is_punctuation(ch: str) -> bool:
    return ch in _ENGLISH_PUNCTUATION or ch in _CMRC_PUNCTUATION or unicodedata.category(ch).startswith("P")


def _chinese_tokens(text: str) -> list[str]:
    """CMRC 2018 mixed segmentation: every CJK character is a token, other runs split on whitespace."""
    text = "".join(ch for ch in text.lower().strip() if not _is_punctuation(ch))
    return _ZH_TOKEN.findall(text)


def _bag_f1(gold: list[str], predicted: list[str]) -> float:
    """SQuAD token F1: overlap of token multisets."""
    same = sum((Counter(gold) & Counter(predicted)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(predicted), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def _longest_common_run(a: list[str], b: list[str]) -> int:
    best = 0
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0] * (len(b) + 1)
        for j, y in enumerate(b):
            if x == y:
                current[j + 1] = previous[j] + 1
                best = max(best, current[j + 1])
        previous = current
    return best


def _lcs_f1(gold: list[str], predicted: list[str]) -> float:
    """CMRC 2018 F1: precision/recall of the longest common contiguous token run, as the official script."""
    common = _longest_common_run(gold, predicted)
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def _answer_f1(token_f1: Callable[[list[str], list[str]], float], gold: list[str], predicted: list[str]) -> float:
    """SQuAD v2 rule: when either side is empty (no-answer), F1 is 1 exactly when both are."""
    if not gold or not predicted:
        return float(gold == predicted)
    return token_f1(gold, predicted)


_LANGUAGES: dict[str, tuple[Callable[[str], list[str]], Callable[[list[str], list[str]], float]]] = {
    "en": (_english_tokens, _bag_f1),
    "zh": (_chinese_tokens, _lcs_f1),
}


def squad_metrics(
    predictions: dict[str, str], references: dict[str, list[str]], language: str = "en"
) -> MetricResult:
    """Exact match and F1 (fractions) over the questions in ``references``, max over gold answers.

    Gold answers that normalise to nothing are dropped and a question left without any is a
    SQuAD v2 no-answer question (gold ``[""]``): only an empty prediction scores there, and the
    result then also reports ``has_answer_f1`` / ``no_answer_f1``. A question with no prediction
    scores zero, so a decoding bug lowers the score instead of hiding in a smaller denominator.
    """
    if language not in _LANGUAGES:
        raise ValueError(f"unsupported QA language {language!r}; supported: {', '.join(sorted(_LANGUAGES))}")
    if not references:
        raise ValueError("nothing to score: no reference questions")
    tokenize, token_f1 = _LANGUAGES[language]
    exact: dict[str, float] = {}
    f1: dict[str, float] = {}
    answerable: dict[str, bool] = {}
    missing = 0
    for qid, answers in references.items():
        golds = [tokens for tokens in map(tokenize, answers) if tokens] or [[]]
        answerable[qid] = golds != [[]]
        if qid not in predictions:
            missing += 1
            exact[qid] = f1[qid] = 0.0
            continue
        predicted = tokenize(predictions[qid])
        exact[qid] = float(any(gold == predicted for gold in golds))
        f1[qid] = max(_answer_f1(token_f1, gold, predicted) for gold in golds)

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    scores = {"exact_match": mean(list(exact.values())), "f1": mean(list(f1.values()))}
    has_answer = [f1[qid] for qid in references if answerable[qid]]
    no_answer = [f1[qid] for qid in references if not answerable[qid]]
    details = {"total": len(references), "missing": missing}
    if no_answer:
        scores["no_answer_f1"] = mean(no_answer)
        if has_answer:
            scores["has_answer_f1"] = mean(has_answer)
        details.update(has_answer_total=len(has_answer), no_answer_total=len(no_answer))
    return MetricResult(scores=scores, details=details)
