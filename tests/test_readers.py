"""Readers: happy paths, one-line DataErrors that point at file:line, option validation, shipped data counts."""

from __future__ import annotations

import gzip
import json
import os
from collections import Counter
from pathlib import Path

import pytest

from multitask.data.readers import READERS, CsvOptions, build_options, read_records
from multitask.data.splits import carve_by_group
from multitask.errors import ConfigError, DataError


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


# ---------------------------------------------------------------------------- options


def test_every_format_is_registered_with_options():
    assert READERS.available() == ["conll", "csv", "hf_dataset", "json", "jsonl", "label_line", "squad", "tsv"]
    assert READERS.get("csv").options_type is CsvOptions


def test_unknown_option_lists_allowed():
    expected = r"key 'options.delimter': unknown key \(did you mean 'delimiter'\?\); allowed keys: .*encoding"
    with pytest.raises(ConfigError, match=expected):
        build_options("tsv", {"delimter": ","})


def test_mistyped_options():
    with pytest.raises(ConfigError, match=r"key 'options.header': expected bool, got 'yes'"):
        build_options("csv", {"header": "yes"})
    with pytest.raises(ConfigError, match=r"key 'options.skip_rows': expected int"):
        build_options("csv", {"skip_rows": True})
    with pytest.raises(ConfigError, match=r"key 'options.column_names.1': expected str"):
        build_options("csv", {"column_names": ["a", 1]})
    with pytest.raises(ConfigError, match="'encoding' must be a known text encoding"):
        build_options("label_line", {"encoding": "latin-9000"})
    with pytest.raises(ConfigError, match="tag_scheme.*known: bio, bioes, bmes, iob1, iob2, iobes"):
        build_options("conll", {"tag_scheme": "bilou"})


def test_unknown_format_and_defaults():
    with pytest.raises(ConfigError, match="unknown data format 'xml'"):
        read_records("x.xml", "xml", {})
    assert build_options("tsv", None).delimiter == "\t"
    assert build_options("conll", {"separator": "\t"}).tag_column == -1


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="nope.tsv: file not found"):
        read_records(tmp_path / "nope.tsv", "tsv", {})


# ---------------------------------------------------------------------------- csv / tsv


def test_csv_header_positional_and_multiline_quotes(tmp_path):
    path = write(tmp_path / "a.csv", 'text,label\n"hello, world",1\n\n"two\nlines",0\n')
    records = read_records(path, "csv", {})
    assert [r.fields for r in records] == [
        {"text": "hello, world", "label": "1", "0": "hello, world", "1": "1"},
        {"text": "two\nlines", "label": "0", "0": "two\nlines", "1": "0"},
    ]
    assert [r.source for r in records] == [f"{path}:2", f"{path}:4"]


def test_tsv_keeps_bare_quotes_and_trailing_space(tmp_path):
    path = write(tmp_path / "sst.tsv", 'sentence\tlabel\n"quoted start and a " inside \t1\n')
    (record,) = read_records(path, "tsv", {})
    assert record.fields["sentence"] == '"quoted start and a " inside '
    assert record.fields["label"] == "1"


def test_headerless_with_names_skip_rows_and_gzip(tmp_path):
    path = tmp_path / "b.tsv.gz"
    path.write_bytes(gzip.compress("# banner\n0\tbad\n1\tgood\n".encode()))
    records = read_records(path, "tsv", {"header": False, "column_names": ["label", "text"], "skip_rows": 1})
    assert [r.fields["text"] for r in records] == ["bad", "good"]
    assert records[1].fields["0"] == "1" and records[1].source == f"{path}:3"
    positional = read_records(path, "tsv", {"header": False, "skip_rows": 1})
    assert positional[0].fields == {"0": "0", "1": "bad"}


def test_column_names_replace_header(tmp_path):
    path = write(tmp_path / "c.csv", "a,b\nx,y\n")
    (record,) = read_records(path, "csv", {"column_names": ["label", "text"]})
    assert record.fields == {"label": "x", "text": "y", "0": "x", "1": "y"}


def test_wrong_column_count(tmp_path):
    path = write(tmp_path / "bad.tsv", "sentence\tlabel\nok\t1\nno label here\n")
    with pytest.raises(DataError, match=r"bad\.tsv:3: expected 2 columns, got 1$"):
        read_records(path, "tsv", {})


def test_headerless_wrong_column_count_uses_first_row(tmp_path):
    path = write(tmp_path / "bad.csv", "a,b,c\nd,e\n")
    with pytest.raises(DataError, match=r"bad\.csv:2: expected 3 columns, got 2"):
        read_records(path, "csv", {"header": False})


