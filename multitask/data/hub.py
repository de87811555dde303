"""Hub copies of task data: a split's ``hub:`` source, read with `datasets` when its local file is missing.

The rows are turned into exactly the records the split's own format gives for the local file, so a task's
``fields`` mapping and labels work unchanged whichever copy was read. The conversion is per format and lives
here, in one table (``ROW_FORMATS``):

- conll: a tokens column and a tags column (rename e.g. ``ner_tags`` with ``columns``); ClassLabel tag ids (or
  plain ids with ``names``) become tag names such as ``B-PER``, then the same reader options apply as for the file
  (segmentation digits, tag scheme to IOB2). Space-separated strings are split.
- squad: flat rows (id, title, context, question, answers{text, answer_start}) become the nested reader's
  records; rows without a title get the ordinal of their context, as the reader numbers untitled articles.
- label_line: a ``label`` column holding ``COARSE:fine`` (rename e.g. ``fine_label``) plus ``text``.
- csv / tsv: every value as text, as the file reader gives it; ClassLabel values as names or ids (``class_labels``).
- json / jsonl: values as they are, ClassLabel values as names or ids.
- hf_dataset: rows as they are (what that format gives).

``hub.name`` may also be a folder written by ``save_to_disk`` (read with ``load_from_disk``), which is how the
tests, and machines with a copy but no network, use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from multitask.data.readers import label_line_fields, load_hf_dataset, squad_record, tagged_sentence
from multitask.data.records import Record
from multitask.errors import ConfigError, DataError

# Files save_to_disk writes at the top of a Dataset / DatasetDict folder.
_SAVED_MARKERS = ("state.json", "dataset_dict.json")


@dataclass
class HubSource:
    """The same split on the Hugging Face hub, read with `datasets` when the local file is missing; its rows
    become the records the split's own format gives (ClassLabel ids turned into names, SQuAD rows regrouped)."""

    name: str = field(metadata={"help": "Hub dataset id (e.g. nyu-mll/glue), or a folder written by save_to_disk."})
    split: str = field(metadata={"help": "Hub split holding this split's data, e.g. train or validation."})
    config: str | None = field(default=None, metadata={"help": "Dataset configuration, e.g. sst2 for glue."})
    revision: str | None = field(
        default=None, metadata={"help": "Branch, tag or commit, e.g. refs/convert/parquet for script-only datasets."}
    )
    columns: dict[str, str] = field(
        default_factory=dict, metadata={"help": "Rename hub columns to the local file's, e.g. {ner_tags: tags}."}
    )
    class_labels: str = field(
        default="names", metadata={"help": "ClassLabel values in table formats: names (e.g. ABBR) or ids written as "
                                           "text (\"0\", \"1\", as GLUE files have them). Tags always become names."}
    )
    names: dict[str, list[str]] = field(
        default_factory=dict, metadata={"help": "Names of integer columns that carry no ClassLabel, by column (after "
                                                "renaming), e.g. {tags: [O, B-Chemical, ...]}."}
    )
    options: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "Reader options for the hub rows, over the split's own, e.g. "
                                                "{strip_token_suffix_digits: false}."}
    )

    def __post_init__(self) -> None:
        if not self.name.strip() or not self.split.strip():
            raise ValueError("hub 'name' and 'split' must not be empty")
        if self.class_labels not in ("names", "ids"):
            raise ValueError(f"hub 'class_labels' must be names or ids, got {self.class_labels!r}")
        targets = list(self.columns.values())
        if len(set(targets)) != len(targets):
            raise ValueError(f"hub 'columns' must rename to distinct names, got {self.columns}")

    def describe(self) -> str:
        """The hub source in a few words, e.g. ``nyu-mll/glue (config sst2, split train)``."""
        parts = ([f"config {self.config}"] if self.config else []) + [f"split {self.split}"]
        parts += [f"revision {self.revision}"] if self.revision else []
        return f"{self.name} ({', '.join(parts)})"


class HubLoadError(DataError):
    """The hub copy could not be loaded at all (offline, unknown id...), as opposed to a row that does not fit."""


def saved_copy(name: str) -> Path | None:
    """The folder when ``name`` is a save_to_disk copy (a Dataset or DatasetDict folder), else None."""
    folder = Path(name).expanduser()
    if folder.is_dir() and any((folder / marker).is_file() for marker in _SAVED_MARKERS):
        return folder
    return None


