"""Every shipped YAML validates (torchtune's habit), and where ../shared/data exists every task loads with the
split sizes and label sets documented in the data's SOURCE.md files."""

from __future__ import annotations

from pathlib import Path

import pytest

from multitask.config import load_config
from multitask.data.root import data_root
from multitask.experiment import ExperimentConfig
from multitask.runtime import load_tasks
from multitask.tasks.loading import load_task, load_task_data

REPO = Path(__file__).resolve().parents[1]
TASK_FILES = sorted((REPO / "tasks").glob("*.yaml"))
CONFIG_FILES = sorted((REPO / "configs").glob("*.yaml")) + sorted((REPO / "bench" / "configs").glob("*.yaml"))
DATA = data_root()

# task -> (total examples over train + validation, validation size or None when carved, number of labels)
DOCUMENTED = {
    "sst2": (67_349 + 872, 872, 2),
    "trec_coarse": (5_452, None, 6),
    "trec_fine": (5_452, None, 50),
    "chnsenticorp": (9_600 + 1_200, 1_200, 2),
    "conll2003": (14_041 + 3_250, 3_250, 9),
    "wnut17": (3_394 + 1_009, 1_009, 13),
    "bc5cdr": (4_560 + 4_581, 4_581, 5),
    "msra_ner": (50_658, None, 7),
    "weibo_ner": (1_350 + 270, 270, 17),
    "resume_ner": (3_821 + 463, 463, 17),
    "squad_v1_1": (10_570, None, 0),
    "cmrc2018": (3_219, None, 0),
    "drcd": (3_524, None, 0),
}


def test_every_dataset_has_a_task_file():
    assert {load_task(path).config.name for path in TASK_FILES} == set(DOCUMENTED)


@pytest.mark.parametrize("path", TASK_FILES, ids=lambda p: p.name)
def test_task_yaml_validates(path):
    task = load_task(path)
    assert task.main_metric() in task.metric_names


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_experiment_yaml_validates(path):
    experiment = load_config(ExperimentConfig, path)
    assert load_tasks(experiment, path)


@pytest.mark.skipif(not DATA.exists(), reason=f"shared data folder not found at {DATA}")
@pytest.mark.parametrize("path", TASK_FILES, ids=lambda p: p.name)
def test_task_loads_with_documented_sizes_and_labels(path):
    task = load_task(path)
    total, validation, num_labels = DOCUMENTED[task.config.name]
    loaded = load_task_data(task, DATA, str(path))
    sizes = {split: len(examples) for split, examples in loaded.examples.items()}
    assert sizes["train"] + sizes["validation"] == total
    if validation is not None:
        assert sizes["validation"] == validation
    assert len(task.labels) == num_labels
    if task.config.type == "qa":  # carved by article: no article on both sides
        titles = {split: {e.title for e in loaded.examples[split]} for split in ("train", "validation")}
        assert not titles["train"] & titles["validation"]


def test_missing_data_says_where_the_dataset_comes_from(tmp_path):
    from multitask.errors import DataError

    task = load_task(REPO / "tasks" / "sst2.yaml")
    with pytest.raises(DataError, match=r"data file not found: .*MULTITASK_DATA_ROOT.*the dataset: GLUE SST-2"):
        load_task_data(task, tmp_path, "tasks/sst2.yaml")