def test_duplicate_header(tmp_path):
    path = write(tmp_path / "dup.csv", "a,a\n1,2\n")
    with pytest.raises(DataError, match=r"dup\.csv:1: expected unique column names"):
        read_records(path, "csv", {})


def test_wrong_encoding_names_line(tmp_path):
    path = write(tmp_path / "l1.tsv", "text\tlabel\nfine\t1\nsister\xf0city\t0\n", encoding="latin-1")
    with pytest.raises(DataError, match=r"l1\.tsv:3: expected utf-8 text"):
        read_records(path, "tsv", {})
    assert read_records(path, "tsv", {"encoding": "latin-1"})[1].fields["text"] == "sister\xf0city"


# ---------------------------------------------------------------------------- json / jsonl


def test_json_list_and_records_key(tmp_path):
    plain = write(tmp_path / "a.json", json.dumps([{"x": 1}, {"x": 2}]))
    assert [r.fields["x"] for r in read_records(plain, "json", {})] == [1, 2]
    nested = write(tmp_path / "b.json", json.dumps({"version": 1, "rows": [{"x": 3}]}))
    (record,) = read_records(nested, "json", {"records_key": "rows"})
    assert record.fields == {"x": 3} and record.source == f"{nested}:rows[0]"
    with pytest.raises(DataError, match="set records_key"):
        read_records(nested, "json", {})


def test_json_malformed(tmp_path):
    path = write(tmp_path / "bad.json", '[\n{"x": 1},\n{"x": }\n]')
    with pytest.raises(DataError, match=r"bad\.json:3: expected valid JSON"):
        read_records(path, "json", {})
    not_objects = write(tmp_path / "list.json", "[1]")
    with pytest.raises(DataError, match=r"list\.json:\[0\]: expected a JSON object, got int"):
        read_records(not_objects, "json", {})


def test_jsonl(tmp_path):
    path = write(tmp_path / "a.jsonl", '{"text": "a", "label": 0}\n\n{"text": "b", "label": 1}\n')
    records = read_records(path, "jsonl", {})
    assert [r.fields["text"] for r in records] == ["a", "b"]
    assert records[1].source == f"{path}:3"


