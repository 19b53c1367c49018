"""Data on Arrow (lsr_run.store): conversions that are exact, reused, never stale, shared between processes."""

from __future__ import annotations

import gzip
import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import write_beir
from lsr_run import store
from lsr_run.data import load_corpus_file, load_dataset, load_folder
from lsr_run.errors import DataError, LsrError


def _beir_texts(path: Path) -> dict[str, str]:
    """id -> title + " " + text, read straight from the JSONL (the reference the tables must reproduce)."""
    opener = gzip.open if str(path).endswith(".gz") else open
    out = {}
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            obj = json.loads(line)
            title, text = obj.get("title") or "", obj.get("text") or ""
            out[str(obj["_id"])] = f"{title} {text}".strip() if title else text
    return out


def test_scifact_table_holds_every_document_in_file_order(data_dir, tmp_path):
    path = next(p for p in (data_dir / "scifact").glob("corpus.jsonl*"))
    want = _beir_texts(path)
    corpus = load_corpus_file(path, "scifact", cache_dir=str(tmp_path))
    assert corpus.ids() == list(want) and list(corpus) == list(want) and len(corpus) == len(want)
    ids = list(want)
    rng = np.random.default_rng(0)
    sample = [ids[i] for i in rng.integers(0, len(ids), 500)]
    assert corpus.many(sample) == [want[i] for i in sample]
    assert all(corpus[i] == want[i] and corpus.text(i) == want[i] and i in corpus for i in sample[:50])
    streamed = [(i, t) for b_ids, b_texts in corpus.batches(size=1000) for i, t in zip(b_ids, b_texts)]
    assert streamed == list(want.items())
    assert "no-such-doc" not in corpus and 4983 not in corpus
    with pytest.raises(KeyError, match="no-such-doc"):
        corpus.many([ids[0], "no-such-doc"])
    # the content key provenance uses is the file's SHA-256, recorded at conversion
    from lsr_run.provenance import file_digest

    assert corpus.digest == file_digest(path)
    # the same file as a datasets.Dataset (memory-mapped by datasets itself)
    ds = store.open_dataset(corpus.folder)
    assert ds.num_rows == len(want) and ds[17]["id"] == ids[17]


