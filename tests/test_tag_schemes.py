"""Golden conversions into IOB2, so every NER task is scored by one span decoder."""

import pytest

from multitask.data.tag_schemes import InvalidTagError, SCHEMES, entity_types, to_iob2
from multitask.errors import ConfigError


def test_iob1_span_start_becomes_b():
    tags = ["I-PER", "I-PER", "O", "I-LOC", "B-LOC", "I-LOC", "I-ORG"]
    assert to_iob2(tags, "iob1") == ["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-LOC", "B-ORG"]


@pytest.mark.parametrize("scheme", ["iob2", "bio"])
def test_iob2_passthrough_and_lenient_repair(scheme):
    valid = ["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-LOC"]
    assert to_iob2(valid, scheme) == valid
    assert to_iob2(["O", "I-PER", "B-LOC", "I-ORG"], scheme) == ["O", "B-PER", "B-LOC", "B-ORG"]


@pytest.mark.parametrize("scheme", ["bioes", "iobes"])
def test_bioes(scheme):
    tags = ["S-PER", "B-ORG", "I-ORG", "E-ORG", "O", "B-LOC", "E-LOC", "S-LOC", "S-LOC"]
    expected = ["B-PER", "B-ORG", "I-ORG", "I-ORG", "O", "B-LOC", "I-LOC", "B-LOC", "B-LOC"]
    assert to_iob2(tags, scheme) == expected


def test_bmes():
    tags = ["B-NAME", "M-NAME", "E-NAME", "O", "S-ORG", "B-TITLE", "E-TITLE", "B-TITLE", "E-TITLE"]
    expected = ["B-NAME", "I-NAME", "I-NAME", "O", "B-ORG", "B-TITLE", "I-TITLE", "B-TITLE", "I-TITLE"]
    assert to_iob2(tags, "bmes") == expected


def test_bmes_span_cut_by_sentence_break_is_repaired():
    # Resume NER train line 62392: a sentence opens inside an ORG.
    assert to_iob2(["M-ORG", "E-ORG", "O"], "bmes") == ["B-ORG", "I-ORG", "O"]


def test_types_with_dashes_and_dots():
    tags = ["B-creative-work", "I-creative-work", "B-PER.NAM"]
    assert to_iob2(tags, "iob2") == tags
    assert entity_types(tags) == ["PER.NAM", "creative-work"]


def test_entity_types_sorted_unique_any_scheme():
    assert entity_types(["O", "S-ORG", "B-NAME", "E-NAME", "M-NAME"]) == ["NAME", "ORG"]
    assert entity_types(["O", "O"]) == []


def test_tag_outside_scheme_reports_index():
    with pytest.raises(InvalidTagError, match="'M-PER' is not valid bioes") as info:
        to_iob2(["O", "B-PER", "M-PER"], "bioes")
    assert info.value.index == 2
    with pytest.raises(InvalidTagError):
        to_iob2(["PER"], "iob2")


def test_unknown_scheme_lists_known():
    with pytest.raises(ConfigError, match="unknown tag scheme 'bilou'; known: " + ", ".join(SCHEMES)):
        to_iob2(["O"], "bilou")