def test_jsonl_malformed(tmp_path):
    path = write(tmp_path / "bad.jsonl", '{"a": 1}\n{"a": 2\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: expected a JSON object"):
        read_records(path, "jsonl", {})
    array_line = write(tmp_path / "arr.jsonl", "[1, 2]\n")
    with pytest.raises(DataError, match=r"arr\.jsonl:1: expected a JSON object, got list"):
        read_records(array_line, "jsonl", {})


# ---------------------------------------------------------------------------- conll

CONLL = """-DOCSTART- -X- -X- O

EU NNP B-NP B-ORG
rejects VBZ B-VP O
German JJ B-NP I-MISC

\t
Peter NNP B-NP B-PER
Blackburn NNP I-NP I-PER
-DOCSTART- -X- -X- O
BRUSSELS NNP B-NP B-LOC
"""


def test_conll_docstart_blank_lines_and_repair(tmp_path):
    records = read_records(write(tmp_path / "c.txt", CONLL), "conll", {})
    assert [r.fields for r in records] == [
        {"tokens": ["EU", "rejects", "German"], "tags": ["B-ORG", "O", "B-MISC"]},
        {"tokens": ["Peter", "Blackburn"], "tags": ["B-PER", "I-PER"]},
        {"tokens": ["BRUSSELS"], "tags": ["B-LOC"]},
    ]
    assert [r.source.rsplit(":", 1)[1] for r in records] == ["3", "8", "11"]


def test_conll_gzip_and_columns(tmp_path):
    path = tmp_path / "c.txt.gz"
    path.write_bytes(gzip.compress(CONLL.encode()))
    records = read_records(path, "conll", {"token_column": 1, "tag_column": 2})
    assert records[0].fields == {"tokens": ["NNP", "VBZ", "JJ"], "tags": ["B-NP", "B-VP", "B-NP"]}


def test_conll_tab_separator_keeps_spaces_in_tokens(tmp_path):
    path = write(tmp_path / "t.conll", "New York\tB-location\n!\tO\r\n\nx\tO\n")
    records = read_records(path, "conll", {"separator": "\t"})
    assert records[0].fields == {"tokens": ["New York", "!"], "tags": ["B-location", "O"]}
    assert len(records) == 2


def test_conll_weibo_digit_strip(tmp_path):
    path = write(tmp_path / "w.train", "科0\tO\n技1\tO\n陈0\tB-PER.NAM\n00\tO\n\ufffd\ufffd0\tO\n")
    (record,) = read_records(path, "conll", {"separator": "\t", "strip_token_suffix_digits": True})
    assert record.fields["tokens"] == ["科", "技", "陈", "0", "\ufffd\ufffd"]
    bad = write(tmp_path / "w.dev", "科0\tO\n技\tO\n")
    with pytest.raises(DataError, match=r"w\.dev:2: expected a token followed by a segmentation digit"):
        read_records(bad, "conll", {"separator": "\t", "strip_token_suffix_digits": True})


def test_conll_bmes_and_bioes(tmp_path):
    path = write(tmp_path / "r.bmes", "高 B-NAME\n勇 E-NAME\n， O\n中 S-LOC\n\n")
    (record,) = read_records(path, "conll", {"tag_scheme": "bmes"})
    assert record.fields["tags"] == ["B-NAME", "I-NAME", "O", "B-LOC"]
    (record,) = read_records(path, "conll", {"tag_scheme": "bioes"})
    assert record.fields["tags"] == ["B-NAME", "I-NAME", "O", "B-LOC"]


def test_conll_too_few_columns(tmp_path):
    path = write(tmp_path / "bad.txt", "EU B-ORG\nrejects O\n\nlonely\n")
    with pytest.raises(DataError, match=r"bad\.txt:4: expected at least 2 columns, got 1"):
        read_records(path, "conll", {})
    with pytest.raises(DataError, match=r"bad\.txt:1: expected at least 3 columns, got 2"):
        read_records(path, "conll", {"tag_column": 2})


def test_conll_invalid_tag_points_at_line(tmp_path):
    path = write(tmp_path / "bad.bmes", "a O\n\nb B-X\nc Q-X\n")
    with pytest.raises(DataError, match=r"bad\.bmes:4: tag 'Q-X' is not valid bmes"):
        read_records(path, "conll", {"tag_scheme": "bmes"})


# ---------------------------------------------------------------------------- squad

SQUAD_V2 = {
    "version": "v2.0",
    "data": [
        {
            "title": "Normans",
            "paragraphs": [
                {
                    "context": "The Normans were in Normandy.",
                    "qas": [
                        {"id": "q1", "question": "Who?", "answers": [{"text": "Normans", "answer_start": 4}]},
                        {"id": "q2", "question": "Why?", "answers": [], "is_impossible": True,
                         "plausible_answers": [{"text": "Normandy", "answer_start": 20}]},
                    ],
                }
            ],
        },
        {
            "paragraphs": [
                {
                    "id": "DEV_0",
                    "context": "《战国无双3》",
                    "qas": [
                        {"id": "DEV_0_QUERY_0", "question": "什么？",
                         "answers": [{"text": "战国无双3", "answer_start": 1}, {"text": "无双", "answer_start": -1}]}
                    ],
                }
            ],
        },
    ],
}


def test_squad_v2_and_cmrc_alternatives(tmp_path):
    records = read_records(write(tmp_path / "s.json", json.dumps(SQUAD_V2, ensure_ascii=False)), "squad", {})
    assert [r.fields["id"] for r in records] == ["q1", "q2", "DEV_0_QUERY_0"]
    assert records[0].fields == {
        "id": "q1",
        "title": "Normans",
        "context": "The Normans were in Normandy.",
        "question": "Who?",
        "answers": [{"text": "Normans", "answer_start": 4}],
        "is_impossible": False,
    }
    assert records[1].fields["is_impossible"] is True and records[1].fields["answers"] == []
    assert records[2].fields["title"] == "1"
    assert [a["answer_start"] for a in records[2].fields["answers"]] == [1, -1]


def test_squad_missing_key_names_question(tmp_path):
    broken = json.loads(json.dumps(SQUAD_V2))
    del broken["data"][0]["paragraphs"][0]["qas"][1]["question"]
    path = write(tmp_path / "bad.json", json.dumps(broken))
    where = r"bad\.json:data\[0\]\.paragraphs\[0\]\.qas\[1\] \(id q2\)"
    with pytest.raises(DataError, match=where + ": expected key 'question'"):
        read_records(path, "squad", {})
    with pytest.raises(DataError, match=r"list\.json: expected key 'data'"):
        read_records(write(tmp_path / "list.json", "[]"), "squad", {})


# ---------------------------------------------------------------------------- label_line


def test_label_line_latin1(tmp_path):
    text = "DESC:manner How did serfdom develop ?\nLOC:city Which sister\xf0city ?\n\n"
    records = read_records(write(tmp_path / "t.label", text, "latin-1"), "label_line", {"encoding": "latin-1"})
    assert records[0].fields == {
        "label": "DESC:manner",
        "coarse_label": "DESC",
        "fine_label": "DESC:manner",
        "text": "How did serfdom develop ?",
    }
    assert records[1].fields["text"] == "Which sister\xf0city ?" and records[1].source.endswith("t.label:2")


def test_label_line_without_label(tmp_path):
    path = write(tmp_path / "bad.label", "NUM:date When ?\n  How far ?\n")
    with pytest.raises(DataError, match=r"bad\.label:2: expected 'LABEL text'"):
        read_records(path, "label_line", {})
    single = write(tmp_path / "one.label", "HUM:ind\n")
    with pytest.raises(DataError, match=r"one\.label:1: expected 'LABEL text'"):
        read_records(single, "label_line", {})


# ---------------------------------------------------------------------------- hf_dataset


def test_hf_dataset_from_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = {"sentence": ["good", "bad"], "label": [1, 0]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "single"))
    records = read_records(tmp_path / "single", "hf_dataset", {"load_from_disk": True})
    assert [r.fields for r in records] == [{"sentence": "good", "label": 1}, {"sentence": "bad", "label": 0}]

    splits = datasets.DatasetDict({part: datasets.Dataset.from_dict(rows) for part in ("train", "validation")})
    splits.save_to_disk(str(tmp_path / "dict"))
    records = read_records(tmp_path / "dict", "hf_dataset", {"load_from_disk": True, "split": "validation"})
    assert len(records) == 2 and records[1].source.endswith("dict:validation[1]")
    with pytest.raises(ConfigError, match="'split' must be one of train, validation"):
        read_records(tmp_path / "dict", "hf_dataset", {"load_from_disk": True})


