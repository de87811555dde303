"""Every text file multitask reads back, damaged in any way, ends in one line naming it, or (a cache) in a rebuild.

The files: training-state checksums, checkpoint/meta.json, the run's config.json, report.json, the feature cache's
index and the disk frozen cache's meta.json. The damage: bytes that are not UTF-8, an empty file, truncated JSON,
JSON of the wrong shape, and random bytes (hypothesis). A refusal is exit code 2 with one `error:` line on stderr
naming the file, never a traceback, and leaves every file already saved as it was (train.log aside, which the
command appends to). One tiny run is trained for the whole module; each example damages a copy of it.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tempfile
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from unittest import mock

import numpy as np
import pytest
import torch
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from multitask.cli import main
from multitask.config import load_config
from multitask.data.cache import META, cached, read_features, write_arrays
from multitask.errors import DataError
from multitask.experiment import ExperimentConfig
from multitask.reporting import load_report
from multitask.runtime import load_tokenizer, prepare_tasks
from multitask.training.frozen_cache import Budget, DiskStore
from multitask.training.state import STATE_FILE
from tests.fixtures import write_project

# A run whose every task has frozen layers below its prefix, so it writes a disk frozen cache too.
OVERRIDES = [f"--set={item}" for item in (
    "prefix.prefix.layers={top: 1}", "optimization.frozen_cache.enabled=true",
    "optimization.frozen_cache.location=disk", "optimization.frozen_cache.dtype=float32",
    "evaluation.every_steps=2", "num_threads=1")]
FUZZ = settings(max_examples=15, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
RANDOM_BYTES = st.binary(max_size=200)
CHECKSUMS = STATE_FILE.with_name(STATE_FILE.name + ".sha256")
META_JSON = Path("checkpoint") / "meta.json"


@dataclass
class Project:
    config: Path
    run: Path
    cache: Path
    scratch: Path

    def resume(self, run_dir: Path) -> list[str]:
        return ["train", str(self.config), "--output-dir", str(run_dir), "--resume", "--no-progress", *OVERRIDES]

    def report_tasks(self, run_dir: Path) -> dict:
        return json.loads((run_dir / "report.json").read_text(encoding="utf-8"))["tasks"]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Project:
    root = tmp_path_factory.mktemp("corrupt")
    config = write_project(root, max_steps=4)
    # Features cached first, so training finds them as a resume does: a tokenizer that has just built features
    # fingerprints apart from an unused one, and would key the frozen cache of training apart from a resume's.
    experiment = load_config(ExperimentConfig, config, [item.removeprefix("--set=") for item in OVERRIDES])
    prepare_tasks(experiment, config, load_tokenizer(experiment.encoder.name))
    run = root / "run"
    assert main(["train", str(config), "--output-dir", str(run), "--no-progress", *OVERRIDES]) == 0
    scratch = root / "scratch"
    scratch.mkdir()
    (scratch / "inputs.jsonl").write_text('{"text": "good movie"}\n', encoding="utf-8")
    return Project(config, run, root / "cache", scratch)


# ---------------------------------------------------------------------------------------------- helpers
def snapshot(*folders: Path) -> dict[str, str]:
    """sha256 of every file under ``folders`` (train.log aside: every command appends to it)."""
    return {str(path): hashlib.sha256(path.read_bytes()).hexdigest()
            for folder in folders for path in sorted(folder.rglob("*")) if path.is_file() and path.name != "train.log"}


def run_cli(argv: list[str]) -> tuple[int, str]:
    """main(argv) in this process: (exit code, stdout + stderr); `serve` never gets as far as binding a port."""
    output = io.StringIO()

    def never_serve(server):
        raise AssertionError("serve started on a damaged run")

    with redirect_stdout(output), redirect_stderr(output), mock.patch.object(uvicorn.Server, "run", never_serve):
        code = main(argv)
    return code, output.getvalue()


def copy_run(project: Project) -> Path:
    copy = Path(tempfile.mkdtemp(dir=project.scratch)) / "run"
    shutil.copytree(project.run, copy)
    return copy


def damaged_copy(project: Project, relative: Path, data: bytes) -> Path:
    copy = copy_run(project)
    (copy / relative).write_bytes(data)
    return copy


def refusal(project: Project, relative: Path, data: bytes, command: Callable[[Path], list[str]]) -> str:
    """The one error line that running ``command`` on a copy of the run with ``data`` planted at ``relative`` gives;
    asserts exit code 2, no traceback, and nothing saved changed."""
    copy = damaged_copy(project, relative, data)
    before = snapshot(copy, project.cache)
    code, output = run_cli(command(copy))
    lines = output.splitlines()
    assert code == 2, output
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(copy) in lines[0], output
    assert "Traceback" not in output
    assert snapshot(copy, project.cache) == before
    shutil.rmtree(copy.parent)
    return lines[0]


def inference(kind: str, project: Project) -> Callable[[Path], list[str]]:
    """The CLI command of ``kind`` (evaluate, predict, serve) on a run directory."""
    def command(run_dir: Path) -> list[str]:
        output = ["--output", str(project.scratch / "never-written.jsonl")]
        return {"evaluate": ["evaluate", str(run_dir), "--device", "cpu"],
                "predict": ["predict", str(run_dir), "--task", "cls", "--input", str(project.scratch / "inputs.jsonl"),
                            *output, "--device", "cpu"],
                "serve": ["serve", str(run_dir), "--device", "cpu"]}[kind]
    return command


def without(real: bytes, key: str) -> bytes:
    data = json.loads(real)
    del data[key]
    return json.dumps(data).encode()


def replaced(real: bytes, key: str, value) -> bytes:
    return json.dumps({**json.loads(real), key: value}).encode()


NOT_UTF8 = (lambda real: b"\xff\xfe\x00", "not UTF-8 text (byte 0xff at offset 0)")
EMPTY = (lambda real: b"", "empty")
TRUNCATED = (lambda real: real[: len(real) // 2], "truncated JSON")
A_LIST = (lambda real: b"[1, 2]", "expected a JSON object, got a list")


# ---------------------------------------------------------------------------------------------- checksums
@pytest.mark.parametrize("damage, message", [
    NOT_UTF8, EMPTY, (lambda real: b" \n", "blank (whitespace only)"),
    (lambda real: real[:40], "entry 1 is not a SHA-256 checksum (64 hex digits)"),
    (lambda real: b"[1, 2]", "entry 1 is not a SHA-256 checksum"),
], ids=["not_utf8", "empty", "blank", "truncated", "json"])
def test_damaged_checksums_refuse_resume_in_one_line(project, damage, message):
    line = refusal(project, CHECKSUMS, damage((project.run / CHECKSUMS).read_bytes()), project.resume)
    assert f"{CHECKSUMS}: unreadable training-state checksums: {message}" in line


@FUZZ
@given(data=RANDOM_BYTES)
def test_random_checksums_refuse_resume_in_one_line(project, data):
    assert str(CHECKSUMS) in refusal(project, CHECKSUMS, data, project.resume)


# ---------------------------------------------------------------------------------------------- config.json
@pytest.mark.parametrize("damage, message", [
    NOT_UTF8, EMPTY, TRUNCATED, A_LIST,
    (lambda real: b'{"name": "\\ud800"}', "a string holds an unpaired surrogate escape"),
], ids=["not_utf8", "empty", "truncated", "list", "surrogate"])
def test_damaged_config_refuses_resume_in_one_line(project, damage, message):
    line = refusal(project, Path("config.json"), damage((project.run / "config.json").read_bytes()), project.resume)
    assert "config.json: unreadable run config: " + message in line


def test_a_config_missing_a_key_is_a_different_config(project):
    line = refusal(project, Path("config.json"), without((project.run / "config.json").read_bytes(), "seed"),
                   project.resume)
    assert "the config differs from the run being resumed (keys: seed)" in line


@FUZZ
@given(data=RANDOM_BYTES)
def test_random_config_refuses_resume_in_one_line(project, data):
    refusal(project, Path("config.json"), data, project.resume)  # the file named, or "the config differs"


# ---------------------------------------------------------------------------------------------- meta.json
META_CASES = [
    NOT_UTF8, EMPTY, TRUNCATED, A_LIST,
    (lambda real: without(real, "encoder"), "missing key 'encoder'"),
    (lambda real: without(real, "prefix_layout"), "missing key 'prefix_layout'"),
    (lambda real: replaced(real, "tasks", {"cls": {}}), "tasks should be a list, got an object"),
    (lambda real: replaced(real, "tasks", [1]), "tasks[0] should be an object, got a number"),
    (lambda real: replaced(real, "encoder", {"name": "x"}), "missing key 'fingerprint' in encoder"),
    (lambda real: replaced(real, "model_sha256", 7), "model_sha256 should be a string, got a number"),
]
META_IDS = ["not_utf8", "empty", "truncated", "list", "no_encoder", "no_prefix_layout", "tasks_object",
            "task_number", "no_fingerprint", "checksum_number"]


@pytest.mark.parametrize("kind", ["evaluate", "predict", "serve"])
@pytest.mark.parametrize("damage, message", META_CASES, ids=META_IDS)
def test_damaged_meta_refuses_to_load_in_one_line(project, kind, damage, message):
    line = refusal(project, META_JSON, damage((project.run / META_JSON).read_bytes()), inference(kind, project))
    assert f"{META_JSON}: unreadable checkpoint metadata: {message}" in line
    assert not (project.scratch / "never-written.jsonl").exists()


def test_a_damaged_prefix_entry_in_meta_is_one_line(project):
    real = json.loads((project.run / META_JSON).read_bytes())
    name = next(iter(real["prefix_layout"]["prefixes"]))
    real["prefix_layout"]["prefixes"][name] = {"length": "four"}
    line = refusal(project, META_JSON, json.dumps(real).encode(), inference("evaluate", project))
    assert f"prefix_layout.prefixes.{name}.length" in line


@FUZZ
@given(data=RANDOM_BYTES, kind=st.sampled_from(["evaluate", "predict", "serve"]))
def test_random_meta_refuses_to_load_in_one_line(project, data, kind):
    assert str(META_JSON) in refusal(project, META_JSON, data, inference(kind, project))


# ---------------------------------------------------------------------------------------------- report.json
# report.json is read back by `compare` alone, after it has trained every method: checked here through load_report.
@FUZZ
@given(data=RANDOM_BYTES)
def test_a_damaged_report_is_one_data_error_line(project, data):
    report = project.scratch / "report.json"
    report.write_bytes(data)
    try:
        load_report(report)  # random bytes that make a valid report may load
    except DataError as error:
        assert str(error).startswith(f"{report}: ") and "\n" not in str(error)
    assert report.read_bytes() == data


@pytest.mark.parametrize("damage, message", [
    NOT_UTF8, EMPTY, TRUNCATED, A_LIST, (lambda real: without(real, "tasks"), "missing key 'tasks'"),
    (lambda real: replaced(real, "tasks", {"cls": {"type": "classification"}}),
     "missing key 'main_metric' in tasks['cls']"),
], ids=["not_utf8", "empty", "truncated", "list", "no_tasks", "task_without_metric"])
def test_damaged_report_messages(project, damage, message):
    report = project.scratch / "report.json"
    report.write_bytes(damage((project.run / "report.json").read_bytes()))
    with pytest.raises(DataError, match="^" + str(report) + ": unreadable report: ") as error:
        load_report(report)
    assert message in str(error.value)


# ---------------------------------------------------------------------------------------------- feature cache
def with_index(entry: Path, index: bytes) -> None:
    """Rewrite the cache entry with ``index`` as its index (the array that names its feature kinds and codecs)."""
    with np.load(entry, allow_pickle=False) as arrays:
        content = {name: arrays[name] for name in arrays.files}
    content[META] = np.frombuffer(index, dtype=np.uint8)
    write_arrays(entry, content)


@FUZZ
@given(index=RANDOM_BYTES, whole=st.booleans())
def test_a_damaged_feature_cache_entry_is_rebuilt_exactly(project, index, whole):
    """Random bytes as an entry's index, or over the whole entry: a miss, rebuilt to the very same features."""
    source = sorted(project.cache.glob("*.npz"))[0]
    expected = read_features(source)
    folder = Path(tempfile.mkdtemp(dir=project.scratch))
    entry = folder / source.name
    shutil.copy(source, entry)
    if whole:
        entry.write_bytes(index)
    else:
        with_index(entry, index)
    value, hit = cached(folder, source.stem, lambda: expected)
    assert value == expected and not hit
    assert read_features(entry) == expected  # rewritten, readable again
    shutil.rmtree(folder)


