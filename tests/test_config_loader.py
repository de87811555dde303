"""The config loader: typed loading, one-line errors that point at file:line and key, overrides."""

from __future__ import annotations

import json
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import pytest
import yaml

from multitask.config import apply_overrides, describe, from_dict, load_config, load_yaml, to_dict
from multitask.errors import ConfigError


@dataclass
class Optim:
    lr: float = 1e-3
    schedule: Literal["linear", "cosine", "constant"] = "linear"


@dataclass
class Task:
    name: str
    type: Literal["classification", "ner"]
    batch_size: int = 16
    labels: list[str] = field(default_factory=list)
    data_dir: Optional[Path] = None

    def __post_init__(self) -> None:
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")


@dataclass
class Experiment:
    """One training run over several tasks."""

    name: str = field(metadata={"help": "run name | used for the output folder"})
    tasks: list[Task] = field(default_factory=list)
    optim: Optim = field(default_factory=Optim)
    seed: int | None = None
    fp16: bool = False
    loss_weights: dict[str, float] = field(default_factory=dict)
    max_lengths: tuple[int, ...] = (128,)
    label_or_id: int | str = 0
    extra: Any = None


VALID = """\
# a comment
name: demo
tasks:
  - name: sst2
    type: classification
    labels: [neg, pos]
    data_dir: data/sst2
  - name: conll
    type: ner
    batch_size: 8
optim:
  lr: 5e-4
  schedule: cosine
seed: 7
fp16: true
loss_weights: {sst2: 1, conll: 0.5}
max_lengths: [128, 256]
label_or_id: pos
extra: {anything: [1, 2]}
"""