def test_hf_dataset_errors(tmp_path):
    pytest.importorskip("datasets")
    with pytest.raises(ConfigError, match="needs a path or data option 'name'"):
        read_records(None, "hf_dataset", {})
    with pytest.raises(ConfigError, match="'load_from_disk' needs a path"):
        read_records(None, "hf_dataset", {"load_from_disk": True})
    with pytest.raises(DataError, match="missing: cannot load dataset"):
        read_records(tmp_path / "missing", "hf_dataset", {"load_from_disk": True})


# ---------------------------------------------------------------------------- shipped data


def shipped_data_root() -> Path:
    return Path(os.environ.get("MULTITASK_DATA_ROOT") or Path(__file__).resolve().parents[1].parent / "shared" / "data")


def entity_counts(records) -> dict[str, int]:
    return dict(Counter(tag[2:] for record in records for tag in record.fields["tags"] if tag.startswith("B-")))


TAB = {"separator": "\t"}
WEIBO = {"separator": "\t", "strip_token_suffix_digits": True}
BMES = {"tag_scheme": "bmes"}

# (file, options, sentences, tokens, entity mentions) as stated in each SOURCE.md, except where noted:
# spans that open with I-/M- (cut by a chunk or sentence break, or typed differently from the
# preceding tag) are counted once more after the IOB2 repair, as seqeval counts them.
NER_FILES = [
    ("conll2003/train.txt", {}, 14041, 203621, {"LOC": 7140, "MISC": 3438, "ORG": 6321, "PER": 6600}),
    ("conll2003/valid.txt", {}, 3250, 51362, {"LOC": 1837, "MISC": 922, "ORG": 1341, "PER": 1842}),
    ("wnut17/wnut17train.conll", TAB, 3394, 62730,
     {"corporation": 221, "creative-work": 140, "group": 264, "location": 548, "person": 660, "product": 142}),
    ("wnut17/emerging.dev.conll", TAB, 1009, 15733,
     {"corporation": 34, "creative-work": 105, "group": 39, "location": 74, "person": 470, "product": 114}),
    ("bc5cdr/train.tsv", TAB, 4560, 118170, {"Chemical": 5203, "Disease": 4182}),
    ("bc5cdr/devel.tsv", TAB, 4581, 117453, {"Chemical": 5347, "Disease": 4246}),
    # SOURCE.md: ORG 20571, PER 17615; 100-char re-chunking cut 3 ORG and 3 PER mentions in two.
    ("msra_ner/train.txt.gz", {}, 50658, 2169879, {"LOC": 36517, "ORG": 20574, "PER": 17618}),
    # SOURCE.md: PER.NAM 574, PER.NOM 766; 10 spans open with I- in the file.
    ("weibo_ner/weiboNER_2nd_conll.train", WEIBO, 1350, 73778,
     {"GPE.NAM": 205, "GPE.NOM": 8, "LOC.NAM": 56, "LOC.NOM": 51, "ORG.NAM": 183, "ORG.NOM": 42,
      "PER.NAM": 578, "PER.NOM": 772}),
    ("weibo_ner/weiboNER_2nd_conll.dev", WEIBO, 270, 14509,
     {"GPE.NAM": 26, "GPE.NOM": 1, "LOC.NAM": 6, "LOC.NOM": 6, "ORG.NAM": 47, "ORG.NOM": 5, "PER.NAM": 90,
      "PER.NOM": 208}),
    # SOURCE.md: ORG 4611; a sentence break at line 62391 falls inside an ORG (and one more like it).
    ("resume_ner/train.char.bmes", BMES, 3821, 124099,
     {"CONT": 260, "EDU": 858, "LOC": 47, "NAME": 952, "ORG": 4613, "PRO": 287, "RACE": 115, "TITLE": 6308}),
    ("resume_ner/dev.char.bmes", BMES, 463, 13890,
     {"CONT": 33, "EDU": 106, "LOC": 2, "NAME": 110, "ORG": 523, "PRO": 18, "RACE": 15, "TITLE": 690}),
]