def test_second_load_maps_the_conversion_and_a_rewrite_within_one_tick_is_seen(tmp_path):
    folder = write_beir(tmp_path / "toy", {"d1": ("", "alpha beta"), "d2": ("", "gamma delta")}, {"q": "alpha"},
                        {"q": {"d1": 1}})
    cache = str(tmp_path / "cache")
    first = load_folder("toy", folder, "test", cache)
    table = first.corpus.folder / "data.arrow"
    stamp = (table.stat().st_ino, table.stat().st_mtime_ns)
    again = load_folder("toy", folder, "test", cache)
    assert again.corpus.folder == first.corpus.folder  # not reconverted: the same table file
    assert (table.stat().st_ino, table.stat().st_mtime_ns) == stamp
    # rewrite the corpus with the same size and restore its timestamp: only the content differs
    corpus_file = folder / "corpus.jsonl"
    before = corpus_file.stat()
    corpus_file.write_text(corpus_file.read_text().replace("gamma delta", "gamma DELTA"))
    os.utime(corpus_file, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert corpus_file.stat().st_size == before.st_size
    changed = load_folder("toy", folder, "test", cache)
    assert changed.corpus["d2"] == "gamma DELTA" and changed.corpus.digest != first.corpus.digest


def test_settled_file_is_trusted_by_identity_without_rehashing(tmp_path, monkeypatch):
    folder = write_beir(tmp_path / "toy", {"d1": ("", "alpha")}, {"q": "alpha"}, {"q": {"d1": 1}})
    old = time.time_ns() - 10 * store.RACY_NS
    for f in (folder / "corpus.jsonl", folder / "queries.jsonl"):
        os.utime(f, ns=(old, old))
    cache = str(tmp_path / "cache")
    load_folder("toy", folder, "test", cache)
    import lsr_run.provenance as prov

    def no_hashing(path):
        raise AssertionError(f"{path} was hashed again")

    monkeypatch.setattr(prov, "file_digest", no_hashing)
    assert load_folder("toy", folder, "test", cache).corpus["d1"] == "alpha"


def test_lookup_survives_hash_collisions(tmp_path, monkeypatch):
    class Colliding:  # every id hashes to one of two values
        @staticmethod
        def xxh3_64_intdigest(data: bytes) -> int:
            return len(data) % 2

    monkeypatch.setattr(store, "xxhash", Colliding)
    docs = {f"d{i}": ("", f"text {i}") for i in range(40)}
    folder = write_beir(tmp_path / "toy", docs, {"q": "text"}, {"q": {"d3": 1}})
    corpus = load_folder("toy", folder, "test", str(tmp_path / "cache")).corpus
    keys = [f"d{i}" for i in (39, 0, 7, 12, 12, 25)]
    assert corpus.many(keys) == [f"text {k[1:]}" for k in keys]
    assert corpus["d33"] == "text 33" and "d40" not in corpus and "x" not in corpus
    assert corpus.contains(["d1", "zz", "d22"]).tolist() == [True, False, True]


def test_duplicate_ids_name_both_lines_even_under_collisions(tmp_path, monkeypatch):
    folder = tmp_path / "dup"
    folder.mkdir()
    lines = [{"_id": "a", "text": "x"}, {"_id": "bb", "text": "y"}, {"_id": "c", "text": "z"}, {"_id": "bb", "text": "w"}]
    (folder / "corpus.jsonl").write_text("".join(json.dumps(o) + "\n" for o in lines))
    with pytest.raises(DataError, match=r"corpus.jsonl:4: duplicate document id 'bb' \(first at line 2\)"):
        load_corpus_file(folder / "corpus.jsonl", cache_dir=str(tmp_path / "cache"))
    assert not [p for p in (tmp_path / "cache" / "data").iterdir() if not p.name.endswith(".lock")]  # nothing left


@pytest.mark.process
def test_two_processes_share_one_conversion(tmp_path):
    docs = {f"d{i}": ("t", f"text {i} " * 50) for i in range(20000)}
    folder = write_beir(tmp_path / "big", docs, {"q": "text"}, {"q": {"d1": 1}})
    cache = tmp_path / "cache"
    code = ("import sys, json, time, logging; from lsr_run.data import load_corpus_file; from pathlib import Path;"
            "logging.basicConfig(level=logging.INFO);"
            "t = float(sys.argv[1]);\nwhile time.time() < t: time.sleep(0.005)\n"
            "c = load_corpus_file(Path(sys.argv[2]), cache_dir=sys.argv[3]);"
            "print(json.dumps([str(c.folder), len(c), c['d19999']]))")
    start = str(time.time() + 2)
    procs = [subprocess.Popen([sys.executable, "-c", code, start, str(folder / "corpus.jsonl"), str(cache)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    results = [json.loads(o[0]) for o in outs]
    assert results[0] == results[1] and results[0][1:] == [20000, "t " + "text 19999 " * 49 + "text 19999"]
    converted = [o[1].count("converted") for o in outs]  # one process converted, the other mapped its result
    folders = [p for p in (cache / "data").iterdir() if p.is_dir()]
    assert len(folders) == 1 and not [p for p in (cache / "data").iterdir() if ".tmp-" in p.name]
    assert sum(converted) == 1


def _write_scores(path: Path, rows: list[tuple[str, str, float]]) -> None:
    path.write_text("".join(f"{q}\t{d}\t{s!r}\n" for q, d, s in rows))


@pytest.mark.parametrize("grouped", [True, False])
def test_score_table_reads_one_query_at_a_time(tmp_path, grouped):
    from lsr_run.teachers import read_scores, score_table

    rng = np.random.default_rng(0)
    rows = [(f"q{q}", f"d{d}", float(rng.normal())) for q in range(50) for d in rng.choice(500, 20, replace=False)]
    if not grouped:
        rows = [rows[i] for i in rng.permutation(len(rows))]
    path = tmp_path / "scores.tsv"
    _write_scores(path, rows)
    table = score_table(path, cache_dir=str(tmp_path / "cache"))
    want = read_scores(path)
    assert len(table) == 50 and all(table.scores(q) == want[q] for q in want)
    assert table.scores("q-unknown") == {}
    # pair order within a query is the file's order, as the dict reader keeps it
    assert all(list(table.scores(q)) == list(want[q]) for q in want)


def test_score_table_from_a_pickle_and_file_teacher_uses_it(tmp_path):
    from lsr_run.data import Corpus
    from lsr_run.teachers import FileTeacher, score_table

    scores = {"1": {"10": 3.5, "11": -1.25}, 2: {12: np.float32(0.5)}}
    path = tmp_path / "scores.pkl"
    path.write_bytes(pickle.dumps(scores))
    table = score_table(path, cache_dir=str(tmp_path / "cache"))
    assert table.scores("1") == {"10": 3.5, "11": -1.25} and table.scores("2") == {"12": 0.5}
    teacher = FileTeacher(path=str(path), cache_dir=str(tmp_path / "cache"))
    corpus = Corpus.from_dicts({}, {"10": "a", "11": "b", "12": "c"})
    got = teacher.score({"1": "q one", "2": "q two"}, corpus, {"1": ["10", "11"], "2": ["12", "13"]}, tmp_path / "run")
    assert got == {"1": {"10": 3.5, "11": -1.25}, "2": {"12": 0.5}}


def test_hub_source_offline_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("LSR_DATA_DIR", str(tmp_path))  # no folder named like the dataset
    with pytest.raises(LsrError) as e:
        load_dataset("scifact_hub", "test", hf_id="BeIR/scifact", cache_dir=str(tmp_path / "cache"))
    message = str(e.value)
    assert "\n" not in message and "BeIR/scifact" in message and "LSR_DATA_DIR/scifact_hub" in message


def test_hub_source_is_converted_like_a_folder(data_dir, tmp_path, monkeypatch):
    """The Hub path with ``datasets.load_dataset`` answered from scifact's files (BeIR's column names)."""
    import datasets

    folder = data_dir / "scifact"
    corpus = _beir_texts(next(folder.glob("corpus.jsonl*")))
    queries = {str(json.loads(l)["_id"]): json.loads(l)["text"] for l in open(folder / "queries.jsonl")}
    qrels = [l.rstrip("\n").split("\t") for l in list(open(folder / "qrels" / "test.tsv"))[1:]]
    tables = {
        ("BeIR/scifact", "corpus"): datasets.Dataset.from_dict({"_id": list(corpus), "title": [""] * len(corpus),
                                                               "text": list(corpus.values())}),
        ("BeIR/scifact", "queries"): datasets.Dataset.from_dict({"_id": list(queries), "title": [""] * len(queries),
                                                                "text": list(queries.values())}),
        ("BeIR/scifact-qrels", None): datasets.Dataset.from_dict(
            {"query-id": [q for q, _, _ in qrels], "corpus-id": [d for _, d, _ in qrels],
             "score": [int(s) for _, _, s in qrels]}),
    }
    monkeypatch.setattr(datasets, "load_dataset", lambda path, name=None, split=None: tables[(path, name)])
    monkeypatch.setenv("LSR_DATA_DIR", str(tmp_path))
    hub = load_dataset("scifact_hub", "test", hf_id="BeIR/scifact", cache_dir=str(tmp_path / "cache"))
    local = load_folder("scifact", folder, "test", str(tmp_path / "cache"))
    assert hub.source == "hf:BeIR/scifact" and hub.qrels == local.qrels
    assert list(hub.corpus) == list(local.corpus) and hub.corpus.many(list(corpus)[:300]) == local.corpus.many(list(corpus)[:300])
    assert dict(hub.queries.items()) == dict(local.queries.items())


def test_encoding_streams_the_corpus_in_chunks(tmp_path, monkeypatch):
    """Chunked reading gives the same shards as one chunk (batch 1: no padding differences)."""
    import lsr_run.encoding as enc
    from conftest import make_tiny_encoder

    docs = {f"d{i}": ("", " ".join(["sparse retrieval lucene"] * (i % 5 + 1))) for i in range(9)}
    ds = load_folder("toy", write_beir(tmp_path / "toy", docs, {"q": "lucene"}, {"q": {"d1": 1}}), "test",
                     str(tmp_path / "cache"))
    encoder = make_tiny_encoder("bert", active=0.01).eval()
    spec = enc.EncodeSpec(batch_size=1, doc_max_length=16, bf16=False)

    def shards(out: Path) -> dict:
        return {json.loads(line)["id"]: json.loads(line)["vector"] for p in sorted(out.glob("part-*.jsonl"))
                for line in p.read_text().splitlines()}

    whole = enc.encode_corpus(encoder, ds.corpus, tmp_path / "whole", spec, min_shards=2)
    monkeypatch.setattr(enc, "ENCODE_CHUNK", 4)
    chunked = enc.encode_corpus(encoder, ds.corpus, tmp_path / "chunked", spec, min_shards=2)
    assert shards(tmp_path / "whole") == shards(tmp_path / "chunked") and len(shards(tmp_path / "whole")) == 9
    assert whole["docs"] == chunked["docs"] == 9
    # two ranks each read their own contiguous share
    parts = [enc.encode_corpus(encoder, ds.corpus, tmp_path / "ranks", spec, rank=r, world=2) for r in range(2)]
    assert [p["docs"] for p in parts] == [5, 4] and shards(tmp_path / "ranks") == shards(tmp_path / "whole")


def test_candidates_from_run_and_score_files_are_read_per_query(tmp_path):
    """Pools from the mapped tables equal pools from the whole-file readers, for the training queries only."""
    from lsr_run.candidates import RunFileCandidates, TeacherFileCandidates, _finish, _rank
    from lsr_run.data import Corpus, read_trec_run, write_trec_run
    from lsr_run.teachers import read_scores

    rng = np.random.default_rng(1)
    corpus = Corpus.from_dicts({}, {f"d{i}": f"text {i}" for i in range(300)})
    run = {f"q{q}": sorted(((f"d{d}", float(rng.normal())) for d in rng.choice(320, 40, replace=False)),
                           key=lambda x: -x[1]) for q in range(30)}
    run_path = tmp_path / "run.trec"
    write_trec_run(run_path, run)
    positives = {f"q{q}": [run[f"q{q}"][3][0]] for q in range(0, 30, 2)}  # half the queries train
    dataset = SimpleNamespace(corpus=corpus)
    got = RunFileCandidates(path=str(run_path), depth=10).pools(dataset, positives, tmp_path)
    assert got == _finish(_rank(read_trec_run(run_path), 10), positives, corpus, "x")
    assert set(got) == set(positives) and all(positives[q][0] not in got[q] and all(d in corpus for d in got[q])
                                              for q in got)
    scores = tmp_path / "scores.tsv"
    _write_scores(scores, [(q, d, s) for q, hits in run.items() for d, s in hits])
    from_scores = TeacherFileCandidates(path=str(scores), depth=10).pools(dataset, positives, tmp_path)
    assert from_scores == _finish(_rank(read_scores(scores), 10), positives, corpus, "x")