def write(tmp_path: Path, text: str, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def test_valid_yaml_loads_into_typed_dataclasses(tmp_path):
    exp = load_config(Experiment, write(tmp_path, VALID))
    assert exp.tasks[0] == Task("sst2", "classification", labels=["neg", "pos"], data_dir=Path("data/sst2"))
    assert exp.tasks[1].batch_size == 8 and exp.tasks[1].data_dir is None
    assert exp.optim == Optim(lr=5e-4, schedule="cosine")
    assert isinstance(exp.loss_weights["sst2"], float)
    assert exp.max_lengths == (128, 256)
    assert (exp.seed, exp.fp16, exp.label_or_id) == (7, True, "pos")
    assert exp.extra == {"anything": [1, 2]}


def test_defaults_fill_missing_optional_keys():
    exp = from_dict(Experiment, {"name": "x"})
    assert exp == Experiment(name="x")


def test_load_yaml_records_key_lines_and_reads_scalars_as_yaml_1_2(tmp_path):
    data, lines = load_yaml(write(tmp_path, "a: 1e-3\nb: yes\nc: 2024-01-01\nd:\n  - x\n  - y: 1.0e5\n"))
    assert data == {"a": 0.001, "b": "yes", "c": "2024-01-01", "d": ["x", {"y": 100000.0}]}
    assert lines == {"a": 1, "b": 2, "c": 3, "d": 4, "d.0": 5, "d.1": 6, "d.1.y": 6}


BAD_CONFIGS = [
    pytest.param(
        "name: x\ntasks:\n  - name: a\n    type: ner\n    batchsize: 8\n",
        5, "tasks.0.batchsize", "unknown key (did you mean 'batch_size'?); allowed keys: name, type,",
        id="unknown-key",
    ),
    pytest.param(
        "name: x\noptim:\n  lr: fast\n", 3, "optim.lr", "expected float, got 'fast'", id="wrong-type",
    ),
    pytest.param(
        "name: x\nfp16: yes\n", 2, "fp16", "expected bool, got 'yes'", id="yes-is-not-a-bool",
    ),
    pytest.param(
        "name: x\nseed: true\n", 2, "seed", "expected int, got True", id="bool-is-not-an-int",
    ),
    pytest.param(
        "name: x\noptim:\n  schedule: cosin\n", 3, "optim.schedule",
        "expected one of 'linear', 'cosine', 'constant', got 'cosin' (did you mean 'cosine'?)",
        id="bad-literal",
    ),
    pytest.param(
        "name: x\ntasks:\n  - name: a\n    type: ner\n  - name: b\n", 5, "tasks.1.type",
        "required key is missing (expected one of 'classification', 'ner')", id="missing-required",
    ),
    pytest.param(
        "name: x\ntasks:\n  - name: a\n    type: ner\n  -\n    name: b\n    type: ner\n    batch_size: 0\n",
        6, "tasks.1", "batch_size must be positive, got 0", id="post-init",
    ),
    pytest.param(
        "name: x\ntasks: {name: a}\n", 2, "tasks", "expected list[Task], got {'name': 'a'}", id="not-a-list",
    ),
    pytest.param(
        "name: x\noptim: 0.1\n", 2, "optim", "expected a mapping for Optim, got 0.1", id="not-a-mapping",
    ),
    pytest.param(
        "name: x\nlabel_or_id: [1]\n", 2, "label_or_id", "expected int or str, got [1]", id="union",
    ),
    pytest.param(
        "name: x\nseed: 1\nseed: 2\n", 3, "seed", "duplicate key (first set on line 2)", id="duplicate",
    ),
]


@pytest.mark.parametrize(("text", "line", "key", "message"), BAD_CONFIGS)
def test_errors_name_file_line_key_and_expectation(tmp_path, text, line, key, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(Experiment, path)
    assert str(caught.value).startswith(f"{path}:{line}: key '{key}': {message}")
    assert "\n" not in str(caught.value)


def test_missing_top_level_key_names_the_file_without_a_line(tmp_path):
    path = write(tmp_path, "seed: 1\n")
    with pytest.raises(ConfigError, match=r"exp\.yaml: key 'name': required key is missing \(expected str\)$"):
        load_config(Experiment, path)


def test_invalid_yaml_reports_line(tmp_path):
    path = write(tmp_path, "name: x\noptim:\n  lr: [1, 2\n  schedule: cosine\n")
    with pytest.raises(ConfigError) as caught:
        load_yaml(path)
    assert str(caught.value).startswith(f"{path}:4: invalid YAML: ")


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=r"nope\.yaml: file not found$"):
        load_yaml(path)


@pytest.mark.parametrize("text", ["- a\n- b\n", ""])
def test_top_level_must_be_a_mapping(tmp_path, text):
    with pytest.raises(ConfigError, match="expected a mapping of keys at the top level"):
        load_yaml(write(tmp_path, text))


def test_dict_source_errors_have_no_line():
    with pytest.raises(ConfigError, match=r"^<dict>: key 'optim.lr': expected float, got '1e-3'$"):
        from_dict(Experiment, {"name": "x", "optim": {"lr": "1e-3"}})


BASE = {"name": "x", "tasks": [{"name": "a", "type": "ner", "labels": ["O"]}], "optim": {"lr": 0.1}}


@pytest.mark.parametrize(
    ("override", "check"),
    [
        ("seed=3", lambda d: d["seed"] == 3),
        ("optim.lr=1e-3", lambda d: d["optim"]["lr"] == 0.001 and isinstance(d["optim"]["lr"], float)),
        ("optim.lr=5e-4", lambda d: d["optim"]["lr"] == 0.0005),
        ("fp16=true", lambda d: d["fp16"] is True),
        ("seed=null", lambda d: d["seed"] is None),
        ("name=", lambda d: d["name"] is None),
        ("tasks.0.labels=[B-PER, I-PER]", lambda d: d["tasks"][0]["labels"] == ["B-PER", "I-PER"]),
        ("tasks.0.batch_size=8", lambda d: d["tasks"][0]["batch_size"] == 8),
        ("new.deep.key=on", lambda d: d["new"] == {"deep": {"key": "on"}}),
        ("optim={lr: 2}", lambda d: d["optim"] == {"lr": 2}),
    ],
)
def test_overrides(override, check):
    result = apply_overrides(BASE, [override])
    assert check(result)
    assert BASE["optim"] == {"lr": 0.1} and "batch_size" not in BASE["tasks"][0]  # input untouched


def test_later_overrides_win_and_create_under_null():
    result = apply_overrides({"sched": None}, ["sched.name=cosine", "sched.name=linear"])
    assert result == {"sched": {"name": "linear"}}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("xyz", r"^--set 'xyz': expected key\.path=value$"),
        ("=3", r"^--set '=3': expected key\.path=value$"),
        ("a..b=1", r"^--set 'a\.\.b=1': expected key\.path=value$"),
        ("seed=[1,", r"^--set 'seed=\[1,': invalid YAML value: "),
        ("tasks.3.name=b", r"'tasks' is a list of 1 items; '3' is not an index in it$"),
        ("tasks.x.name=b", r"'tasks' is a list of 1 items; 'x' is not an index in it$"),
        ("optim.lr.x=1", r"cannot set a key inside 'optim\.lr', which holds 0\.1$"),
    ],
)
def test_bad_overrides(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(BASE, [override])


def test_override_type_errors_name_the_override(tmp_path):
    path = write(tmp_path, VALID)
    with pytest.raises(ConfigError, match=r"^--set 'optim\.lr=fast': key 'optim\.lr': expected float, got 'fast'$"):
        load_config(Experiment, path, ["optim.lr=fast"])
    with pytest.raises(ConfigError, match=r"^--set 'tasks\.1\.batchsize=4': key 'tasks\.1\.batchsize': unknown key"):
        load_config(Experiment, path, ["tasks.1.batchsize=4"])
    with pytest.raises(ConfigError, match=r"^--set 'optim={lr: x}': key 'optim\.lr': expected float"):
        load_config(Experiment, path, ["optim={lr: x}"])


def test_errors_beside_an_override_still_point_at_the_file(tmp_path):
    path = write(tmp_path, VALID.replace("schedule: cosine", "schedule: cos"))
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}:13: key 'optim\.schedule': expected one of"):
        load_config(Experiment, path, ["optim.lr=1e-2"])


def test_overrides_apply_in_load_config(tmp_path):
    exp = load_config(Experiment, write(tmp_path, VALID), ["optim.lr=1e-3", "tasks.1.batch_size=4", "fp16=false"])
    assert (exp.optim.lr, exp.tasks[1].batch_size, exp.fp16) == (0.001, 4, False)


def test_to_dict_round_trip(tmp_path):
    exp = load_config(Experiment, write(tmp_path, VALID))
    plain = to_dict(exp)
    assert plain["tasks"][0]["data_dir"] == "data/sst2"
    assert plain["max_lengths"] == [128, 256]
    assert from_dict(Experiment, json.loads(json.dumps(plain))) == exp
    assert from_dict(Experiment, yaml.safe_load(yaml.safe_dump(plain))) == exp


def test_describe_renders_markdown_reference():
    text = describe(Experiment)
    assert text.index("### `Experiment`") < text.index("### `Task`") < text.index("### `Optim`")
    assert "One training run over several tasks." in text
    assert "| `name` | `str` | *required* | run name \\| used for the output folder |" in text
    assert "| `optim` | `Optim` | see `Optim` |  |" in text
    assert "| `max_lengths` | `tuple[int, ...]` | `[128]` |  |" in text
    assert "| `schedule` | `one of 'linear', 'cosine', 'constant'` | `\"linear\"` |  |" in text
    assert "Optim(" not in text  # no auto-generated dataclass signature as a docstring