# (file, format, options, label field, label counts)
CLASSIFICATION_FILES = [
    ("sst2/train.tsv", "tsv", {}, "label", {"0": 29780, "1": 37569}),
    ("sst2/dev.tsv", "tsv", {}, "label", {"0": 428, "1": 444}),
    ("chnsenticorp/train.tsv", "tsv", {}, "label", {"0": 4801, "1": 4799}),
    ("chnsenticorp/dev.tsv", "tsv", {}, "label", {"0": 607, "1": 593}),
    ("trec/train_5500.label", "label_line", {"encoding": "latin-1"}, "coarse_label",
     {"ABBR": 86, "DESC": 1162, "ENTY": 1250, "HUM": 1223, "LOC": 835, "NUM": 896}),
]

# (file, articles, questions, reference answers, answers whose start does not locate their text)
QA_FILES = [
    ("squad_v1.1/dev-v1.1.json", 48, 10570, 34726, 0),
    ("cmrc2018/cmrc2018_dev.json", 848, 3219, 9657, 200),
    ("drcd/DRCD_dev.json", 383, 3524, 7048, 0),
]


@pytest.fixture(scope="module")
def root() -> Path:
    path = shipped_data_root()
    if not path.is_dir():
        pytest.skip(f"shipped data not found at {path} (set MULTITASK_DATA_ROOT)")
    return path


class TestShippedData:
    """Every file in shared/data reads with the options a task would use, matching SOURCE.md."""

    @pytest.mark.parametrize("name, options, sentences, tokens, entities", NER_FILES, ids=[f[0] for f in NER_FILES])
    def test_ner(self, root, name, options, sentences, tokens, entities):
        records = read_records(root / name, "conll", options)
        assert len(records) == sentences
        assert sum(len(r.fields["tokens"]) for r in records) == tokens
        assert entity_counts(records) == entities

    @pytest.mark.parametrize("name, format, options, field, counts", CLASSIFICATION_FILES,
                             ids=[f[0] for f in CLASSIFICATION_FILES])
    def test_classification(self, root, name, format, options, field, counts):
        records = read_records(root / name, format, options)
        assert dict(Counter(r.fields[field] for r in records)) == counts

    def test_trec_fine_labels_and_latin1_byte(self, root):
        records = read_records(root / "trec/train_5500.label", "label_line", {"encoding": "latin-1"})
        assert len({r.fields["fine_label"] for r in records}) == 50
        assert sum("\xf0" in r.fields["text"] for r in records) == 1

    @pytest.mark.parametrize("name, articles, questions, answers, unaligned", QA_FILES, ids=[f[0] for f in QA_FILES])
    def test_qa(self, root, name, articles, questions, answers, unaligned):
        records = read_records(root / name, "squad", {})
        assert len(records) == questions
        assert len({r.source.split(".paragraphs")[0] for r in records}) == articles
        all_answers = [(r.fields["context"], a) for r in records for a in r.fields["answers"]]
        assert len(all_answers) == answers
        located = [a["answer_start"] >= 0 and c.startswith(a["text"], a["answer_start"]) for c, a in all_answers]
        assert located.count(False) == unaligned
        assert not any(r.fields["is_impossible"] for r in records)

    def test_squad_split_by_article(self, root):
        records = read_records(root / "squad_v1.1/dev-v1.1.json", "squad", {})
        train, validation = carve_by_group(records, "title", 0.2, seed=0)
        assert not {r.fields["title"] for r in train} & {r.fields["title"] for r in validation}
        assert 0.2 * len(records) <= len(validation) < 0.35 * len(records)
