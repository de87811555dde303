"""A run killed with SIGKILL at an arbitrary moment resumes and ends exactly like an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from multitask.cli import main
from tests.fixtures import write_project


def test_kill_9_then_resume_matches_uninterrupted(tmp_path):
    config = write_project(tmp_path, max_steps=40)
    overrides = ["--set", "evaluation.checkpoint_every=1", "--set", "evaluation.every_steps=10", "--no-progress"]
    assert main(["train", str(config), "--output-dir", str(tmp_path / "whole"), *overrides]) == 0

    killed_dir = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, "-m", "multitask", "train", str(config), "--output-dir", str(killed_dir), *overrides],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    state = killed_dir / "state" / "training_state.pt"
    deadline = time.monotonic() + 120
    while not state.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # somewhere in the middle of training (and maybe of a write)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()

    assert main(["train", str(config), "--output-dir", str(killed_dir), "--resume", *overrides]) == 0
    whole = json.loads((tmp_path / "whole" / "report.json").read_text())
    resumed = json.loads((killed_dir / "report.json").read_text())
    assert resumed["tasks"] == whole["tasks"]
    assert resumed["aggregate"] == whole["aggregate"]
