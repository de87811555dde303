"""The report header as words, numbers and tables: what both markdown.py and html.py print above the scores.

``report.json`` keeps the run's metadata as the trainer wrote it (dicts, byte counts, seconds, the settings as
one sentence per task); this module turns each known key into something a person reads in one glance, and any
other key into text without Python or JSON punctuation. Old reports that lack keys simply get fewer lines.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from multitask.reporting.model import RunReport

MISSING = "–"
# Short facts shown side by side under the title, with readable names, in this order.
FACT_LABELS = {
    "encoder": "Encoder",
    "method": "Method",
    "prefix_mode": "Prefix mode",
    "steps": "Steps",
    "best_step": "Best step",
    "precision": "Precision",
    "device": "Device",
    "tf32": "TF32",
    "frozen_encoder_dtype": "Frozen encoder dtype",
    "created": "Created",
    "evaluated_run": "Evaluated run",
}
# Keys folded into another line (or shown elsewhere), so they are not printed again on their own.
FOLDED = {"run_name", "precision_reason", "train_time_s", "evaluation_time_s", "preparation_time_s",
          "trainable_parameters", "encoder_parameters", "peak_gpu_memory_bytes"}
# Column names of the settings table (TaskTuning's fields); unknown settings get their key, spaced out.
SETTING_LABELS = {
    "prefix_length": "Prefix length",
    "reparameterize": "Reparameterize",
    "prefix_dropout": "Prefix dropout",
    "prefix_lr": "Prefix LR",
    "head_lr": "Head LR",
    "warmup_ratio": "Warm-up ratio",
    "prefix_attention": "Prefix attention",
}
SETTINGS_NOTE = ("With each value, where it came from: \"task file\" (the task's file or the experiment's per-task "
                 "overrides), \"experiment\" (one value for every task), or \"default\" (tuned for the task's type; "
                 "another type's or a method's default is named).")
# One "key value (source)" item of TaskTuning.describe(): "task sst2: prefix_length 32 (task file), ...".
SETTING_ITEM = re.compile(r"(\w+) (.+?) \(([^()]*)\)(?:, |$)")
HASH_CHARS = 12
INT_LIST = re.compile(r"\[(\d+(?:, \d+)*)\]")


@dataclass
class Cell:
    """One table cell: its text and, optionally, a small note printed with it (e.g. where a setting came from);
    ``marked`` notes stand out (a setting someone chose rather than a default)."""

    text: str
    note: str = ""
    marked: bool = False


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[Cell]]
    numeric_from: int  # columns from here on are right-aligned
    notes: list[str] = field(default_factory=list)


@dataclass
class Header:
    """``facts``: short (label, value) pairs; ``lines``: (label, sentence) pairs; then the tables."""

    facts: list[tuple[str, str]]
    lines: list[tuple[str, str]]
    tables: list[Table]


def build_header(report: RunReport) -> Header:
    """Everything in ``report.meta`` as facts, sentences and tables; unknown keys are kept, made readable."""
    meta = {k: v for k, v in report.meta.items() if v is not None}
    facts = [(label, _fact_text(key, meta)) for key, label in FACT_LABELS.items() if key in meta]
    lines = [line for line in (_time_line(meta), _evaluations_line(meta), _parameters_line(meta),
                               _examples_line(meta), _memory_line(meta), _cosine_line(meta),
                               _cache_line(meta), _base_line(meta)) if line]
    types = {name: task.type for name, task in report.tasks.items()}
    tables = [table for table in (_settings_table(meta.get("settings"), types), _transfer_table(meta.get("transfer")))
              if table]
    handled = set(FACT_LABELS) | FOLDED | {"wall_time_s", "evaluation_minutes", "parameters", "train_examples_seen",
                                           "peak_rss_bytes", "prefix_init_cosine", "frozen_cache", "base",
                                           "settings", "transfer"}
    for key, value in meta.items():
        if key in handled:
            continue
        text = readable(value, key)
        if text:
            (lines if isinstance(value, (dict, list, tuple)) else facts).append((label_of(key), text))
    return Header(facts=facts, lines=lines, tables=tables)


# --- numbers in words -----------------------------------------------------------------------------------------

def duration(seconds: float) -> str:
    """Seconds as '1h 02m 03s' / '4m 05s' / '12.3s': wall times span seconds to days."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


