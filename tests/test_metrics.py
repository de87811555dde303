"""Metric functions against hand-computed golden values."""

from __future__ import annotations

import json

import pytest

from multitask.metrics import (
    classification_metrics,
    multilabel_metrics,
    ner_metrics,
    normalize_answer,
    squad_metrics,
)

# --- classification ---------------------------------------------------------------------------


def test_classification_hand_case_and_confusion_matrix_order():
    result = classification_metrics(["a", "a", "b", "c"], ["a", "b", "b", "a"], labels=["a", "b", "c", "d"])
    assert result.scores["accuracy"] == pytest.approx(0.5)
    # macro over labels present in gold or predicted (a, b, c): (1/2 + 2/3 + 0) / 3
    assert result.scores["macro_f1"] == pytest.approx(7 / 18)
    # weighted by gold support: (2 * 1/2 + 1 * 2/3 + 1 * 0) / 4
    assert result.scores["weighted_f1"] == pytest.approx(5 / 12)
    per_class = result.details["per_class"]
    assert list(per_class) == ["a", "b", "c", "d"]
    assert per_class["b"] == pytest.approx({"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 1})
    assert per_class["d"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    cm = result.details["confusion_matrix"]
    assert cm["labels"] == ["a", "b", "c", "d"]
    assert cm["matrix"] == [[1, 1, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]  # rows gold, cols predicted
    json.dumps(result.details)


def test_classification_rejects_unknown_label_and_length_mismatch():
    with pytest.raises(ValueError, match="'z'"):
        classification_metrics(["a"], ["z"], labels=["a", "b"])
    with pytest.raises(ValueError, match="2 gold labels but 1"):
        classification_metrics(["a", "b"], ["a"], labels=["a", "b"])


def test_multilabel_hand_case():
    gold = [["x", "y"], ["y"], []]
    predicted = [["x"], ["y", "z"], []]
    result = multilabel_metrics(gold, predicted, labels=["x", "y", "z", "w"])
    assert result.scores["micro_f1"] == pytest.approx(2 / 3)  # tp=2, fp=1, fn=1
    assert result.scores["macro_f1"] == pytest.approx((1 + 2 / 3 + 0) / 3)  # x, y, z present; w absent
    assert result.scores["exact_match"] == pytest.approx(1 / 3)
    assert result.details["per_class"]["y"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2})
    assert result.details["per_class"]["w"]["support"] == 0
    json.dumps(result.details)


# --- NER ---------------------------------------------------------------------------------------


def test_ner_per_type_hand_case():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    predicted = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "O"]]
    result = ner_metrics(gold, predicted)
    # gold entities PER, LOC, ORG; predicted PER, ORG, ORG; correct PER and the second ORG
    assert result.scores["precision"] == pytest.approx(2 / 3)
    assert result.scores["recall"] == pytest.approx(2 / 3)
    assert result.scores["f1"] == pytest.approx(2 / 3)
    assert result.scores["accuracy"] == pytest.approx(5 / 6)
    per_type = result.details["per_type"]
    assert set(per_type) == {"PER", "LOC", "ORG"}
    assert per_type["PER"] == pytest.approx({"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1})
    assert per_type["LOC"] == pytest.approx({"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1})
    assert per_type["ORG"] == pytest.approx({"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 1})
    json.dumps(result.details)


def test_ner_default_mode_is_lenient_like_conlleval():
    # An entity opened with I- counts as an entity (conlleval), so it matches the B- prediction.
    assert ner_metrics([["I-PER", "I-PER", "O"]], [["B-PER", "I-PER", "O"]]).scores["f1"] == 1.0


def test_ner_length_mismatch_names_sentence():
    with pytest.raises(ValueError, match="sentence 1"):
        ner_metrics([["O"], ["O", "O"]], [["O"], ["O"]])


# --- SQuAD / CMRC ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The  Cat!", "cat"),
        ("an apple.", "apple"),
        ("A theory of the world", "theory of world"),
        ("Anthem", "anthem"),  # articles only as whole words
        ("  U.S.A. ", "usa"),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_squad_f1_hand_case():
    # tokens [cat, sat] vs [cat, sat, on, mat]: precision 1, recall 1/2 -> F1 2/3
    result = squad_metrics({"q": "the Cat sat"}, {"q": ["cat sat on mat"]})
    assert result.scores == pytest.approx({"exact_match": 0.0, "f1": 2 / 3})
    assert result.details == {"total": 1, "missing": 0}


def test_squad_max_over_gold_answers_and_em_normalisation():
    result = squad_metrics({"q1": "The Cat.", "q2": "big dog"}, {"q1": ["dog", "cat"], "q2": ["dog", "a big brown dog"]})
    # q1: EM 1, F1 1. q2: EM 0; F1 max(2/3 with "dog", 0.8 with "big brown dog") = 0.8
    assert result.scores["exact_match"] == pytest.approx(0.5)
    assert result.scores["f1"] == pytest.approx((1 + 0.8) / 2)


def test_squad_missing_prediction_counts_as_wrong():
    result = squad_metrics({"q1": "cat"}, {"q1": ["cat"], "q2": ["dog"]})
    assert result.scores == pytest.approx({"exact_match": 0.5, "f1": 0.5})
    assert result.details["missing"] == 1


def test_squad_v2_no_answer_questions():
    references = {"has": ["cat"], "none": [], "none_too": [""]}
    right = squad_metrics({"has": "cat", "none": "", "none_too": ""}, references)
    assert right.scores == pytest.approx(
        {"exact_match": 1.0, "f1": 1.0, "has_answer_f1": 1.0, "no_answer_f1": 1.0}
    )
    assert right.details == {"total": 3, "missing": 0, "has_answer_total": 1, "no_answer_total": 2}
    wrong = squad_metrics({"has": "", "none": "cat", "none_too": ""}, references)
    assert wrong.scores == pytest.approx(
        {"exact_match": 1 / 3, "f1": 1 / 3, "has_answer_f1": 0.0, "no_answer_f1": 0.5}
    )


def test_squad_without_no_answer_questions_has_no_split_scores():
    assert set(squad_metrics({"q": "cat"}, {"q": ["cat"]}).scores) == {"exact_match", "f1"}


def test_chinese_f1_uses_cmrc_longest_common_run():
    # tokens 北 京 的 大 学 vs 北 京 大 学: longest common run 北京 (2): P 2/5, R 2/4 -> F1 4/9
    result = squad_metrics({"q": "北京的大学"}, {"q": ["北京大学"]}, language="zh")
    assert result.scores == pytest.approx({"exact_match": 0.0, "f1": 4 / 9})


def test_chinese_mixed_segmentation_and_punctuation():
    # prediction tokens [iphone, 12, 手, 机] vs gold [iphone, 12]: P 2/4, R 1 -> F1 2/3
    result = squad_metrics({"q": "iPhone 12手机"}, {"q": ["iphone 12"]}, language="zh")
    assert result.scores["f1"] == pytest.approx(2 / 3)
    # Chinese (and the listed English) punctuation is dropped before EM
    result = squad_metrics({"q": "《红楼梦》。", "r": "C++"}, {"q": ["红楼梦"], "r": ["c"]}, language="zh")
    assert result.scores == pytest.approx({"exact_match": 1.0, "f1": 1.0})


def test_squad_unknown_language():
    with pytest.raises(ValueError, match="supported: en, zh"):
        squad_metrics({}, {"q": ["a"]}, language="fr")


# ---------------------------------------------------------------------------- CMRC 2018 (official script rules)


def _zh(prediction, answers):
    return squad_metrics({"q": prediction}, {"q": answers}, language="zh").scores


def test_cmrc_segmentation_is_mixed():
    from multitask.metrics.qa import _chinese_tokens

    assert _chinese_tokens("使用Python3编程") == ["使", "用", "python3", "编", "程"]
    assert _chinese_tokens("《红楼梦》，共 120 回。") == ["红", "楼", "梦", "共", "120", "回"]
    assert _chinese_tokens("约3.5亿元") == ["约", "3.5", "亿", "元"]
    assert _chinese_tokens("go!") == ["go", "!"]  # ASCII ! is not in the script's list


def test_cmrc_f1_is_longest_common_substring_not_subsequence():
    # 北 大 京 学 vs 北 京 大 学: longest common substring 1 (a subsequence would give 3): P 1/4, R 1/4
    assert _zh("北大京学", ["北京大学"]) == pytest.approx({"exact_match": 0.0, "f1": 0.25})


def test_cmrc_mixed_chinese_english_hand_cases():
    # [3.5, 亿] vs [3.5, 亿, 元]: LCS 2, P 1, R 2/3 -> F1 0.8
    assert _zh("3.5亿", ["3.5亿元"]) == pytest.approx({"exact_match": 0.0, "f1": 0.8})
    # [使, 用, python] vs [python, 语, 言]: LCS 1, P 1/3, R 1/3 -> F1 1/3
    assert _zh("使用Python", ["python语言"]) == pytest.approx({"exact_match": 0.0, "f1": 1 / 3})


def test_cmrc_punctuation_list_is_the_official_one():
    # listed marks (Chinese and English) vanish: EM and F1 1
    assert _zh("「北京」：", ["北京"]) == pytest.approx({"exact_match": 1.0, "f1": 1.0})
    assert _zh("e-mail", ["email"]) == pytest.approx({"exact_match": 1.0, "f1": 1.0})
    # unlisted marks stay: ASCII '!' ([go, !] vs [go]: F1 2/3) and a lone '…' ([等, 等, …] vs [等, 等]: F1 0.8)
    assert _zh("go!", ["go"]) == pytest.approx({"exact_match": 0.0, "f1": 2 / 3})
    assert _zh("等等…", ["等等"]) == pytest.approx({"exact_match": 0.0, "f1": 0.8})


def test_cmrc_em_compares_normalised_strings():
    # lower case and outer whitespace do not matter; inner whitespace does for EM, not for tokens
    assert _zh("  New York ", ["new york"]) == pytest.approx({"exact_match": 1.0, "f1": 1.0})
    assert _zh("北 京", ["北京"]) == pytest.approx({"exact_match": 0.0, "f1": 1.0})
    # [new, york] vs [newyork]: nothing in common
    assert _zh("new york", ["newyork"]) == pytest.approx({"exact_match": 0.0, "f1": 0.0})


def test_cmrc_max_over_multiple_references():
    # vs 长江: 0; vs 长江三峡大坝 (6 tokens): LCS 4, P 1, R 2/3 -> F1 0.8; EM against neither
    assert _zh("三峡大坝", ["长江", "长江三峡大坝"]) == pytest.approx({"exact_match": 0.0, "f1": 0.8})
    # EM from the second reference, F1 1 from it too
    assert _zh("《三峡大坝》", ["长江", "三峡大坝"]) == pytest.approx({"exact_match": 1.0, "f1": 1.0})
    # two questions: (0.8 + 1) / 2, EM (0 + 1) / 2
    result = squad_metrics(
        {"a": "三峡大坝", "b": "Yangtze River"},
        {"a": ["长江", "长江三峡大坝"], "b": ["长江", "yangtze river"]},
        language="zh",
    )
    assert result.scores == pytest.approx({"exact_match": 0.5, "f1": 0.9})
