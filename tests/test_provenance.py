"""Results that cannot go stale: a stage is reused only when it was computed from the inputs it would use now.

One test per case that used to report stale results with exit 0. Tiny random BERT, toy BEIR data, brute-force
backend: no Java, seconds per run.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest

from conftest import WORDS, cli, toy_overrides, write_beir


def _run(toy, run_dir: Path, *extra, steps: int = 2):
    proc = cli(toy_overrides(toy, steps=steps) + [f"hydra.run.dir={run_dir}", *extra],
               {"LSR_DATA_DIR": str(toy["data"])})
    return proc


def _ok(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _run_file(run_dir: Path, key: str = "toytest") -> str:
    return (run_dir / "runs" / f"{key}.trec").read_text()


EVAL_ONLY = "stages=[encode,index,search,evaluate]"


@pytest.mark.process
def test_force_recomputes_every_stage_under_the_new_config(toy, tmp_path):
    run = tmp_path / "run"
    _ok(_run(toy, run, steps=2))
    first = _run_file(run)
    forced = _ok(_run(toy, run, "train.lr=5e-3", "force=true", steps=4))
    assert "train: done already" not in forced.stderr
    assert json.loads((run / "train_state.json").read_text())["steps"] == 4
    reference = tmp_path / "reference"  # the same config in a fresh folder
    _ok(_run(toy, reference, "train.lr=5e-3", steps=4))
    assert _run_file(run) == _run_file(reference) != first
    assert json.loads((run / "metrics.json").read_text()) == json.loads((reference / "metrics.json").read_text())


@pytest.mark.process
def test_evaluate_only_follows_the_model_it_is_given(toy, tmp_path):
    a, b, e = tmp_path / "a", tmp_path / "b", tmp_path / "eval"
    _ok(_run(toy, a, "seed=1"))
    _ok(_run(toy, b, "seed=2"))
    assert _run_file(a) != _run_file(b)
    _ok(_run(toy, e, EVAL_ONLY, f"model.path={a / 'model'}"))
    assert _run_file(e) == _run_file(a)
    _ok(_run(toy, e, EVAL_ONLY, f"model.path={b / 'model'}"))
    assert _run_file(e) == _run_file(b)
    # a damaged model is an error, not the previous model's metrics
    (b / "model" / "model.safetensors").write_bytes(b"not a safetensors file")
    bad = _run(toy, e, EVAL_ONLY, f"model.path={b / 'model'}")
    assert bad.returncode == 2 and "model.safetensors" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.process
def test_training_after_an_untrained_encode_encodes_again(toy, tmp_path):
    run, reference = tmp_path / "run", tmp_path / "reference"
    _ok(_run(toy, run, EVAL_ONLY))  # the untrained backbone's vectors
    untrained = _run_file(run)
    _ok(_run(toy, run))
    _ok(_run(toy, reference))
    assert _run_file(run) == _run_file(reference) != untrained


@pytest.mark.process
def test_pruning_builds_a_new_index_from_the_same_encodings(toy, tmp_path):
    """encode.doc_top_k / query_top_k change the index and the search, not the encodings: evaluating a finished
    run's model with them reuses its encodings (linked) and gives what a run trained with them from scratch gives."""
    import os

    from lsr_run.impacts import read_vectors, top_k

    a, e, ref = tmp_path / "a", tmp_path / "eval", tmp_path / "ref"
    _ok(_run(toy, a))
    full = json.loads((a / "metrics.json").read_text())["toytest"]
    assert full["doc_terms"] > 3 and full["query_terms"] > 2  # there is something to prune
    pruning = ["encode.doc_top_k=3", "encode.query_top_k=2"]
    proc = _ok(_run(toy, e, EVAL_ONLY, f"model.path={a / 'model'}", *pruning))
    assert "the encodings of" in proc.stderr and "encoded toytest" not in proc.stderr
    shards = sorted((e / "encoded").glob("*/corpus/*.jsonl"))
    assert shards and all(os.path.samefile(s, a / s.relative_to(e)) for s in shards)  # the same files
    docs = [vec for shard in shards for _, vec in read_vectors(shard)]
    queries = [vec for _, vec in read_vectors(e / "encoded" / "toytest" / "queries.jsonl", id_key="qid")]
    pruned = json.loads((e / "metrics.json").read_text())["toytest"]
    assert pruned["doc_terms"] == pytest.approx(sum(len(top_k(v, 3)) for v in docs) / len(docs))
    assert pruned["query_terms"] == pytest.approx(sum(len(top_k(v, 2)) for v in queries) / len(queries))
    index = next((e / "index").iterdir())
    from scipy import sparse

    assert sparse.load_npz(index / "docs.npz").getnnz(axis=1).max() <= 3  # the index holds the pruned vectors
    assert not list((e / "encoded").glob("*/.top*"))  # the pruned shards are gone once indexed
    _ok(_run(toy, ref, *pruning))  # trained, encoded and pruned in one run
    assert _run_file(ref) == _run_file(e)
    assert json.loads((ref / "metrics.json").read_text()) == json.loads((e / "metrics.json").read_text())
    # the same folder is a finished run of another config: refused, nothing lost
    again = _run(toy, e, EVAL_ONLY, f"model.path={a / 'model'}", "encode.doc_top_k=5")
    assert again.returncode == 2 and "encode.doc_top_k" in again.stderr
    assert json.loads((e / "metrics.json").read_text())["toytest"] == pruned


def _corpus(folder: Path, seed: int) -> Path:
    rng = random.Random(seed)
    docs = {f"d{i}": ("", " ".join(rng.choices(WORDS, k=20))) for i in range(30)}
    queries = {f"q{i}": " ".join(rng.choices(WORDS, k=4)) for i in range(8)}
    qrels = {f"q{i}": {f"d{i}": 1} for i in range(8)}
    return write_beir(folder, docs, queries, qrels)