def load_hub_split(hub: HubSource) -> Any:
    """The hub source's split as a ``datasets.Dataset``; HubLoadError (one line) when it cannot be loaded."""
    try:
        return load_hf_dataset(hub.name, hub.config, hub.split, revision=hub.revision, from_disk=saved_copy(hub.name))
    except ConfigError as error:  # loaded, but it has no such split: a setting to fix, not a download to retry
        raise DataError(str(error).replace("data option 'split'", "hub 'split'")) from None
    except DataError as error:
        raise HubLoadError(str(error).removeprefix(f"{saved_copy(hub.name) or hub.name}: ")) from None


def hub_records(hub: HubSource, format: str, options: Any) -> list[Record]:
    """The hub split's rows as the records ``format`` gives; ``options`` are the format's (already merged)."""
    convert = ROW_FORMATS.get(format)
    if convert is None:
        raise ConfigError(f"format {format!r} has no hub conversion; known: {', '.join(sorted(ROW_FORMATS))}")
    dataset = load_hub_split(hub)
    table = _Table(hub, dataset)
    return convert(table, options)


# ---------------------------------------------------------------------------- rows and their features


class _Table:
    """The rows of one hub split with columns renamed, and what each column's ClassLabel (or ``names``) says."""

    def __init__(self, hub: HubSource, dataset: Any) -> None:
        self.hub = hub
        self.dataset = dataset
        self.where = f"{hub.name}:{hub.split}"
        features = dict(getattr(dataset, "features", None) or {})
        missing = sorted(set(hub.columns) - set(features)) if features else []
        if missing:
            raise DataError(f"{self.where}: hub 'columns' renames {', '.join(missing)}, which the dataset lacks; "
                            f"its columns: {', '.join(features)}")
        self.columns = [hub.columns.get(column, column) for column in features]
        self.label_names: dict[str, list[str]] = {}
        for column, feature in features.items():
            names = _class_label_names(feature)
            if names is not None:
                self.label_names[hub.columns.get(column, column)] = names
        for column, names in hub.names.items():
            self.label_names.setdefault(column, list(names))

    def rows(self) -> Any:
        """(index, row) with renamed columns; values are what datasets gives (ClassLabel values still ids)."""
        rename = self.hub.columns
        for index, row in enumerate(self.dataset):
            yield index, {rename.get(key, key): value for key, value in row.items()}

    def locate(self, index: int) -> str:
        return f"{self.where}[{index}]"

    def require(self, needed: tuple[str, ...], hint: str) -> None:
        missing = [column for column in needed if column not in self.columns]
        if missing:
            raise DataError(f"{self.where}: expected column(s) {', '.join(missing)} ({hint}); the dataset has: "
                            f"{', '.join(self.columns)} (rename with hub 'columns')")

    def name_of(self, column: str, value: Any, index: int) -> Any:
        """A ClassLabel (or ``names``) id as its name; other values unchanged."""
        names = self.label_names.get(column)
        if names is None or not isinstance(value, int) or isinstance(value, bool):
            return value
        if not 0 <= value < len(names):
            raise DataError(f"{self.locate(index)}: column {column!r} holds id {value}, outside its "
                            f"{len(names)} names")
        return names[value]

    def label_value(self, column: str, value: Any, index: int) -> Any:
        """A value of a table/json column: ClassLabel ids as names, or as ids when ``class_labels: ids``."""
        if column not in self.label_names:
            return value
        if isinstance(value, list):
            return [self.label_value(column, item, index) for item in value]
        if self.hub.class_labels == "ids":
            return value
        return self.name_of(column, value, index)


def _class_label_names(feature: Any) -> list[str] | None:
    """Names of a ClassLabel column, or of a list column whose items are ClassLabels."""
    import datasets

    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    inner = getattr(feature, "feature", None)
    if inner is not None and isinstance(inner, datasets.ClassLabel):
        return list(inner.names)
    return None


# ---------------------------------------------------------------------------- per format


def _as_text(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, list):
        return [_as_text(item) for item in value]
    return value if isinstance(value, str) else str(value)


