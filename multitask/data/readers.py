"""Readers turning data files (in their original formats) into Records, one registered reader per format.

Each reader has an options dataclass whose fields (defaults and ``help`` metadata) are the
options a task YAML may give for its data; ``build_options`` validates a plain dict.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import json
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from multitask.config import from_dict
from multitask.data.records import Record
from multitask.data.tag_schemes import InvalidTagError, check_scheme, to_iob2
from multitask.errors import ConfigError, DataError
from multitask.registry import Registry


@dataclass(frozen=True)
class Reader:
    """A registered format: its read function and the dataclass holding its options."""

    read: Callable[[Path | None, Any], list[Record]]
    options_type: type


READERS: Registry[Reader] = Registry("data format")


def _register(name: str, options_type: type) -> Callable[[Callable], Callable]:
    def add(read: Callable) -> Callable:
        READERS.register(name, Reader(read=read, options_type=options_type))
        return read

    return add


# ---------------------------------------------------------------------------- options


def _option_error(name: str, expected: str) -> ValueError:
    # ValueError, as every config __post_init__ raises: from_dict turns it into a ConfigError naming file:line.
    return ValueError(f"data option {name!r} must be {expected}")


@dataclass(frozen=True)
class TextOptions:
    """Options shared by every file-based format."""

    encoding: str = field(default="utf-8", metadata={"help": "text encoding, e.g. latin-1 for TREC"})

    def __post_init__(self) -> None:
        try:
            codecs.lookup(self.encoding)
        except LookupError:
            raise _option_error("encoding", f"a known text encoding, got {self.encoding!r}") from None


_QUOTING_HELP = 'honour "..." quoting (off by default for tsv: GLUE and ChnSentiCorp text has bare quotes)'


@dataclass(frozen=True)
class CsvOptions(TextOptions):
    delimiter: str = field(default=",", metadata={"help": "one-character column separator"})
    quoting: bool = field(default=True, metadata={"help": _QUOTING_HELP})
    header: bool = field(default=True, metadata={"help": "the first row (after skip_rows) names the columns"})
    column_names: list[str] | None = field(
        default=None, metadata={"help": "names for header-less files; with header: true they replace the header"}
    )
    skip_rows: int = field(default=0, metadata={"help": "rows to skip before the header or first record"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.delimiter) != 1:
            raise _option_error("delimiter", f"one character, got {self.delimiter!r}")
        if self.skip_rows < 0:
            raise _option_error("skip_rows", f">= 0, got {self.skip_rows}")
        if self.column_names is not None and len(set(self.column_names)) != len(self.column_names):
            raise _option_error("column_names", f"unique names, got {self.column_names}")


@dataclass(frozen=True)
class TsvOptions(CsvOptions):
    delimiter: str = field(default="\t", metadata={"help": "one-character column separator"})
    quoting: bool = field(default=False, metadata={"help": _QUOTING_HELP})


@dataclass(frozen=True)
class JsonOptions(TextOptions):
    records_key: str | None = field(
        default=None, metadata={"help": "key of the record list when the file is an object, not a list"}
    )


@dataclass(frozen=True)
class JsonlOptions(TextOptions):
    pass


@dataclass(frozen=True)
class ConllOptions(TextOptions):
    token_column: int = field(default=0, metadata={"help": "column index of the token (negative counts from the end)"})
    tag_column: int = field(default=-1, metadata={"help": "column index of the tag; -1 is the last column"})
    separator: str | None = field(default=None, metadata={"help": "column separator; null splits on any whitespace"})
    skip_docstart: bool = field(default=True, metadata={"help": "drop -DOCSTART- lines (they end a sentence)"})
    strip_token_suffix_digits: bool = field(
        default=False, metadata={"help": "drop the segmentation digit ending each token (Weibo NER: 科0 -> 科)"}
    )
    tag_scheme: str = field(
        default="iob2", metadata={"help": "scheme of the file's tags (iob1, iob2, bio, bioes, iobes, bmes); read as IOB2"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.separator == "":
            raise _option_error("separator", "null or a non-empty string")
        try:
            check_scheme(self.tag_scheme)
        except ConfigError as error:
            raise ValueError(f"data option 'tag_scheme': {error}") from None


@dataclass(frozen=True)
class SquadOptions(TextOptions):
    pass


@dataclass(frozen=True)
class LabelLineOptions(TextOptions):
    pass


@dataclass(frozen=True)
class HfDatasetOptions:
    name: str | None = field(default=None, metadata={"help": "Hugging Face hub dataset name (path may then be null)"})
    config: str | None = field(default=None, metadata={"help": "dataset configuration name, e.g. sst2 for glue"})
    split: str | None = field(default=None, metadata={"help": "split to read; required when the dataset has several"})
    revision: str | None = field(default=None, metadata={"help": "hub branch, tag or commit to read"})
    load_from_disk: bool = field(default=False, metadata={"help": "path is a directory written by save_to_disk"})


def build_options(format: str, options: Mapping[str, Any] | None = None) -> Any:
    """Build ``format``'s options dataclass from a plain dict, naming any unknown or mistyped option."""
    return from_dict(READERS.get(format).options_type, dict(options or {}), source=f"data format {format!r}",
                     path="options")