def size(num_bytes: float) -> str:
    """Bytes as '376 B' / '12.3 KB' / '359.4 MB' / '2.9 GB' (units of 1024, as the comparison tables)."""
    value = float(num_bytes)
    for unit in ("B", "KB", "MB", "GB"):
        if abs(value) < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return MISSING


def count(value: Any) -> str:
    """An integer with thousands separators ('14,016'); other values as ``readable`` spells them."""
    return f"{int(value):,}" if _is_number(value) and math.isfinite(value) and float(value).is_integer() \
        else readable(value)


def number(value: float) -> str:
    """A float as people write it: at most four decimals, no exponent, no '-0'; thousands separated."""
    if not math.isfinite(value):
        return str(value)
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    text = f"{value:.4f}".rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def fixed(value: Any, decimals: int) -> str:
    """A number with a fixed count of decimals ('0.0065', '0.480'), '-0.0000' written as '0.0000'."""
    if not _is_number(value):
        return readable(value)
    text = f"{value:.{decimals}f}"
    return text[1:] if text.startswith("-") and not text.strip("-0.") else text


def readable(value: Any, key: str = "") -> str:
    """Any JSON value as plain text: 'a 1, b 2' for a dict, 'x, y' for a list, sizes and durations by key name."""
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if _is_number(value):
        if key.endswith("_bytes"):
            return size(value)
        if key.endswith("_s"):
            return duration(float(value))
        return f"{value:,}" if isinstance(value, int) else number(float(value))
    if isinstance(value, dict):
        items = [f"{k} {_nested(v, str(k))}" for k, v in value.items()]
        return ", ".join(items) if items else "none"
    if isinstance(value, (list, tuple)):
        return ", ".join(_nested(v, key) for v in value) if value else "none"
    return str(value)


def label_of(key: str) -> str:
    """'peak_rss_bytes' -> 'Peak rss bytes': a meta key as a label, for keys this module does not know."""
    return key.replace("_", " ").strip().capitalize() or key


def _nested(value: Any, key: str) -> str:
    text = readable(value, key)
    return f"({text})" if isinstance(value, (dict, list, tuple)) and value else text


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _seconds(meta: dict[str, Any], key: str) -> float | None:
    value = meta.get(key)
    return float(value) if _is_number(value) else None


