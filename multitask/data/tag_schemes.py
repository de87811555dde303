"""Sequence-tagging schemes, converted once on reading so every NER task trains and scores in IOB2."""

from __future__ import annotations

from multitask.errors import ConfigError, DataError

# Scheme -> prefix mapping into IOB2 (before the span-start repair); "O" is always allowed.
_PREFIX_MAPS: dict[str, dict[str, str]] = {
    "iob1": {"B": "B", "I": "I"},
    "iob2": {"B": "B", "I": "I"},
    "bio": {"B": "B", "I": "I"},
    "bioes": {"B": "B", "I": "I", "E": "I", "S": "B"},
    "iobes": {"B": "B", "I": "I", "E": "I", "S": "B"},
    "bmes": {"B": "B", "M": "I", "E": "I", "S": "B"},
}
SCHEMES: tuple[str, ...] = tuple(sorted(_PREFIX_MAPS))


class InvalidTagError(DataError):
    """A tag does not fit its scheme; ``index`` lets a reader point at the offending line."""

    def __init__(self, message: str, index: int) -> None:
        super().__init__(message)
        self.index = index


def check_scheme(scheme: str) -> str:
    """Return ``scheme`` if known, so option validation and conversion share one message."""
    if scheme not in _PREFIX_MAPS:
        raise ConfigError(f"unknown tag scheme {scheme!r}; known: {', '.join(SCHEMES)}")
    return scheme


def split_tag(tag: str) -> tuple[str, str]:
    """Split ``B-PER`` into ("B", "PER") and ``O`` into ("O", ""); types may contain '-' or '.'."""
    if tag == "O":
        return "O", ""
    prefix, sep, entity = tag.partition("-")
    if not sep or not prefix or not entity:
        return "", ""
    return prefix, entity


def to_iob2(tags: list[str], scheme: str) -> list[str]:
    """Map ``tags`` into IOB2, turning any I- that opens a span into B- (IOB1 and seqeval-lenient repair)."""
    prefix_map = _PREFIX_MAPS[check_scheme(scheme)]
    # Respell each distinct tag once (in order of first use, so errors name the first bad line).
    spelled = {tag: _respell(tag, prefix_map, scheme, tags) for tag in dict.fromkeys(tags)}
    converted = [spelled[tag] for tag in tags]
    for index in [i for i, tag in enumerate(converted) if tag[0] == "I"]:
        if index == 0 or converted[index - 1][2:] != converted[index][2:]:
            converted[index] = "B" + converted[index][1:]
    return converted


def _respell(tag: str, prefix_map: dict[str, str], scheme: str, tags: list[str]) -> str:
    prefix, entity = split_tag(tag)
    if prefix == "O":
        return "O"
    if prefix not in prefix_map:
        allowed = ", ".join(f"{p}-TYPE" for p in prefix_map)
        raise InvalidTagError(f"tag {tag!r} is not valid {scheme}; expected O or {allowed}", tags.index(tag))
    return f"{prefix_map[prefix]}-{entity}"


def entity_types(tags: list[str]) -> list[str]:
    """Sorted entity types seen in ``tags`` (any scheme), e.g. to build a label set."""
    return sorted({split_tag(tag)[1] for tag in tags} - {""})