@pytest.mark.process
def test_two_corpora_with_one_folder_name_get_their_own_index(toy, tmp_path):
    first, second = _corpus(tmp_path / "x" / "adi", 1), _corpus(tmp_path / "y" / "adi", 2)
    both, alone = tmp_path / "both", tmp_path / "alone"
    _ok(_run(toy, both, EVAL_ONLY, "eval=none", f"+eval.datasets.first={{name: adi, path: {first}}}",
             f"+eval.datasets.second={{name: adi, path: {second}}}"))
    _ok(_run(toy, alone, EVAL_ONLY, "eval=none", f"+eval.datasets.second={{name: adi, path: {second}}}"))
    assert _run_file(both, "second") == _run_file(alone, "second")
    assert _run_file(both, "first") != _run_file(both, "second")
    assert len(list((both / "encoded").glob("adi-*/corpus"))) == 2  # one per content, not per folder name


@pytest.mark.process
def test_resume_under_a_changed_training_config_is_refused(toy, tmp_path):
    run = tmp_path / "run"
    _ok(_run(toy, run, steps=4))
    # an interrupted run: the checkpoint is there, nothing after it finished
    for done in ("metrics.json", ".done/train"):
        (run / done).unlink()
    refused = _run(toy, run, "train.lr=5e-3", "train.warmup_steps=2", steps=4)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "train.lr" in refused.stderr and "train.warmup_steps" in refused.stderr
    assert "force=true" in refused.stderr
    restarted = _ok(_run(toy, run, "train.lr=5e-3", "train.warmup_steps=2", "force=true", steps=4))
    assert json.loads((run / "train_state.json").read_text())["resumed"] is False
    assert "dropping checkpoint" in restarted.stderr


@pytest.mark.integration
def test_bm25_candidates_follow_corpus_queries_and_parameters(tmp_path):
    """candidates=bm25 reuses its index and run file only for the same corpus content, queries, k1 and b: a changed
    corpus (one folder name, rewritten), more training queries or another k1 get pools of their own."""
    from lsr_run.candidates import Bm25Candidates
    from lsr_run.data import load_folder

    folder, work = tmp_path / "data" / "toy", tmp_path / "candidates"
    _corpus(folder, 1)

    def pools(queries: int, where: Path = work, **params):
        ds = load_folder("toy", folder, "test")
        positives = {q: list(ds.qrels[q]) for q in sorted(ds.qrels)[:queries]}
        return Bm25Candidates(depth=5, **params).pools(ds, positives, where)

    few, more = pools(3), pools(6)
    assert len(few) == 3 and len(more) == 6  # more queries: searched, not read from the first run file
    assert all(more[q] == few[q] for q in few)
    assert pools(6) == more
    runs = set(work.glob("bm25-*.trec"))
    pools(6, k1=2.5)
    assert len(set(work.glob("bm25-*.trec")) - runs) == 1  # another k1: another run file
    _corpus(folder, 2)  # the same folder, another corpus
    rewritten = pools(6)
    assert rewritten == pools(6, tmp_path / "fresh") and rewritten != more
    assert len([p for p in work.glob("bm25-toy-*") if p.is_dir()]) == 2  # an index per corpus content


def test_teacher_cache_follows_the_file_content(tmp_path):
    from lsr_run.data import Corpus
    from lsr_run.teachers import FileTeacher

    corpus = Corpus.from_dicts({}, {"d1": "sparse retrieval", "d2": "dense retrieval"})
    queries = {"q1": "what is sparse retrieval"}
    pairs = {"q1": ["d1", "d2"]}
    scores = tmp_path / "scores.tsv"
    teacher = FileTeacher(path=str(scores), cache_dir=str(tmp_path / "cache"))
    scores.write_text("q1\td1\t3.0\nq1\td2\t1.0\n")
    assert teacher.score(queries, corpus, pairs, tmp_path / "run")["q1"] == {"d1": 3.0, "d2": 1.0}
    scores.write_text("q1\td1\t0.5\nq1\td2\t2.5\n")  # the file rewritten: new scores, not the cached ones
    assert teacher.score(queries, corpus, pairs, tmp_path / "run")["q1"] == {"d1": 0.5, "d2": 2.5}
    changed = Corpus.from_dicts({}, {"d1": "sparse retrieval", "d2": "dense retrieval with a changed text"})
    assert teacher.inputs_digest(queries, changed, pairs) != teacher.inputs_digest(queries, corpus, pairs)


@pytest.mark.process
def test_one_process_per_run_directory(toy, tmp_path):
    run = tmp_path / "run"
    long = ["train.collapse.check_every=1000"]  # the toy model's vectors go dense: no collapse stop here
    first = cli(toy_overrides(toy, steps=40) + long + [f"hydra.run.dir={run}"], {"LSR_DATA_DIR": str(toy["data"])},
                wait=False)
    deadline = time.time() + 300
    while time.time() < deadline and not ((run / ".lock").exists() and (run / ".lock").read_text().strip()):
        assert first.poll() is None, first.stderr.read()[-2000:]
        time.sleep(0.1)
    second = _run(toy, run, *long, steps=40)
    holder = (run / ".lock").read_text().strip()
    assert first.poll() is None, "the first run ended before the second one started: make it longer"
    assert second.returncode == 2
    assert f"in use by another lsr-run process (pid {holder})" in second.stderr and str(first.pid) == holder
    assert first.wait(timeout=900) == 0, first.stderr.read()[-2000:]
    assert json.loads((run / "train_state.json").read_text())["steps"] == 40
    log = (run / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log] == list(range(1, 41))  # one writer
