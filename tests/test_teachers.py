"""Teacher file formats parsed from small fixtures written here; normalisation; caching."""

import gzip
import json
import pickle

import numpy as np
import pytest

from lsr_run.errors import DataError
from lsr_run.teachers import CrossEncoderTeacher, FileTeacher, normalize_scores, read_hard_negatives, read_scores


def test_ce_score_pickle_gzip_ids_become_strings(tmp_path):
    path = tmp_path / "cross-encoder-ms-marco-MiniLM-L-6-v2-scores.pkl.gz"
    with gzip.open(path, "wb") as f:
        pickle.dump({1: {10: 3.5, 11: -1.0}, 2: {12: 0.25}}, f)
    assert read_scores(path) == {"1": {"10": 3.5, "11": -1.0}, "2": {"12": 0.25}}


def test_plain_pickle(tmp_path):
    path = tmp_path / "scores.pkl"
    path.write_bytes(pickle.dumps({"q": {"d": 1}}))
    assert read_scores(path) == {"q": {"d": 1.0}}


def test_tsv_scores_with_header_and_bad_line(tmp_path):
    path = tmp_path / "scores.tsv"
    path.write_text("qid\tpid\tscore\nq1\td1\t0.5\nq1\td2\t-2\n")
    assert read_scores(path) == {"q1": {"d1": 0.5, "d2": -2.0}}
    path.write_text("q1\td1\t0.5\nq1\td2\n")
    with pytest.raises(DataError, match=r"scores.tsv:2"):
        read_scores(path)


def test_hard_negatives_jsonl(tmp_path):
    path = tmp_path / "msmarco-hard-negatives.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write(json.dumps({"qid": 5, "pos": [7], "neg": {"bm25": [1, 2, 3], "msmarco-MiniLM-L-6-v3": [3, 4]}}) + "\n")
    positives, candidates = read_hard_negatives(path)
    assert positives == {"5": ["7"]}
    assert candidates == {"5": ["1", "2", "3", "4"]}
    _, only_bm25 = read_hard_negatives(path, systems=["bm25"])
    assert only_bm25 == {"5": ["1", "2", "3"]}


def test_normalizations():
    scores = {"q": {"a": 1.0, "b": 3.0, "c": 5.0}}
    assert normalize_scores(scores, "minmax") == {"q": {"a": 0.0, "b": 0.5, "c": 1.0}}
    z = normalize_scores(scores, "zscore")["q"]
    assert np.mean(list(z.values())) == pytest.approx(0.0)
    assert np.std(list(z.values())) == pytest.approx(1.0)
    assert normalize_scores(scores, "none") is scores


def test_file_teacher_ids_matching_nothing_is_an_error(tmp_path):
    path = tmp_path / "scores.tsv"
    path.write_text("x1\ty1\t1.0\n")
    teacher = FileTeacher(path=str(path))
    with pytest.raises(DataError, match="no \\(query id, doc id\\) pair matches"):
        teacher.score({"q": "text"}, None, {"q": ["d"]}, tmp_path / "cache")


def test_file_teacher_caches_by_content(tmp_path, monkeypatch):
    path = tmp_path / "scores.tsv"
    path.write_text("q\td1\t1.0\nq\td2\t2.0\n")
    teacher = FileTeacher(path=str(path), cache_dir=str(tmp_path / "shared"))
    got = teacher.score({"q": "t"}, None, {"q": ["d1", "d2"]}, tmp_path / "run")
    assert got == {"q": {"d1": 1.0, "d2": 2.0}}
    assert len(list((tmp_path / "shared").glob("*.json"))) == 1
    path.write_text("q\td1\t1.0\nq\td2\t2.0\n")  # rewritten with the same content: served from the cache
    monkeypatch.setattr(FileTeacher, "compute", lambda *a: pytest.fail("scores computed again"))
    assert teacher.score({"q": "t"}, None, {"q": ["d1", "d2"]}, tmp_path / "run2") == got


def test_model_folder_is_keyed_by_content(tmp_path, monkeypatch):
    """A model retrained into the same folder gets its own scores, never the cached scores of the old weights;
    the same weights written again are served from the cache."""
    folder = tmp_path / "ce"
    (folder / "1_Pooling").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights v1")
    (folder / "1_Pooling" / "config.json").write_text("{}")
    (folder / "checkpoint-10").mkdir()
    (folder / "checkpoint-10" / "model.safetensors").write_bytes(b"trainer state")
    calls = []

    def compute(self, queries, corpus, pairs):
        calls.append(1)
        return {"q": {"d1": float(len(calls)), "d2": 0.0}}

    monkeypatch.setattr(CrossEncoderTeacher, "compute", compute)
    teacher = CrossEncoderTeacher(model=str(folder), cache_dir=str(tmp_path / "shared"))
    first = teacher.score({"q": "t"}, None, {"q": ["d1", "d2"]}, tmp_path / "run1")
    (folder / "checkpoint-10" / "model.safetensors").write_bytes(b"other trainer state")  # not read by a load
    (folder / "model.safetensors").write_bytes(b"weights v1")  # same bytes rewritten
    assert teacher.score({"q": "t"}, None, {"q": ["d1", "d2"]}, tmp_path / "run2") == first
    assert len(calls) == 1
    (folder / "1_Pooling" / "config.json").write_text('{"pooling": "mean"}')  # retrained: a file under it changed
    second = teacher.score({"q": "t"}, None, {"q": ["d1", "d2"]}, tmp_path / "run3")
    assert len(calls) == 2 and second["q"]["d1"] == 2.0


