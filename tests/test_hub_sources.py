"""A fresh machine without the data folder: each split's ``hub:`` copy is read with `datasets` when the local file
is missing, and gives the very examples the local file gives.

No network: the hub copies are small in-memory datasets with the real hub layouts (ClassLabel columns, flat SQuAD
rows...), saved with save_to_disk; each shipped task file is loaded with its hub name pointed at such a copy, so its
own hub settings (columns, class_labels, names, options) are what is tested."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

datasets = pytest.importorskip("datasets")

from multitask.cli import main  # noqa: E402
from multitask.config import load_yaml  # noqa: E402
from multitask.data.cache import cache_key  # noqa: E402
from multitask.errors import ConfigError, DataError  # noqa: E402
from multitask.tasks.loading import SPLITS, load_task, load_task_data  # noqa: E402
from tests.fixtures import write_project  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TASK_FILES = sorted((REPO / "tasks").glob("*.yaml"))
Features, Value, ClassLabel, List = datasets.Features, datasets.Value, datasets.ClassLabel, datasets.List


@pytest.fixture
def offline(monkeypatch):
    """Hub ids fail at once, as on a machine without network (whatever the environment says)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)


def save_copy(folder: Path, splits: dict[str, tuple[dict, Features]]) -> Path:
    """A DatasetDict of {split: (columns, features)} written with save_to_disk, as a user's saved hub copy."""
    datasets.DatasetDict({name: datasets.Dataset.from_dict(columns, features=features)
                          for name, (columns, features) in splits.items()}).save_to_disk(str(folder))
    return folder


def write_files(root: Path, files: dict[str, str | bytes]) -> None:
    for relative, content in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))


def shipped(name: str, copy: Path | str):
    """A shipped task with every split's hub name pointed at ``copy`` (the rest of its hub settings kept)."""
    path = REPO / "tasks" / name
    data, _ = load_yaml(path)
    overrides = {"data": {split: {"hub": {"name": str(copy)}} for split in SPLITS
                          if isinstance(data["data"].get(split), dict)}}
    return load_task(path, overrides)


def local_then_hub(tmp_path: Path, task_file: str, files: dict, splits: dict):
    """Examples read from the local files, then from the hub copy once the files are gone."""
    copy = save_copy(tmp_path / "hub-copy", splits)
    root = tmp_path / "data"
    write_files(root, files)
    local = load_task_data(shipped(task_file, copy), root, task_file)
    shutil.rmtree(root)
    root.mkdir()
    hub = load_task_data(shipped(task_file, copy), root, task_file)
    return local, hub


# ---------------------------------------------------------------------------- the layouts of the hub copies

SENTIMENT = ClassLabel(names=["negative", "positive"])
SST2_ROWS = [("hide new secretions ", 0), ("a gorgeous film ", 1), ("so boring ", 0), ("great fun ", 1)]


def sst2_case():
    files = {f"sst2/{name}.tsv": "sentence\tlabel\n" + "".join(f"{s}\t{label}\n" for s, label in rows)
             for name, rows in (("train", SST2_ROWS), ("dev", SST2_ROWS[:2]))}
    features = Features({"sentence": Value("string"), "label": SENTIMENT, "idx": Value("int32")})

    def split(rows):
        return {"sentence": [s for s, _ in rows], "label": [label for _, label in rows],
                "idx": list(range(len(rows)))}, features

    return "sst2.yaml", files, {"train": split(SST2_ROWS), "validation": split(SST2_ROWS[:2])}


CHN_ROWS = [("房间很好", 1), ("服务太差", 0), ("早餐不错", 1), ("不推荐", 0)]


def chnsenticorp_case():
    files = {f"chnsenticorp/{name}.tsv": "label\ttext_a\n" + "".join(f"{label}\t{t}\n" for t, label in rows)
             for name, rows in (("train", CHN_ROWS), ("dev", CHN_ROWS[2:]))}
    features = Features({"text": Value("string"), "label": Value("int64")})  # plain ints on the hub

    def split(rows):
        return {"text": [t for t, _ in rows], "label": [label for _, label in rows]}, features

    return "chnsenticorp.yaml", files, {"train": split(CHN_ROWS), "validation": split(CHN_ROWS[2:])}


