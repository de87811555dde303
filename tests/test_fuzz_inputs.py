"""Property-based fuzzing of the data readers and the YAML loaders (hypothesis).

Property: every input either reads (records as a list, or a config object) or raises the package's own
MultitaskError whose message is one line and names the file, and a line inside it when it gives one.
Never another exception type, never a hang. The default "ci" profile keeps this file to a few seconds;
run ``HYPOTHESIS_PROFILE=long pytest tests/test_fuzz_inputs.py`` by hand for a deeper search.
"""

from __future__ import annotations

import gzip
import itertools
import json
import os
import re
import textwrap
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from multitask.config import load_config
from multitask.data.readers import read_records
from multitask.errors import MultitaskError
from multitask.experiment import ExperimentConfig
from multitask.tasks.loading import load_task
from tests.fixtures import TASK_YAMLS

settings.register_profile(
    "ci", max_examples=40, deadline=2000, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("long", max_examples=2000, deadline=5000, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

_counter = itertools.count()

# ---------------------------------------------------------------------------- valid samples per format

VALID = {
    "csv": 'text,label\n"hello, world",1\n"two\nlines",0\nplain,1\n',
    "tsv": "sentence\tlabel\nok film\t1\n\"bare quote\t0\n",
    "json": json.dumps([{"x": 1, "t": "é"}, {"x": 2}], ensure_ascii=False, indent=1),
    "jsonl": '{"text": "a", "label": 1}\n\n{"text": "北京", "label": 0}\n',
    "conll": "-DOCSTART- -X- O\n\nJohn B-PER\nSmith I-PER\nvisits O\nParis B-LOC\n\nLondon B-LOC\nrains O\n",
    "squad": json.dumps({"version": "1.1", "data": [{"title": "t", "paragraphs": [{"context": "北京是首都", "qas": [
        {"id": "q1", "question": "哪里?", "answers": [{"text": "北京", "answer_start": 0}]}]}]}]},
        ensure_ascii=False),
    "label_line": "NUM:date When was it ?\nLOC:city Where is Paris ?\n",
}
FORMATS = sorted(VALID)

OPTIONS = {
    "csv": [{}, {"header": False}, {"quoting": False, "skip_rows": 1}, {"column_names": ["a", "b"]}],
    "tsv": [{}, {"header": False}, {"quoting": True}, {"encoding": "latin-1"}],
    "json": [{}, {"records_key": "data"}],
    "jsonl": [{}, {"encoding": "utf-16"}],
    "conll": [{}, {"tag_scheme": "iob1"}, {"tag_scheme": "bioes"}, {"strip_token_suffix_digits": True},
              {"separator": "\t", "skip_docstart": False}, {"token_column": 1, "tag_column": 0}],
    "squad": [{}],
    "label_line": [{}, {"encoding": "latin-1"}],
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def _write(folder: Path, fmt: str, raw: bytes, gz: bool = False) -> Path:
    path = folder / f"f{next(_counter)}.{fmt}"
    if gz:
        path = path.with_name(path.name + ".gz")
    path.write_bytes(raw)
    return path


def _check_message(error: MultitaskError, path: Path, raw: bytes | None = None) -> None:
    message = str(error)
    assert message and "\n" not in message and "\r" not in message, f"not one line: {message!r}"
    assert str(path) in message, f"does not name {path}: {message!r}"
    line = re.match(re.escape(str(path)) + r":(\d+)(?::|\b)", message)
    if line and raw is not None:
        # YAML also breaks lines at a lone \r (and \x85, \u2028...); the readers only at \n
        breaks = max(raw.count(b"\n"), raw.count(b"\r"), len(raw.decode("utf-8", "replace").splitlines()))
        assert 1 <= int(line.group(1)) <= breaks + 1, f"line out of range: {message!r}"


def _read(folder: Path, fmt: str, raw: bytes, options: dict, gz: bool = False) -> None:
    path = _write(folder, fmt, gzip.compress(raw) if gz else raw, gz)
    try:
        records = read_records(path, fmt, options)
    except MultitaskError as error:
        _check_message(error, path, raw)
    else:
        assert isinstance(records, list)
    finally:
        path.unlink()


fmt_and_options = st.sampled_from(FORMATS).flatmap(lambda fmt: st.tuples(st.just(fmt), st.sampled_from(OPTIONS[fmt])))


# ---------------------------------------------------------------------------- readers


@given(fmt_and_options, st.binary(max_size=300), st.booleans())
def test_readers_arbitrary_bytes(folder, fmt_options, raw, gz):
    fmt, options = fmt_options
    _read(folder, fmt, raw, options, gz)


@given(fmt_and_options, st.text(max_size=200))
def test_readers_arbitrary_text(folder, fmt_options, text):
    fmt, options = fmt_options
    _read(folder, fmt, text.encode("utf-8", "surrogatepass"), options)


def _mutations(draw, text: str) -> bytes:
    """A valid file damaged the way real files are: truncated, NULs, BOMs, CRLF, latin-1, long lines."""
    raw = text.encode("utf-8")
    for mutation in draw(st.lists(st.sampled_from(
            ["truncate", "nul", "bom", "utf16bom", "crlf", "cr", "latin1", "long", "dup_line", "drop_byte"]),
            max_size=3)):
        if mutation == "truncate":
            raw = raw[: draw(st.integers(0, len(raw)))]
        elif mutation == "nul":
            at = draw(st.integers(0, len(raw)))
            raw = raw[:at] + b"\0" + raw[at:]
        elif mutation == "bom":
            raw = b"\xef\xbb\xbf" + raw
        elif mutation == "utf16bom":
            raw = b"\xff\xfe" + raw
        elif mutation == "crlf":
            raw = raw.replace(b"\n", b"\r\n")
        elif mutation == "cr":
            raw = raw.replace(b"\n", b"\r")
        elif mutation == "latin1":
            raw = raw.decode("utf-8", "replace").encode("latin-1", "replace")
        elif mutation == "long":
            at = draw(st.integers(0, len(raw)))
            raw = raw[:at] + draw(st.sampled_from([b"x", b"\xe4\xb8\xad", b"\t", b"{", b'"'])) * 5000 + raw[at:]
        elif mutation == "dup_line":
            lines = raw.split(b"\n")
            index = draw(st.integers(0, len(lines) - 1))
            raw = b"\n".join(lines[: index + 1] + lines[index:])
        elif mutation == "drop_byte" and raw:
            at = draw(st.integers(0, len(raw) - 1))
            raw = raw[:at] + raw[at + 1:]
    return raw


@st.composite
def damaged(draw):
    fmt, options = draw(fmt_and_options)
    return fmt, options, _mutations(draw, VALID[fmt]), draw(st.booleans())


@given(damaged())
def test_readers_damaged_valid_files(folder, case):
    fmt, options, raw, gz = case
    _read(folder, fmt, raw, options, gz)


@pytest.mark.parametrize("fmt", FORMATS)
def test_readers_valid_samples_read(folder, fmt):
    path = _write(folder, fmt, VALID[fmt].encode("utf-8"))
    assert read_records(path, fmt, {})


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("line", [b"x" * 300_000, b"\t" * 300_000, "中".encode() * 100_000, b"\0" * 10_000])
def test_readers_huge_lines(folder, fmt, line):
    _read(folder, fmt, VALID[fmt].encode("utf-8") + line + b"\n", {})


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("depth", [50, 5000])
def test_readers_deep_nesting(folder, fmt, depth):
    _read(folder, fmt, b"[" * depth + b"]" * depth + b"\n", {})
    _read(folder, fmt, b'{"data": ' + b"[" * depth + b"]" * depth + b"}\n", {})


@pytest.mark.parametrize("fmt", FORMATS)
def test_readers_truncated_gzip(folder, fmt):
    packed = gzip.compress(VALID[fmt].encode("utf-8"))
    for end in (0, 5, 10, len(packed) // 2, len(packed) - 1):
        path = _write(folder, fmt, packed[:end], gz=True)
        try:
            read_records(path, fmt, {})
        except MultitaskError as error:
            _check_message(error, path)


# ---------------------------------------------------------------------------- YAML: task files and experiments

EXPERIMENT = textwrap.dedent("""\
    name: tiny
    encoder: {name: "offline:minilm"}
    prefix: {mode: per_task, prefix: {length: 4, mlp_hidden_size: 16}}
    tasks:
      - {file: ../tasks/cls.yaml, batch_size: 8}
      - {file: ../tasks/ner.yaml, batch_size: 4, overrides: {max_length: 8}}
    optimization: {max_steps: 12, prefix_lr: 0.01, head_lr: 0.01, warmup_ratio: 0.0}
    evaluation: {every_steps: 6, batch_size: 8}
    seed: 3
    precision: fp32
    """)
YAMLS = {**{name: text.lstrip() for name, text in TASK_YAMLS.items()}, "exp.yaml": EXPERIMENT}


def _load(path: Path, name: str) -> object:
    if name == "exp.yaml":
        return load_config(ExperimentConfig, path)
    return load_task(path)


def _load_checked(folder: Path, name: str, raw: bytes) -> None:
    path = folder / f"y{next(_counter)}_{name}"
    path.write_bytes(raw)
    try:
        _load(path, name)
    except MultitaskError as error:
        _check_message(error, path, raw)
    finally:
        path.unlink()


yaml_names = st.sampled_from(sorted(YAMLS))


@pytest.mark.parametrize("name", sorted(YAMLS))
def test_yaml_samples_load(folder, name):
    path = folder / name
    path.write_text(YAMLS[name], encoding="utf-8")
    assert _load(path, name) is not None


@given(yaml_names, st.binary(max_size=300))
@example("exp.yaml", b"a: \0")
@example("exp.yaml", b"a: &x [*x]")
@example("cls.yaml", b'"na\\nme": 1')
def test_yaml_arbitrary_bytes(folder, name, raw):
    _load_checked(folder, name, raw)


@given(yaml_names, st.text(max_size=200))
def test_yaml_arbitrary_text(folder, name, text):
    _load_checked(folder, name, text.encode("utf-8", "surrogatepass"))


@st.composite
def damaged_yaml(draw):
    name = draw(yaml_names)
    return name, _mutations(draw, YAMLS[name])


@given(damaged_yaml())
def test_yaml_damaged_valid_files(folder, case):
    name, raw = case
    _load_checked(folder, name, raw)


def _key_paths(data, prefix=()):
    """Every key path into nested mappings and lists of a parsed YAML document."""
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else []
    for key, value in items:
        yield prefix + (key,)
        yield from _key_paths(value, prefix + (key,))


yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)


@st.composite
def wrong_types(draw):
    """A valid YAML with one to three values (or keys) replaced by a value of any type."""
    name = draw(yaml_names)
    data = yaml.safe_load(YAMLS[name])
    for _ in range(draw(st.integers(1, 3))):
        paths = list(_key_paths(data))
        *parents, last = draw(st.sampled_from(paths))
        node = data
        for key in parents:
            node = node[key]
        if isinstance(node, dict) and draw(st.booleans()):
            node[draw(st.text(max_size=10) | st.integers())] = node.pop(last)  # a wrong or odd key
        else:
            node[last] = draw(yaml_values)
    return name, yaml.safe_dump(data, allow_unicode=True).encode("utf-8")


def _edited(name: str, old: str, new: str) -> tuple[str, bytes]:
    assert old in YAMLS[name]
    return name, YAMLS[name].replace(old, new, 1).encode("utf-8")


@given(wrong_types())
@example(_edited("cls.yaml", "format: tsv}", "format: tsv, options: {delimiter: ';;'}}"))
@example(_edited("ner.yaml", "format: conll}", "format: conll, options: {tag_scheme: bilou, separator: ''}}"))
@example(_edited("qa.yaml", "doc_stride: 8", "doc_stride: -1"))
@example(_edited("exp.yaml", "length: 4", "length: 0"))
@example(_edited("exp.yaml", "batch_size: 8}", "batch_size: [8]}"))
def test_yaml_wrong_types(folder, case):
    name, raw = case
    _load_checked(folder, name, raw)


def test_yaml_alias_bomb_does_not_hang(folder):
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    _load_checked(folder, "exp.yaml", "\n".join(levels).encode())


@pytest.mark.parametrize("name", sorted(YAMLS))
@pytest.mark.parametrize("text", ["{" * 5000 + "}" * 5000, "name: x\nextra: " + "[" * 900 + "]" * 900])
def test_yaml_deep_nesting(folder, name, text):
    _load_checked(folder, name, text.encode())


def test_yaml_wrong_encoding_names_file(folder):
    _load_checked(folder, "exp.yaml", EXPERIMENT.replace("tiny", "caf\xe9").encode("latin-1"))


def test_yaml_field_name_with_newline_stays_one_line(folder):
    _load_checked(folder, *_edited("cls.yaml", "text: sentence", '"te\\nxt": sentence'))