def _train_cross_encoder_script():
    import runpy
    from pathlib import Path

    return runpy.run_path(str(Path(__file__).resolve().parents[1] / "scripts" / "train_cross_encoder.py"),
                          run_name="train_cross_encoder")


def test_cross_encoder_training_pairs():
    training_pairs = _train_cross_encoder_script()["training_pairs"]
    qrels = {"q1": {"p1": 1, "p2": 2, "j0": 0}, "q2": {"p3": 1}, "q3": {"j1": 0}}
    queries = {"q1": "one", "q2": "two", "q3": "three"}
    bm25 = {"q1": {"j0": 9.0, "p1": 8.0, "n1": 7.0, "n2": 6.0, "n3": 5.0, "n4": 4.0},
            "q2": {"n1": 3.0, "p3": 2.0}}
    pairs, counts = training_pairs(qrels, queries, bm25, negatives=2, seed=1)
    by_query = {}
    for q, d, y in pairs:
        by_query.setdefault(q, []).append((d, y))
    # every judged positive; negatives are unjudged BM25 candidates (a judged-0 document is not a negative)
    assert sorted(d for d, y in by_query["q1"] if y == 1) == ["p1", "p2"]
    negatives = [d for d, y in by_query["q1"] if y == 0]
    assert len(negatives) == 2 and set(negatives) <= {"n1", "n2", "n3", "n4"}
    assert by_query["q2"] == [("p3", 1), ("n1", 0)]  # fewer candidates than asked for: all of them
    assert "q3" not in by_query  # no positive: skipped and counted
    assert counts == {"queries": 2, "queries_skipped": 1, "positives": 3, "negatives": 3}
    assert training_pairs(qrels, queries, bm25, negatives=2, seed=1)[0] == pairs  # seeded
    draws = {tuple(training_pairs(qrels, queries, bm25, negatives=2, seed=s)[0]) for s in range(8)}
    assert len(draws) > 1


@pytest.mark.integration
@pytest.mark.process
def test_fine_tuned_cross_encoder_is_a_teacher(tmp_path, data_dir):
    """scripts/train_cross_encoder.py on 4 scifact training queries writes a folder that teacher=cross_encoder
    loads and scores with; its record names the pairs it was trained on."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "ce"
    script = Path(__file__).resolve().parents[1] / "scripts" / "train_cross_encoder.py"
    subprocess.run([sys.executable, str(script), "--out", str(out), "--max-queries", "4", "--negatives", "2",
                    "--depth", "10", "--batch-size", "4"], check=True, capture_output=True, text=True,
                   env={**os.environ, "LSR_DATA_DIR": str(data_dir)})
    record = json.loads((out / "lsr_run_teacher.json").read_text())
    assert record["data"]["queries"] == 4 and record["data"]["negatives"] == 8
    assert record["steps"] == -(-(record["data"]["positives"] + 8) // 4) and len(record["loss_log"]) == record["steps"]
    from lsr_run.components import EvalDataset, load_spec

    ds = load_spec(EvalDataset(name="scifact", split="test", max_queries=1), str(data_dir), None)
    qid = next(iter(ds.qrels))
    docs = list(ds.qrels[qid])[:1] + ds.corpus.ids()[:2]
    got = CrossEncoderTeacher(model=str(out), max_length=128).compute(ds.queries, ds.corpus, {qid: docs})
    assert set(got[qid]) == set(docs) and all(np.isfinite(v) for v in got[qid].values())


@pytest.mark.integration
@pytest.mark.process
def test_rerank_reports_significance_and_reuses_teacher_scores(tmp_path, data_dir):
    """scripts/rerank.py on adi: BM25's and the teacher's nDCG@10 with a paired test over the same queries, per-query
    values that average to the means, and a second run served from the teacher-score cache."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "rerank.py"
    out = tmp_path / "rerank" / "bi.json"
    cmd = [sys.executable, str(script), "--datasets", "adi", "--depth", "20", "--out", str(out)]
    env = {**os.environ, "LSR_DATA_DIR": str(data_dir)}
    subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    entry = json.loads(out.read_text())["datasets"]["adi"]
    per_query = entry["per_query_ndcg@10"]
    assert set(per_query["bm25"]) == set(per_query["teacher"]) and len(per_query["bm25"]) == entry["queries"]
    for side in ("bm25", "teacher"):
        assert np.isclose(np.mean(list(per_query[side].values())), entry[side]["ndcg@10"])
    assert 0.0 <= entry["p_value_vs_bm25_ndcg@10"] <= 1.0
    assert len(list((out.parent / "work" / "teacher-cache").glob("*.json"))) == 1
    first_scores = per_query["teacher"]
    proc = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    assert "teacher scores from cache" in proc.stderr
    assert json.loads(out.read_text())["datasets"]["adi"]["per_query_ndcg@10"]["teacher"] == first_scores
