"""Extractive QA metrics: the official SQuAD v1.1/v2.0 evaluation (English) and CMRC 2018 (Chinese).

Reimplemented rather than imported so that no-answer questions, missing predictions and the
Chinese tokenisation are handled in one place with the same return type as every other metric.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable

from multitask.metrics.result import MetricResult

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_ENGLISH_PUNCTUATION = frozenset(string.punctuation)
# cmrc2018_evaluate.py's sp_char list, verbatim. The script tests one character at a time, so its
# two-character entry '……' never matches and a lone '…' is kept; ASCII . , ! ? " ' ( ) are kept too.
_CMRC_PUNCTUATION = (
    "-", ":", "_", "*", "^", "/", "\\", "~", "`", "+", "=",
    "，", "。", "：", "？", "！", "“", "”", "；", "’", "《", "》", "……", "·", "、",
    "「", "」", "（", "）", "－", "～", "『", "』",
)
_CMRC_DROPPED = frozenset(mark for mark in _CMRC_PUNCTUATION if len(mark) == 1)
# The script's Chinese test is [\u4e00-\u9fa5]: each such character is one token.
_CMRC_CHINESE = re.compile("[\u4e00-\u9fa5]")
# Other text goes through nltk.word_tokenize there; approximated here (nltk is not a dependency) as
# runs of letters/digits (decimals such as 3.5 and 1,000 kept whole) and every other mark alone.
_CMRC_OTHER = re.compile(r"\d+(?:[.,]\d+)+|[^\W_]+|\S")


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, drop punctuation and the articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _ENGLISH_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _english_tokens(text: str) -> list[str]:
    return normalize_answer(text).split()


def _cmrc_normalize(text: str) -> str:
    """CMRC 2018 ``remove_punctuation`` (used for EM): lower case, strip, drop the script's punctuation."""
    return "".join(ch for ch in text.lower().strip() if ch not in _CMRC_DROPPED)


def _chinese_tokens(text: str) -> list[str]:
    """CMRC 2018 ``mixed_segmentation`` (used for F1): Chinese characters one by one, other runs as words."""
    tokens: list[str] = []
    for piece in re.split(f"({_CMRC_CHINESE.pattern})", _cmrc_normalize(text)):
        tokens.extend([piece] if _CMRC_CHINESE.fullmatch(piece) else _CMRC_OTHER.findall(piece))
    return tokens


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


# Per language: tokens for F1, the F1 over token lists, and the normalised string EM compares.
_LANGUAGES: dict[
    str, tuple[Callable[[str], list[str]], Callable[[list[str], list[str]], float], Callable[[str], str]]
] = {
    "en": (_english_tokens, _bag_f1, normalize_answer),
    "zh": (_chinese_tokens, _lcs_f1, _cmrc_normalize),
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
    tokenize, token_f1, normalize = _LANGUAGES[language]
    exact: dict[str, float] = {}
    f1: dict[str, float] = {}
    answerable: dict[str, bool] = {}
    missing = 0
    for qid, answers in references.items():
        kept = [answer for answer in answers if tokenize(answer)]
        answerable[qid] = bool(kept)
        if qid not in predictions:
            missing += 1
            exact[qid] = f1[qid] = 0.0
            continue
        predicted = tokenize(predictions[qid])
        if kept:
            exact[qid] = float(any(normalize(gold) == normalize(predictions[qid]) for gold in kept))
            f1[qid] = max(_answer_f1(token_f1, tokenize(gold), predicted) for gold in kept)
        else:
            exact[qid] = f1[qid] = float(not predicted)

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