def read_records(path: str | Path | None, format: str, options: Mapping[str, Any] | None = None) -> list[Record]:
    """Read ``path`` (None only for hub datasets) in ``format`` with options given as a plain dict."""
    reader = READERS.get(format)
    return reader.read(None if path is None else Path(path), build_options(format, options))


# ---------------------------------------------------------------------------- text access


def read_text(path: Path | None, encoding: str) -> str:
    """Decode a whole (optionally .gz) file at once, so a bad byte is reported with its line number."""
    if path is None:
        raise ConfigError("this data format needs a file path")
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(f"{path}: cannot read: {error}") from None
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise DataError(f"{path}:{line}: expected {encoding} text (set the encoding option, e.g. latin-1)") from None
    return text.removeprefix("\ufeff")


def numbered_lines(text: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, line without its newline); splits on \\n only, unlike str.splitlines."""
    for number, line in enumerate(text.split("\n"), start=1):
        yield number, line.removesuffix("\r")


def _load_json(path: Path, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}:{error.lineno}: expected valid JSON ({error.msg})") from None
    except RecursionError:
        raise DataError(f"{path}: expected valid JSON (nested too deeply)") from None


# ---------------------------------------------------------------------------- csv / tsv


def _csv_rows(path: Path, text: str, options: CsvOptions) -> Iterator[tuple[int, list[str]]]:
    """(first line number, row) for non-blank rows after skip_rows; a quoted field may span lines."""
    quoting = csv.QUOTE_MINIMAL if options.quoting else csv.QUOTE_NONE
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=options.delimiter, quoting=quoting)
    rows_seen = 0
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            raise DataError(f"{path}:{start}: expected a well-formed row ({error})") from None
        rows_seen += 1
        if rows_seen > options.skip_rows and row:
            yield start, row


@_register("csv", CsvOptions)
@_register("tsv", TsvOptions)
def read_delimited(path: Path | None, options: CsvOptions) -> list[Record]:
    """Rows as {column name: value} plus positional keys "0", "1", ... so tasks may map fields by index."""
    text = read_text(path, options.encoding)
    rows = _csv_rows(path, text, options)
    names = list(options.column_names or [])
    if options.header:
        header_line, header = next(rows, (0, []))
        if len(set(header)) != len(header):
            raise DataError(f"{path}:{header_line}: expected unique column names, got {header}")
        names = names or header
    records: list[Record] = []
    expected = len(names) or None
    for line, row in rows:
        expected = expected or len(row)
        if len(row) != expected:
            raise DataError(f"{path}:{line}: expected {expected} columns, got {len(row)}")
        fields = {str(index): value for index, value in enumerate(row)}
        fields.update(zip(names, row))
        records.append(Record(fields, f"{path}:{line}"))
    return records


# ---------------------------------------------------------------------------- json / jsonl


def _require_object(item: Any, where: str) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(item).__name__}")
    return item


@_register("json", JsonOptions)
def read_json(path: Path | None, options: JsonOptions) -> list[Record]:
    """A JSON list of objects, or an object whose ``records_key`` holds that list."""
    data = _load_json(path, read_text(path, options.encoding))
    key = options.records_key
    if key is not None:
        if not isinstance(data, dict) or key not in data:
            raise DataError(f"{path}: expected an object with key {key!r}")
        data = data[key]
    if not isinstance(data, list):
        hint = "" if key else " (set records_key if the list is inside an object)"
        raise DataError(f"{path}: expected a list of objects{hint}")
    sources = [f"{path}:{key or ''}[{index}]" for index in range(len(data))]
    return [Record(_require_object(item, source), source) for item, source in zip(data, sources)]


@_register("jsonl", JsonlOptions)
def read_jsonl(path: Path | None, options: JsonlOptions) -> list[Record]:
    """One JSON object per line; blank lines are ignored."""
    records: list[Record] = []
    for line, content in numbered_lines(read_text(path, options.encoding)):
        if not content.strip():
            continue
        try:
            item = json.loads(content)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{line}: expected a JSON object ({error.msg})") from None
        except RecursionError:
            raise DataError(f"{path}:{line}: expected a JSON object (nested too deeply)") from None
        records.append(Record(_require_object(item, f"{path}:{line}"), f"{path}:{line}"))
    return records


# ---------------------------------------------------------------------------- conll

# A run of non-blank lines: one sentence, unless -DOCSTART- lines cut it. Anchored at line starts: unanchored,
# a long whitespace-only line is retried from each of its characters (quadratic time).
_BLOCK = re.compile(r"^[^\n]*\S[^\n]*(?:\n[^\n]*\S[^\n]*)*", re.MULTILINE)


def _line_blocks(text: str, skip_docstart: bool) -> Iterator[tuple[int, list[str]]]:
    """(first line number, lines) per sentence; matching whole blocks keeps 2M-line files fast."""
    line, position = 1, 0
    for match in _BLOCK.finditer(text):
        line += text.count("\n", position, match.start())
        position = match.start()
        lines = match.group().split("\n")
        if skip_docstart and "-DOCSTART-" in match.group():
            yield from _cut_docstarts(line, lines)
        else:
            yield line, lines


def _cut_docstarts(first: int, lines: list[str]) -> Iterator[tuple[int, list[str]]]:
    start = 0
    for index, content in enumerate(lines + ["-DOCSTART-"]):
        if content.startswith("-DOCSTART-"):
            if index > start:
                yield first + start, lines[start:index]
            start = index + 1


def _check_widths(path: Path, first: int, rows: list[list[str]], options: ConllOptions) -> None:
    """Every row must hold distinct token and tag columns, so plain indexing is safe afterwards."""
    for width in {len(row) for row in rows}:
        token, tag = options.token_column, options.tag_column
        if -width <= token < width and -width <= tag < width and token % width != tag % width:
            continue
        needed = max(*(c + 1 if c >= 0 else -c for c in (token, tag)), 2)
        index = next(i for i, row in enumerate(rows) if len(row) == width)
        raise DataError(f"{path}:{first + index}: expected at least {needed} columns, got {width}")


def _strip_segment_digit(token: str, where: str) -> str:
    if len(token) < 2 or not token[-1].isdigit():
        raise DataError(f"{where}: expected a token followed by a segmentation digit, got {token!r}")
    return token[:-1]


def tagged_sentence(tokens: list[str], tags: list[str], options: ConllOptions,
                    locate: Callable[[int], str]) -> dict[str, list[str]]:
    """A conll record's fields from one sentence's tokens and raw tags: segmentation digits stripped when asked,
    tags read as IOB2; ``locate(i)`` names where token i came from. Shared by the file reader and hub rows."""
    if options.strip_token_suffix_digits:
        tokens = [_strip_segment_digit(token, locate(i)) for i, token in enumerate(tokens)]
    try:
        iob2 = to_iob2([tag.strip() for tag in tags], options.tag_scheme)
    except InvalidTagError as error:
        raise DataError(f"{locate(error.index)}: {error}") from None
    return {"tokens": list(tokens), "tags": iob2}


def _conll_record(path: Path, first: int, lines: list[str], options: ConllOptions) -> Record:
    rows = [content.split(options.separator) for content in lines]
    _check_widths(path, first, rows, options)
    tokens = [row[options.token_column] for row in rows]
    tags = [row[options.tag_column] for row in rows]
    return Record(tagged_sentence(tokens, tags, options, lambda i: f"{path}:{first + i}"), f"{path}:{first}")


@_register("conll", ConllOptions)
def read_conll(path: Path | None, options: ConllOptions) -> list[Record]:
    """Token-per-line files into {"tokens", "tags"} sentences, tags converted to IOB2."""
    text = read_text(path, options.encoding)
    return [_conll_record(path, first, lines, options) for first, lines in _line_blocks(text, options.skip_docstart)]


# ---------------------------------------------------------------------------- squad


def _get(obj: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = obj.get(key) if isinstance(obj, dict) else None
    if not isinstance(value, kind) or isinstance(value, bool):
        kinds = kind if isinstance(kind, tuple) else (kind,)
        raise DataError(f"{where}: expected key {key!r} holding {' or '.join(k.__name__ for k in kinds)}")
    return value


def _squad_answers(qa: dict[str, Any], where: str) -> list[dict[str, Any]]:
    """Answers as {"text", "answer_start"}; start -1 (CMRC alternative answers) is kept for text-match scoring."""
    answers = []
    for index, answer in enumerate(_get(qa, "answers", list, where)):
        answer_where = f"{where}.answers[{index}]"
        text = _get(answer, "text", str, answer_where)
        answers.append({"text": text, "answer_start": _get(answer, "answer_start", int, answer_where)})
    return answers


def squad_record(qa: Any, title: str, context: str, where: str) -> Record:
    """One question's record from its SQuAD ``qas`` entry; shared by the file reader and flat hub rows."""
    qid = qa.get("id") if isinstance(qa, dict) else None
    where = f"{where} (id {qid})" if qid is not None else where
    fields = {
        "id": str(_get(qa, "id", (str, int), where)),
        "title": title,
        "context": context,
        "question": _get(qa, "question", str, where),
        "answers": _squad_answers(qa, where),
        "is_impossible": qa.get("is_impossible", False) is True,
    }
    return Record(fields, where)