def test_resume_rebuilds_damaged_feature_cache_entries_to_the_same_result(project):
    entries = sorted(project.cache.glob("*.npz"))
    expected = {entry: read_features(entry) for entry in entries}
    with_index(entries[0], b"\xff\xfe\x00")
    with_index(entries[1], b'{"format": "multitask.features", "version": 2, "kinds": ')
    with_index(entries[2], b"[]")
    entries[3].write_bytes(entries[3].read_bytes()[:100])
    copy = copy_run(project)
    code, output = run_cli(project.resume(copy))
    assert code == 0 and "Traceback" not in output
    assert all(f"ignoring unreadable feature cache entry {entry}" in output for entry in entries[:4])
    assert {entry: read_features(entry) for entry in entries} == expected
    assert project.report_tasks(copy) == project.report_tasks(project.run)


# ---------------------------------------------------------------------------------------------- frozen cache
STORE_LENGTHS = [3, 2, 4]
STORE_STATES = {index: torch.full((length, 8), index + 1.0) for index, length in enumerate(STORE_LENGTHS)}


def open_store(folder: Path) -> DiskStore:
    return DiskStore(folder, STORE_LENGTHS, 8, "float32", Budget(1e9))


@FUZZ
@given(data=RANDOM_BYTES)
def test_random_frozen_cache_meta_starts_the_store_afresh(tmp_path, data):
    """Random bytes as a disk store's meta.json: the store starts afresh (it never serves states its meta.json
    cannot vouch for) and describes itself again; its own meta.json keeps what it stored."""
    folder = tmp_path / "store"
    open_store(folder).put(STORE_STATES)
    described = (folder / "meta.json").read_bytes()
    assert open_store(folder).stored == len(STORE_STATES)
    (folder / "meta.json").write_bytes(data)
    store = open_store(folder)
    assert store.stored == 0 and all(store.get(index) is None for index in STORE_STATES)
    assert (folder / "meta.json").read_bytes() == described
    store.put(STORE_STATES)
    assert all(torch.equal(open_store(folder).get(index), state) for index, state in STORE_STATES.items())