COARSE = ["ABBR", "ENTY", "DESC", "HUM", "LOC", "NUM"]
FINE = ["ABBR:abb", "ABBR:exp", "ENTY:animal", "DESC:manner", "DESC:def", "HUM:ind", "LOC:city", "NUM:date"]
TREC_ROWS = [("DESC:manner", "How did serfdom develop in and then leave Russia ?"),
             ("ENTY:animal", "What is the name of the dog ?"), ("HUM:ind", "Who killed Gandhi ?"),
             ("LOC:city", "What is the capital of France ?"), ("NUM:date", "When was Rome founded ?"),
             ("ABBR:exp", "What does NASA stand for ?"), ("DESC:def", "What is a caldera ?"),
             ("HUM:ind", "Who wrote Hamlet ?"), ("LOC:city", "Which city hosts the Louvre ?"),
             ("NUM:date", "When did WWII end ?")]


def trec_case(task_file: str):
    text = "".join(f"{label} {question}\n" for label, question in TREC_ROWS)
    features = Features({"text": Value("string"), "coarse_label": ClassLabel(names=COARSE),
                         "fine_label": ClassLabel(names=FINE)})
    columns = {"text": [q for _, q in TREC_ROWS], "coarse_label": [COARSE.index(l.split(":")[0]) for l, _ in TREC_ROWS],
               "fine_label": [FINE.index(label) for label, _ in TREC_ROWS]}
    return task_file, {"trec/train_5500.label": text.encode("latin-1")}, {"train": (columns, features)}


CONLL_TAGS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]
CONLL_SENTENCES = [(["EU", "rejects", "German", "call"], ["B-ORG", "O", "B-MISC", "O"]),
                   (["Peter", "Blackburn"], ["B-PER", "I-PER"]),
                   (["BRUSSELS", "1996-08-22"], ["B-LOC", "O"])]


def conll2003_case():
    def text(sentences):
        blocks = ["\n".join(f"{tok} NNP B-NP {tag}" for tok, tag in zip(toks, tags)) for toks, tags in sentences]
        return "-DOCSTART- -X- -X- O\n\n" + "\n\n".join(blocks) + "\n"

    features = Features({"id": Value("string"), "tokens": List(Value("string")),
                         "pos_tags": List(ClassLabel(names=["NNP", "VBZ"])),
                         "chunk_tags": List(ClassLabel(names=["O", "B-NP"])),
                         "ner_tags": List(ClassLabel(names=CONLL_TAGS))})

    def split(sentences):
        return {"id": [str(i) for i in range(len(sentences))], "tokens": [t for t, _ in sentences],
                "pos_tags": [[0] * len(t) for t, _ in sentences], "chunk_tags": [[1] * len(t) for t, _ in sentences],
                "ner_tags": [[CONLL_TAGS.index(tag) for tag in tags] for _, tags in sentences]}, features

    files = {"conll2003/train.txt": text(CONLL_SENTENCES), "conll2003/valid.txt": text(CONLL_SENTENCES[1:])}
    return "conll2003.yaml", files, {"train": split(CONLL_SENTENCES), "validation": split(CONLL_SENTENCES[1:])}


BC5CDR_NAMES = ["O", "B-Chemical", "B-Disease", "I-Disease", "I-Chemical"]
BC5CDR_SENTENCES = [(["Famotidine", "-", "associated", "delirium", "."], ["B-Chemical", "O", "O", "B-Disease", "O"]),
                    (["acute", "renal", "failure"], ["B-Disease", "I-Disease", "I-Disease"])]


def bc5cdr_case():
    def text(sentences):
        return "\n\n".join("\n".join(f"{tok}\t{tag}" for tok, tag in zip(*sentence)) for sentence in sentences) + "\n"

    features = Features({"tokens": List(Value("string")), "tags": List(Value("int32"))})  # TNER: plain ids
    columns = {"tokens": [t for t, _ in BC5CDR_SENTENCES],
               "tags": [[BC5CDR_NAMES.index(tag) for tag in tags] for _, tags in BC5CDR_SENTENCES]}
    files = {"bc5cdr/train.tsv": text(BC5CDR_SENTENCES), "bc5cdr/devel.tsv": text(BC5CDR_SENTENCES)}
    return "bc5cdr.yaml", files, {"train": (columns, features), "validation": (columns, features)}


WEIBO_TAGS = ["B-GPE.NAM", "B-PER.NOM", "I-GPE.NAM", "I-PER.NOM", "O"]
WEIBO_SENTENCE = (["北0", "京1", "的0", "导0", "演1"], ["B-GPE.NAM", "I-GPE.NAM", "O", "B-PER.NOM", "I-PER.NOM"])