@_register("squad", SquadOptions)
def read_squad(path: Path | None, options: SquadOptions) -> list[Record]:
    """SQuAD v1/v2-style JSON into one record per question; untitled articles get their index as title."""
    data = _load_json(path, read_text(path, options.encoding))
    records: list[Record] = []
    for a, article in enumerate(_get(data, "data", list, f"{path}")):
        article_where = f"{path}:data[{a}]"
        title = article.get("title", str(a)) if isinstance(article, dict) else str(a)
        for p, paragraph in enumerate(_get(article, "paragraphs", list, article_where)):
            paragraph_where = f"{article_where}.paragraphs[{p}]"
            context = _get(paragraph, "context", str, paragraph_where)
            for q, qa in enumerate(_get(paragraph, "qas", list, paragraph_where)):
                records.append(squad_record(qa, str(title), context, f"{paragraph_where}.qas[{q}]"))
    return records


# ---------------------------------------------------------------------------- label_line


@_register("label_line", LabelLineOptions)
def read_label_line(path: Path | None, options: LabelLineOptions) -> list[Record]:
    """TREC-style ``COARSE:fine text`` lines; the coarse label is the part before the first ':'."""
    records: list[Record] = []
    for line, content in numbered_lines(read_text(path, options.encoding)):
        if not content.strip():
            continue
        parts = content.split(None, 1)
        if content[0].isspace() or len(parts) < 2:
            raise DataError(f"{path}:{line}: expected 'LABEL text', got {content[:40]!r}")
        records.append(Record(label_line_fields(*parts), f"{path}:{line}"))
    return records


