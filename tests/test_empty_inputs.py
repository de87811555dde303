"""Empty inputs get one clear error that says what is empty and where, through the CLI as users meet them."""

from __future__ import annotations

import pytest

from multitask.cli import main
from tests.fixtures import write_project


@pytest.mark.parametrize("data_file,content", [
    ("ner/train.txt", ""),
    ("ner/train.txt", "\n\n   \n-DOCSTART- -X- O O\n\n"),
    ("cls/train.tsv", "sentence\tlabel\n"),
    ("cls/train.tsv", "   \n"),
])
def test_an_empty_training_file_is_named(tmp_path, capsys, data_file, content):
    config = write_project(tmp_path)
    (tmp_path / "data" / data_file).write_text(content, encoding="utf-8")
    assert main(["validate", str(config)]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "data.train" in error and str(tmp_path / "data" / data_file) in error
    assert "labels" not in error and "Traceback" not in error


def test_an_output_directory_that_cannot_be_written_fails_before_training(tmp_path, capsys):
    # A path under a regular file cannot be created, even by root (who may write into read-only folders).
    config = write_project(tmp_path)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("keep me")
    assert main(["train", str(config), "--output-dir", str(blocker / "run"), "--no-progress"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: ") and "cannot write the run there" in error and str(blocker) in error
    assert blocker.read_text() == "keep me"