def weibo_case():
    text = "\n".join(f"{tok}\t{tag}" for tok, tag in zip(*WEIBO_SENTENCE)) + "\n"
    features = Features({"id": Value("string"), "tokens": List(Value("string")),
                         "ner_tags": List(ClassLabel(names=WEIBO_TAGS))})
    columns = {"id": ["0"], "tokens": [WEIBO_SENTENCE[0]],
               "ner_tags": [[WEIBO_TAGS.index(tag) for tag in WEIBO_SENTENCE[1]]]}
    files = {"weibo_ner/weiboNER_2nd_conll.train": text, "weibo_ner/weiboNER_2nd_conll.dev": text}
    return "weibo_ner.yaml", files, {"train": (columns, features), "validation": (columns, features)}


def resume_case():
    # The file is BMES (M inside); the hub copy writes BIOES (I inside), as plain strings: both read as IOB2.
    chars, bmes = list("美国的华莱士"), ["B-LOC", "E-LOC", "O", "B-NAME", "M-NAME", "E-NAME"]
    text = "\n".join(f"{c} {t}" for c, t in zip(chars, bmes)) + "\n"
    features = Features({"tokens": List(Value("string")), "tags": List(Value("string"))})
    columns = {"tokens": [chars], "tags": [[t.replace("M-", "I-") for t in bmes]]}
    files = {"resume_ner/train.char.bmes": text, "resume_ner/dev.char.bmes": text}
    return "resume_ner.yaml", files, {"train": (columns, features), "validation": (columns, features)}


SQUAD_ARTICLES = [
    ("Normans", [("The Normans were in Normandy.", [("q1", "Where were the Normans?", "Normandy"),
                                                   ("q2", "Who was in Normandy?", "The Normans")]),
                 ("Rollo led them.", [("q3", "Who led them?", "Rollo")])]),
    ("Computing", [("A problem is hard.", [("q4", "What is hard?", "A problem")])]),
    ("Oxygen", [("Oxygen is a gas.", [("q5", "What is oxygen?", "a gas")])]),
    ("Rhine", [("The Rhine flows north.", [("q6", "Which way does the Rhine flow?", "north")])]),
]
SQUAD_FEATURES = Features({"id": Value("string"), "title": Value("string"), "context": Value("string"),
                           "question": Value("string"),
                           "answers": {"text": List(Value("string")), "answer_start": List(Value("int32"))}})


def squad_json(titled: bool) -> str:
    data = []
    for title, paragraphs in SQUAD_ARTICLES:
        article = {"paragraphs": [{"context": context, "qas": [
            {"id": qid, "question": q, "answers": [{"text": a, "answer_start": context.index(a)}]}
            for qid, q, a in qas]} for context, qas in paragraphs]}
        data.append({"title": title, **article} if titled else article)
    return json.dumps({"version": "1.1", "data": data})


def squad_rows(titled: bool) -> tuple[dict, Features]:
    rows = [{"id": qid, "title": title, "context": context, "question": q,
             "answers": {"text": [a], "answer_start": [context.index(a)]}}
            for title, paragraphs in SQUAD_ARTICLES for context, qas in paragraphs for qid, q, a in qas]
    columns = {key: [row[key] for row in rows] for key in SQUAD_FEATURES if titled or key != "title"}
    features = Features({k: v for k, v in SQUAD_FEATURES.items() if titled or k != "title"})
    return columns, features


def squad_case():
    return "squad_v1.1.yaml", {"squad_v1.1/dev-v1.1.json": squad_json(True)}, {"validation": squad_rows(True)}


CASES = {
    "sst2": sst2_case, "chnsenticorp": chnsenticorp_case, "trec_coarse": lambda: trec_case("trec_coarse.yaml"),
    "trec_fine": lambda: trec_case("trec_fine.yaml"), "conll2003": conll2003_case, "bc5cdr": bc5cdr_case,
    "weibo_ner": weibo_case, "resume_ner": resume_case, "squad_v1_1": squad_case,
}


# ---------------------------------------------------------------------------- (a) the hub copy, file missing


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_missing_file_reads_the_hub_copy_into_the_same_examples(tmp_path, offline, case):
    task_file, files, splits = CASES[case]()
    local, hub = local_then_hub(tmp_path, task_file, files, splits)
    assert hub.examples == local.examples
    assert hub.task.labels == local.task.labels
    assert all(hub.examples[split] for split in hub.examples)


def test_class_labels_come_out_as_the_local_file_has_them(tmp_path, offline):
    _, files, splits = sst2_case()
    local, hub = local_then_hub(tmp_path, "sst2.yaml", files, splits)
    assert hub.task.labels == ["0", "1"] and {e.label for e in hub.examples["train"]} == {"0", "1"}
    # The same ClassLabel column read as names would not match the task's labels.
    from multitask.data.hub import hub_records
    from multitask.data.hub import HubSource

    names = hub_records(HubSource(name=str(tmp_path / "hub-copy"), split="train"), "tsv", None)
    assert [r.fields["label"] for r in names] == ["negative", "positive", "negative", "positive"]
    assert names[0].fields == {"sentence": "hide new secretions ", "label": "negative", "idx": "0"}