def _table_rows(table: _Table, options: Any) -> list[Record]:
    """csv / tsv: every value as text, as the file reader gives it."""
    return [Record({key: _as_text(table.label_value(key, value, index)) for key, value in row.items()},
                   table.locate(index)) for index, row in table.rows()]


def _json_rows(table: _Table, options: Any) -> list[Record]:
    return [Record({key: table.label_value(key, value, index) for key, value in row.items()}, table.locate(index))
            for index, row in table.rows()]


def _raw_rows(table: _Table, options: Any) -> list[Record]:
    return [Record(row, table.locate(index)) for index, row in table.rows()]


def _sequence(value: Any, what: str, where: str) -> list[Any]:
    if isinstance(value, str):
        return value.split()
    if not isinstance(value, list):
        raise DataError(f"{where}: expected {what} as a list, got {type(value).__name__}")
    return value


def _conll_rows(table: _Table, options: Any) -> list[Record]:
    table.require(("tokens", "tags"), "token-per-item sentences; e.g. columns: {ner_tags: tags}")
    records = []
    for index, row in table.rows():
        where = table.locate(index)
        tags = [table.name_of("tags", tag, index) for tag in _sequence(row["tags"], "tags", where)]
        tokens = [str(token) for token in _sequence(row["tokens"], "tokens", where)]
        if isinstance(row["tokens"], str) and len(tokens) == 1 and len(row["tokens"].strip()) == len(tags) > 1:
            tokens = list(row["tokens"].strip())  # a character-level sentence written as one string
        if len(tags) != len(tokens):
            raise DataError(f"{where}: {len(tokens)} tokens but {len(tags)} tags")
        not_names = [tag for tag in tags if not isinstance(tag, str)]
        if not_names:
            raise DataError(f"{where}: tag {not_names[0]!r} is an id without a name (the column is no ClassLabel: "
                            f"give hub 'names: {{tags: [...]}}')")
        records.append(Record(tagged_sentence(tokens, tags, options, lambda i, w=where: f"{w} token {i}"), where))
    return records


def _answers(value: Any, where: str) -> list[dict[str, Any]]:
    """SQuAD answers from the hub's {text: [...], answer_start: [...]} (or a list of {text, answer_start})."""
    if isinstance(value, dict):
        texts, starts = value.get("text") or [], value.get("answer_start") or []
        if len(texts) != len(starts):
            raise DataError(f"{where}: answers hold {len(texts)} texts but {len(starts)} starts")
        return [{"text": text, "answer_start": start} for text, start in zip(texts, starts)]
    if isinstance(value, list):
        return list(value)
    raise DataError(f"{where}: expected 'answers' as {{text, answer_start}}, got {type(value).__name__}")


def _squad_rows(table: _Table, options: Any) -> list[Record]:
    table.require(("id", "context", "question", "answers"), "flat SQuAD rows")
    records, context_numbers = [], {}
    has_title = "title" in table.columns
    for index, row in table.rows():
        where = table.locate(index)
        context = row["context"]
        title = row["title"] if has_title else str(context_numbers.setdefault(context, len(context_numbers)))
        answers = _answers(row["answers"], where)
        # SQuAD v2 on the hub has no is_impossible column: an unanswerable question is one without answers.
        impossible = bool(row["is_impossible"]) if "is_impossible" in row else not answers
        qa = {"id": row["id"], "question": row["question"], "answers": answers, "is_impossible": impossible}
        if not isinstance(context, str):
            raise DataError(f"{where}: expected key 'context' holding str")
        records.append(squad_record(qa, str(title), context, where))
    return records


def _label_line_rows(table: _Table, options: Any) -> list[Record]:
    table.require(("label", "text"), "the full COARSE:fine label and the text; e.g. columns: {fine_label: label}")
    return [Record(label_line_fields(str(table.name_of("label", row["label"], index)), str(row["text"])),
                   table.locate(index)) for index, row in table.rows()]


ROW_FORMATS: dict[str, Callable[[_Table, Any], list[Record]]] = {
    "conll": _conll_rows,
    "squad": _squad_rows,
    "label_line": _label_line_rows,
    "csv": _table_rows,
    "tsv": _table_rows,
    "json": _json_rows,
    "jsonl": _json_rows,
    "hf_dataset": _raw_rows,
}