def test_resume_starts_a_damaged_frozen_cache_afresh(project):
    # Every store there damaged: the feature-cache test above rebuilt features, and so keyed a second set of stores.
    metas = sorted((project.cache / "frozen").glob("*/meta.json"))
    originals = {meta: meta.read_bytes() for meta in metas}
    for index, meta in enumerate(metas):
        meta.write_bytes([b"\x93", b"", b'{"inputs": 4'][index % 3])
    copy = copy_run(project)
    code, output = run_cli(project.resume(copy))
    assert code == 0 and "Traceback" not in output
    read = [meta for meta in metas if f"{meta}: unreadable frozen-cache description" in output]
    assert len(read) == 3  # one store per task, each started afresh and described again
    assert all(meta.read_bytes() == originals[meta] for meta in read)
    for meta in set(metas) - set(read):
        meta.write_bytes(originals[meta])
    assert project.report_tasks(copy) == project.report_tasks(project.run)


def test_a_predict_input_file_that_is_not_utf8_is_one_line(tmp_path):
    from multitask.errors import DataError
    from multitask.run import read_input_file

    path = tmp_path / "in.jsonl"
    path.write_bytes(b'"good movie"\n"\xff\xfe bad"\n')
    with pytest.raises(DataError, match=r"in\.jsonl: not UTF-8 text \(byte 0xff at offset 14\); save the file as UTF-8"):
        read_input_file(path)
