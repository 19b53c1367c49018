"""Loading BEIR folders, and every kind of bad data named with file and line."""

import gzip
import json

import pytest

from lsr_run.data import load_dataset, load_folder, training_examples
from lsr_run.errors import DataError

from conftest import write_beir

DOCS = {"d1": ("Title one", "first text"), "d2": ("", "second text"), "d3": ("", "")}
QUERIES = {"q1": "first", "q2": "second", "q3": ""}


def test_loads_and_counts(tmp_path):
    folder = write_beir(tmp_path / "toy", DOCS, QUERIES, {"q1": {"d1": 1}, "q2": {"d2": 2}})
    ds = load_folder("toy", folder, "test")
    assert ds.corpus.text("d1") == "Title one first text"
    assert ds.corpus.text("d2") == "second text"
    assert ds.stats["empty_documents"] == 1
    assert ds.stats["empty_queries"] == 1
    assert ds.qrels == {"q1": {"d1": 1}, "q2": {"d2": 2}}
    assert all(isinstance(k, str) for k in ds.queries)
    assert training_examples(ds) == {"q1": ["d1"], "q2": ["d2"]}


def test_integer_ids_become_strings_and_gzip_corpus(tmp_path):
    folder = tmp_path / "ints"
    folder.mkdir()
    with gzip.open(folder / "corpus.jsonl.gz", "wt") as f:
        f.write(json.dumps({"_id": 7, "title": "", "text": "seven"}) + "\n")
    (folder / "queries.jsonl").write_text(json.dumps({"_id": 1, "text": "q"}) + "\n")
    (folder / "qrels").mkdir()
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n1\t7\t1\n")
    ds = load_folder("ints", folder, "test")
    assert ds.qrels == {"1": {"7": 1}}
    assert ds.corpus.ids() == ["7"]


def test_resolves_by_name_under_data_dir(tmp_path, monkeypatch):
    write_beir(tmp_path / "toy", DOCS, QUERIES, {"q1": {"d1": 1}})
    monkeypatch.setenv("LSR_DATA_DIR", str(tmp_path))
    assert load_dataset("toy", "test").source == str(tmp_path / "toy")


def test_unresolvable_name_says_what_to_set(tmp_path, monkeypatch):
    monkeypatch.setenv("LSR_DATA_DIR", str(tmp_path))
    with pytest.raises(DataError, match="LSR_DATA_DIR"):
        load_dataset("nowhere", "test")


def test_malformed_jsonl_names_file_and_line(tmp_path):
    folder = write_beir(tmp_path / "bad", DOCS, QUERIES, {"q1": {"d1": 1}})
    lines = (folder / "corpus.jsonl").read_text().splitlines()
    lines[1] = '{"_id": "d2", "text": "broken'
    (folder / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"corpus.jsonl:2: malformed JSON"):
        load_folder("bad", folder, "test")


def test_missing_files(tmp_path):
    folder = write_beir(tmp_path / "m", DOCS, QUERIES, {"q1": {"d1": 1}})
    with pytest.raises(DataError, match=r"qrels/dev.tsv: missing \(splits present: test\)"):
        load_folder("m", folder, "dev")
    (folder / "queries.jsonl").unlink()
    with pytest.raises(DataError, match="missing queries.jsonl"):
        load_folder("m", folder, "test")


def test_duplicate_ids(tmp_path):
    folder = write_beir(tmp_path / "dup", DOCS, QUERIES, {"q1": {"d1": 1}})
    with open(folder / "corpus.jsonl", "a") as f:
        f.write(json.dumps({"_id": "d1", "text": "again"}) + "\n")
    with pytest.raises(DataError, match=r"corpus.jsonl:4: duplicate document id 'd1' \(first at line 1\)"):
        load_folder("dup", folder, "test")
    folder = write_beir(tmp_path / "dupq", DOCS, QUERIES, {"q1": {"d1": 1}})
    with open(folder / "queries.jsonl", "a") as f:
        f.write(json.dumps({"_id": "q2", "text": "again"}) + "\n")
    with pytest.raises(DataError, match="duplicate query id 'q2'"):
        load_folder("dupq", folder, "test")


def test_qrels_with_unknown_ids_are_counted_or_fatal(tmp_path):
    folder = write_beir(tmp_path / "u", DOCS, QUERIES, {"q1": {"d1": 1, "zz": 1}, "qx": {"d1": 1}})
    ds = load_folder("u", folder, "test")
    assert ds.stats["qrels_unknown_queries"] == 1
    assert ds.stats["qrels_unknown_docs"] == 1
    assert ds.qrels == {"q1": {"d1": 1}}
    folder = write_beir(tmp_path / "none", DOCS, QUERIES, {"qx": {"zz": 1}})
    with pytest.raises(DataError, match="no judgement names a known query and document"):
        load_folder("none", folder, "test")


def test_non_utf8_bytes(tmp_path):
    folder = write_beir(tmp_path / "enc", DOCS, QUERIES, {"q1": {"d1": 1}})
    with open(folder / "queries.jsonl", "ab") as f:
        f.write(b'{"_id": "q9", "text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"queries.jsonl:4: not valid UTF-8"):
        load_folder("enc", folder, "test")