def _names(names: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    if len(names) < 2:
        return names[0] if names else MISSING
    return ", ".join(names[:-1]) + " and " + names[-1]


# --- facts and lines --------------------------------------------------------------------------------------------

def _fact_text(key: str, meta: dict[str, Any]) -> str:
    value = meta[key]
    if key == "precision" and meta.get("precision_reason"):
        return f"{value} ({meta['precision_reason']})"
    if key == "tf32":
        return "on" if value else "off"
    if key in ("steps", "best_step"):
        return count(value)
    return readable(value, key)


def _time_line(meta: dict[str, Any]) -> tuple[str, str] | None:
    """'20m 14s in all: preparation 35.1s, training 15m 38s, evaluation 4m 03s (20% of the wall time)'."""
    wall = _seconds(meta, "wall_time_s")
    parts = [f"{word} {duration(s)}" for word, key in (("preparation", "preparation_time_s"),
                                                       ("training", "train_time_s"),
                                                       ("evaluation", "evaluation_time_s"))
             if (s := _seconds(meta, key)) is not None]
    evaluation = _seconds(meta, "evaluation_time_s")
    if evaluation is not None and wall:
        parts[-1] += f" ({100 * evaluation / wall:.0f}% of the wall time)"
    if wall is None and not parts:
        return None
    text = duration(wall) if wall is not None else ""
    if parts:
        text = f"{text} in all: {', '.join(parts)}" if text else ", ".join(parts)
    return "Wall time", text


def _evaluations_line(meta: dict[str, Any]) -> tuple[str, str] | None:
    """'12 during training, every 50 steps from step 50 to 600, after 0.2, 0.4, … and 3.8 min of training'."""
    minutes = meta.get("evaluation_minutes")
    if not isinstance(minutes, dict) or not minutes:
        return None
    try:
        points = sorted((int(step), float(value)) for step, value in minutes.items())
    except (TypeError, ValueError):
        return "Evaluations", readable(minutes)
    steps = [step for step, _ in points]
    times = _names([f"{value:.1f}" for _, value in points])
    gaps = {b - a for a, b in zip(steps, steps[1:])}
    if len(points) == 1:
        said = f"at step {count(steps[0])}, after {times} min of training"
    elif len(gaps) == 1:
        said = (f"every {count(gaps.pop())} steps from step {count(steps[0])} to {count(steps[-1])}, "
                f"after {times} min of training")
    else:
        said = "at step " + ", ".join(f"{count(step)} after {value:.1f} min" for step, value in points)
        said += " of training"
    return "Evaluations", f"{len(points)} during training, {said}"


def _parameters_line(meta: dict[str, Any]) -> tuple[str, str] | None:
    """The trainer's own sentence, one part after another; else the two counts it records."""
    text = meta.get("parameters")
    if isinstance(text, str) and text:
        return "Parameters", "; ".join(part.strip() for part in text.split(" | "))
    trainable, encoder = meta.get("trainable_parameters"), meta.get("encoder_parameters")
    if _is_number(trainable) and _is_number(encoder) and encoder:
        return "Parameters", (f"{count(trainable)} trainable, {100 * trainable / encoder:.3f}% of the encoder's "
                              f"{count(encoder)}")
    if text is not None:
        return "Parameters", readable(text)
    return ("Parameters", f"{count(trainable)} trainable") if _is_number(trainable) else None


def _examples_line(meta: dict[str, Any]) -> tuple[str, str] | None:
    seen = meta.get("train_examples_seen")
    return ("Training examples seen", count(seen)) if seen is not None else None


def _memory_line(meta: dict[str, Any]) -> tuple[str, str] | None:
    places = (("in RAM", "peak_rss_bytes"), ("on the GPU", "peak_gpu_memory_bytes"))
    parts = [f"{size(v)} {where}" for where, key in places
             if _is_number(v := meta.get(key))]
    return ("Peak memory", ", ".join(parts)) if parts else None


def _cosine_line(meta: dict[str, Any]) -> tuple[str, str] | None:
    """Initial prefix cosines: mean pairwise cosine of each new prefix's virtual tokens as initialised."""
    cosines = meta.get("prefix_init_cosine")
    if not cosines:
        return None
    if not isinstance(cosines, dict):
        return "Initial prefix cosine", readable(cosines)
    values = ", ".join(f"{name} {fixed(v, 4)}" for name, v in cosines.items())
    return ("Initial prefix cosine",
            f"{values} (mean pairwise cosine of each prefix's starting virtual tokens; near 0: varied tokens, "
            "near 1: all alike)")


def _cache_line(meta: dict[str, Any]) -> tuple[str, str] | None:
    """'14,016 hits, 21,456 misses (40% of lookups); 21,456 inputs stored, 359.4 MB in host memory; ...'."""
    cache = meta.get("frozen_cache")
    if not isinstance(cache, dict):
        return None
    hits, misses = cache.get("hits"), cache.get("misses")
    parts = []
    if _is_number(hits) and _is_number(misses):
        total = hits + misses
        rate = f" ({100 * hits / total:.0f}% of lookups hit)" if total else ""
        parts.append(f"{count(hits)} hits, {count(misses)} misses{rate}")
    stored = [f"{count(cache['stored_inputs'])} inputs" if _is_number(cache.get("stored_inputs")) else "",
              size(cache["stored_bytes"]) if _is_number(cache.get("stored_bytes")) else ""]
    stored = [s for s in stored if s]
    if stored:
        where = {"host": " in host memory", "device": " in GPU memory", "disk": " on disk"}.get(
            cache.get("location"), f" ({cache['location']})" if cache.get("location") else "")
        parts.append(f"{', '.join(stored)} stored{where}")
    boundaries = cache.get("boundaries")
    if isinstance(boundaries, dict) and boundaries:
        by_layer: dict[Any, list[str]] = {}
        for task, layer in boundaries.items():
            by_layer.setdefault(layer, []).append(str(task))
        parts.append("; ".join(f"layers below {layer} cached for {_names(tasks)}" for layer, tasks in by_layer.items()))
    known = {"hits", "misses", "stored_inputs", "stored_bytes", "location", "boundaries"}
    parts += [f"{label_of(k).lower()} {readable(v, k)}" for k, v in cache.items() if k not in known]
    return "Frozen-layer cache", "; ".join(parts) if parts else "on"


def _base_line(meta: dict[str, Any]) -> tuple[str, str] | None:
    """A grown run's base: 'path (checkpoint ec72da728fe4…, tasks a, b and c)'."""
    base = meta.get("base")
    if not isinstance(base, dict):
        return None if base is None else ("Grown from", readable(base))
    details = []
    digest = base.get("checkpoint_sha256")
    if isinstance(digest, str) and digest:
        details.append(f"checkpoint {digest[:HASH_CHARS]}…" if len(digest) > HASH_CHARS else f"checkpoint {digest}")
    tasks = base.get("tasks")
    if isinstance(tasks, list) and tasks:
        details.append(f"tasks {_names([str(t) for t in tasks])}")
    details += [f"{label_of(k).lower()} {readable(v, k)}" for k, v in base.items()
                if k not in ("path", "checkpoint_sha256", "tasks")]
    path = str(base.get("path", "")) or "a base run"
    return "Grown from", f"{path} ({', '.join(details)})" if details else path


# --- tables -----------------------------------------------------------------------------------------------------

def parse_settings(text: str) -> dict[str, tuple[str, str]] | None:
    """TaskTuning.describe()'s sentence as setting -> (value, source); None when it is not in that form."""
    body = text.split(": ", 1)[1] if text.startswith("task ") and ": " in text else text
    items, position = {}, 0
    for match in SETTING_ITEM.finditer(body):
        if match.start() != position:
            return None
        value = match.group(2)
        items[match.group(1)] = ({"True": "yes", "False": "no"}.get(value, value), match.group(3))
        position = match.end()
    return items if items and position == len(body) else None


def _task_settings(value: Any) -> dict[str, tuple[str, str]] | None:
    """One task's settings from the sentence form, or from a {setting: {value, source}} / {setting: value} dict."""
    if isinstance(value, str):
        return parse_settings(value)
    if isinstance(value, dict):
        return {str(k): (readable(v.get("value")), str(v.get("source", ""))) if isinstance(v, dict)
                else (readable(v), "") for k, v in value.items()}
    return None


def _settings_table(settings: Any, types: dict[str, str]) -> Table | None:
    """Rows are tasks, columns settings; each cell is the value with its source under it ("ner default" is
    "default" in the row of an NER task: the type is the summary's, and narrow columns fit a narrow window)."""
    if not isinstance(settings, dict) or not settings:
        return None
    parsed = {str(task): _task_settings(value) for task, value in settings.items()}
    keys = list(dict.fromkeys(k for items in parsed.values() if items for k in items))
    rows = [[Cell(task), *(_setting_cell(*items[k], types.get(task)) if k in items else Cell(MISSING) for k in keys)]
            for task, items in parsed.items() if items]
    notes = [f"{task}: {readable(settings[task])}" for task, items in parsed.items() if not items]
    if not rows:
        return Table("Settings", [], [], 1, notes)
    columns = ["Task", *(SETTING_LABELS.get(k, label_of(k)) for k in keys)]
    return Table("Settings", columns, rows, numeric_from=len(columns), notes=[SETTINGS_NOTE, *notes])


def _setting_cell(value: str, source: str, task_type: str | None) -> Cell:
    shown = "default" if task_type and source == f"{task_type} default" else source
    return Cell(value, shown, marked=bool(source) and not source.endswith("default"))


def _transfer_table(transfer: Any) -> Table | None:
    """A grown run's new tasks: how each prefix (and head) started, and the candidates auto scored or skipped."""
    if not isinstance(transfer, dict) or not transfer:
        return None
    rows, notes = [], []
    losses = any(isinstance(c, dict) and _held_back(c) for c in transfer.values())
    mixing = any(isinstance(c, dict) and c.get("mixing_weights") for c in transfer.values())
    for task, choice in transfer.items():
        if not isinstance(choice, dict):
            notes.append(f"{task}: {readable(choice)}")
            continue
        row = [Cell(str(task)), Cell(readable(choice.get("setting"))), Cell(readable(choice.get("source"))),
               Cell(readable(choice.get("head_from")) if choice.get("head_from") else "new")]
        if losses:
            scores = _held_back(choice)
            row.append(Cell(", ".join(f"{k} {_candidate_text(v)}" for k, v in scores.items()) if scores else MISSING))
        if mixing:
            row.append(Cell(_mixing_text(choice.get("mixing_weights"))))
        rows.append(row)
        skipped = choice.get("skipped")
        if isinstance(skipped, dict):
            notes += [f"{task} could not start from {source}: {_ranges(readable(reason))}"
                      for source, reason in skipped.items()]
        trial = choice.get("trial")
        if isinstance(trial, dict) and trial:
            notes.append(f"{task}: {_trial_text(trial)}")
        known = {"setting", "source", "head_from", "held_back_train_loss", "held_back", "trial", "mixing_weights",
                 "skipped"}
        notes += [f"{task}: {label_of(k).lower()} {readable(v, k)}" for k, v in choice.items() if k not in known]
    columns = ["Task", "Transfer setting", "Prefix started from", "Head started from"]
    columns += ["Candidates' scores (auto)"] * losses + ["Mean mixing weights"] * mixing
    return Table("Prefix transfer", columns, rows, numeric_from=len(columns), notes=notes)


def _held_back(choice: dict) -> dict:
    """auto's candidates and their held-back scores (reports before folds kept the loss alone)."""
    scores = choice.get("held_back") or choice.get("held_back_train_loss") or {}
    return scores if isinstance(scores, dict) else {}


def _trial_text(trial: dict) -> str:
    if trial.get("criterion") == "evidence":
        return (f"auto scored each candidate, untrained, by the evidence of a linear head on its features over "
                f"{trial.get('examples')} training examples")
    return (f"auto trained each candidate {trial.get('steps')} steps in each of {trial.get('folds')} held-back "
            f"fold(s) of the training data and chose by "
            f"{trial.get('metric') if trial.get('criterion') == 'metric' else 'loss'}")


def _candidate_text(score: Any) -> str:
    if not isinstance(score, dict):
        return fixed(score, 3)
    if score.get("evidence") is not None:
        return f"evidence {fixed(score['evidence'], 4)}"
    loss = f"loss {fixed(score.get('loss'), 3)}"
    return f"{fixed(score['metric'], 3)} ({loss})" if score.get("metric") is not None else loss


def _ranges(text: str) -> str:
    """Lists of layer numbers inside a message as people write them: '[0, 1, 2, 5]' -> '0-2 and 5'."""

    def spell(match: re.Match) -> str:
        numbers = [int(n) for n in match.group(1).split(", ")]
        runs: list[list[int]] = []
        for n in numbers:
            if runs and n == runs[-1][-1] + 1:
                runs[-1].append(n)
            else:
                runs.append([n])
        return _names([f"{r[0]}–{r[-1]}" if len(r) > 2 else ", ".join(map(str, r)) for r in runs])

    return INT_LIST.sub(spell, text)


def _mixing_text(weights: Any) -> str:
    if not isinstance(weights, dict) or not weights:
        return MISSING
    mean = weights.get("mean")
    if not isinstance(mean, dict):
        return readable(weights)
    text = ", ".join(f"{k} {fixed(v, 2)}" for k, v in mean.items())
    return f"{text} ({weights['split']})" if weights.get("split") else text