def label_line_fields(label: str, text: str) -> dict[str, str]:
    """A label_line record's fields from the full label (``COARSE:fine``) and the text; shared with hub rows."""
    return {"label": label, "coarse_label": label.split(":", 1)[0], "fine_label": label, "text": text.strip()}


# ---------------------------------------------------------------------------- hf_dataset


def _pick_split(loaded: Any, split: str | None, where: str) -> Any:
    """A Dataset from what datasets returned, which is a DatasetDict when no split was named."""
    import datasets

    if not isinstance(loaded, datasets.DatasetDict):
        return loaded
    if split not in loaded:
        raise ConfigError(f"{where}: data option 'split' must be one of {', '.join(sorted(loaded))}, got {split!r}")
    return loaded[split]


def load_hf_dataset(name: str | None, config: str | None = None, split: str | None = None, *,
                    revision: str | None = None, from_disk: Path | None = None) -> Any:
    """One split of a Hugging Face dataset (a ``datasets.Dataset``): from the hub (``name``, through
    ``load_dataset``) or from a save_to_disk folder (``from_disk``). Any failure, offline included, is a DataError
    whose message is one line; the hf_dataset format and hub copies (multitask.data.hub) both load through here."""
    where = str(from_disk) if from_disk is not None else str(name)
    try:
        import datasets

        if from_disk is not None:
            loaded = datasets.load_from_disk(str(from_disk))
        else:
            loaded = datasets.load_dataset(name, config, split=split, revision=revision)
    except Exception as error:  # offline, unknown id, script-only repository, missing package: all one line
        message = " ".join(str(error).split())[:300] or type(error).__name__
        raise DataError(f"{where}: cannot load dataset: {message}") from None
    return _pick_split(loaded, split, where)


@_register("hf_dataset", HfDatasetOptions)
def read_hf_dataset(path: Path | None, options: HfDatasetOptions) -> list[Record]:
    """Rows of a Hugging Face dataset, from the hub (``name``) or a save_to_disk directory."""
    if options.load_from_disk and (path is None or options.name is not None):
        raise ConfigError("data option 'load_from_disk' needs a path and no 'name'")
    if path is None and options.name is None:
        raise ConfigError("format hf_dataset needs a path or data option 'name'")
    where = str(path) if options.name is None else options.name
    dataset = load_hf_dataset(options.name if options.name is not None else str(path), options.config, options.split,
                              revision=options.revision, from_disk=path if options.load_from_disk else None)
    label = options.split or "rows"
    return [Record(dict(row), f"{where}:{label}[{index}]") for index, row in enumerate(dataset)]