def test_ner_class_label_tags_become_tag_names(tmp_path, offline):
    _, files, splits = conll2003_case()
    _, hub = local_then_hub(tmp_path, "conll2003.yaml", files, splits)
    assert hub.examples["train"][0].tokens == ["EU", "rejects", "German", "call"]
    assert hub.examples["train"][0].tags == ["B-ORG", "O", "B-MISC", "O"]
    assert set(hub.task.labels) <= set(CONLL_TAGS)


def test_flat_squad_rows_give_the_nested_readers_records(tmp_path, offline):
    from multitask.data.hub import hub_records
    from multitask.data.readers import read_records
    from multitask.data.hub import HubSource

    (tmp_path / "dev.json").write_text(squad_json(True), encoding="utf-8")
    copy = save_copy(tmp_path / "copy", {"validation": squad_rows(True)})
    local = read_records(tmp_path / "dev.json", "squad")
    hub = hub_records(HubSource(name=str(copy), split="validation"), "squad", None)
    assert [r.fields for r in hub] == [r.fields for r in local]
    assert local[0].fields["answers"] == [{"text": "Normandy", "answer_start": 20}]


def test_flat_squad_rows_without_titles_are_numbered_like_untitled_articles(tmp_path, offline):
    from multitask.data.hub import hub_records
    from multitask.data.readers import read_records
    from multitask.data.hub import HubSource

    one_paragraph_each = [(t, [p]) for t, ps in SQUAD_ARTICLES for p in ps]  # CMRC: one paragraph per article
    data = {"data": [{"paragraphs": [{"context": c, "qas": [
        {"id": i, "question": q, "answers": [{"text": a, "answer_start": c.index(a)}]} for i, q, a in qas]}]}
        for _, [(c, qas)] in one_paragraph_each]}
    (tmp_path / "cmrc.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    copy = save_copy(tmp_path / "copy", {"validation": squad_rows(False)})
    local = read_records(tmp_path / "cmrc.json", "squad")
    hub = hub_records(HubSource(name=str(copy), split="validation"), "squad", None)
    assert [r.fields for r in hub] == [r.fields for r in local]
    assert [r.fields["title"] for r in hub] == ["0", "0", "1", "2", "3", "4"]
    cmrc = shipped("cmrc2018.yaml", copy)
    loaded = load_task_data(cmrc, tmp_path / "empty-root", "cmrc2018.yaml")
    titles = {split: {e.title for e in loaded.examples[split]} for split in ("train", "validation")}
    assert titles["train"] and titles["validation"] and not titles["train"] & titles["validation"]


def test_limit_applies_to_the_hub_copy(tmp_path, offline):
    _, _, splits = sst2_case()
    copy = save_copy(tmp_path / "copy", splits)
    task = load_task(REPO / "tasks" / "sst2.yaml", {"data": {"train": {"hub": {"name": str(copy)}, "limit": 3},
                                                            "validation": {"hub": {"name": str(copy)}}}})
    assert len(load_task_data(task, tmp_path, "sst2.yaml").examples["train"]) == 3


# ---------------------------------------------------------------------------- (b) the local file wins


def test_b_a_present_local_file_is_read_and_the_hub_ignored(tmp_path, offline, monkeypatch):
    import multitask.data.hub as hub_module

    def no_hub(*args, **kwargs):
        raise AssertionError("the hub copy must not be read while the local file exists")

    monkeypatch.setattr(hub_module, "load_hub_split", no_hub)
    _, files, _ = sst2_case()
    write_files(tmp_path, files)
    task = shipped("sst2.yaml", "no-such-org/no-such-dataset")
    loaded = load_task_data(task, tmp_path, "sst2.yaml")
    assert [e.text for e in loaded.examples["train"]] == [s for s, _ in SST2_ROWS]


# ---------------------------------------------------------------------------- (c) neither: one line naming both


def test_c_missing_file_and_unreachable_hub_is_one_line_naming_both(tmp_path, offline):
    task = shipped("sst2.yaml", "no-such-org/no-such-dataset")
    with pytest.raises(DataError) as caught:
        load_task_data(task, tmp_path, "tasks/sst2.yaml")
    message = str(caught.value)
    assert "\n" not in message
    assert str(tmp_path / "sst2" / "train.tsv") in message
    assert "no-such-org/no-such-dataset (config sst2, split train)" in message
    assert "put the file there" in message and "go online" in message and "MULTITASK_DATA_ROOT" in message


def test_without_a_hub_copy_the_missing_file_error_is_unchanged(tmp_path):
    (tmp_path / "t.yaml").write_text("name: t\ntype: classification\ndata:\n  train: {path: a.tsv, format: tsv}\n"
                                     "fields: {text: s, label: l}\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"data file not found: .*a\.tsv \(data root .*MULTITASK_DATA_ROOT") as caught:
        load_task_data(load_task(tmp_path / "t.yaml"), tmp_path, "t.yaml")
    assert "hub copy" not in str(caught.value) and "go online" not in str(caught.value)


def test_a_hub_copy_of_another_layout_names_the_missing_columns(tmp_path, offline):
    copy = save_copy(tmp_path / "copy", {"train": ({"words": [["a"]], "ner_tags": [[0]]},
                                                   Features({"words": List(Value("string")),
                                                             "ner_tags": List(ClassLabel(names=["O"]))}))})
    task = load_task(REPO / "tasks" / "msra_ner.yaml", {"data": {"train": {"hub": {"name": str(copy)}}}})
    with pytest.raises(DataError, match=r"hub copy .*expected column\(s\) tokens .*the dataset has: words, tags"):
        load_task_data(task, tmp_path, "msra_ner.yaml")


def test_a_hub_split_the_copy_lacks_is_named(tmp_path, offline):
    _, _, splits = sst2_case()
    copy = save_copy(tmp_path / "copy", {"train": splits["train"]})
    task = shipped("sst2.yaml", copy)
    with pytest.raises(DataError, match=r"data\.validation: hub copy .*: hub 'split' must be one of train, got "
                                        r"'validation'$"):
        load_task_data(task, tmp_path, "sst2.yaml")


def test_hub_settings_are_checked_when_the_task_loads(tmp_path):
    bad = {"colums": {"a": "b"}}, {"class_labels": "numbers"}, {"options": {"tag_scheme": "nope"}}
    for extra in bad:
        with pytest.raises(ConfigError, match=r"conll2003\.yaml:\d+: .*hub"):
            load_task(REPO / "tasks" / "conll2003.yaml", {"data": {"train": {"hub": extra}}})


def test_the_cli_reports_a_missing_file_and_hub_copy_in_one_line(tmp_path, capsys, offline):
    config = write_project(tmp_path)
    task_file = tmp_path / "tasks" / "cls.yaml"
    task_file.write_text(task_file.read_text().replace(
        "train: {path: cls/train.tsv, format: tsv}",
        "train: {path: cls/train.tsv, format: tsv, hub: {name: no-such-org/sst, config: sst2, split: train}}"))
    (tmp_path / "data" / "cls" / "train.tsv").unlink()
    assert main(["validate", str(config)]) == 2
    err = capsys.readouterr().err
    error = err.strip().splitlines()[-1]
    assert error.startswith("error: ") and "Traceback" not in err and err.count("error: ") == 1
    assert str(tmp_path / "data" / "cls" / "train.tsv") in error
    assert "no-such-org/sst (config sst2, split train)" in error


# ---------------------------------------------------------------------------- (d) every shipped task has a hub copy


@pytest.mark.parametrize("path", TASK_FILES, ids=lambda p: p.name)
def test_d_every_shipped_split_names_its_hub_copy(path):
    task = load_task(path)
    sources = [(split, getattr(task.config.data, split)) for split in SPLITS]
    sources = [(split, source) for split, source in sources if source is not None]
    assert sources
    for split, source in sources:
        assert source.hub is not None, f"{path.name}: data.{split} has no hub copy"
        assert source.hub.name and source.hub.split
        assert source.hub.name.split("/")[-1].lower().replace("-", "_") in task.config.description.lower().replace(
            "-", "_"), f"{path.name}: the description should say which hub dataset it is"


# ---------------------------------------------------------------------------- the feature cache


def test_the_cache_key_follows_the_content_whichever_copy_was_read(tmp_path, offline):
    _, files, splits = sst2_case()
    local, hub = local_then_hub(tmp_path, "sst2.yaml", files, splits)
    config = {"config": local.task.config, "labels": local.task.labels}
    key = lambda examples: cache_key("tokenizer", config, examples, True)  # noqa: E731
    assert key(hub.examples["train"]) == key(local.examples["train"])  # the same content: the same features
    changed = [type(e)(**{**e.__dict__, "label": "1"}) for e in hub.examples["train"]]
    assert key(changed) != key(local.examples["train"])
