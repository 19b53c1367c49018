"""Integration: real data (../shared/data), the real minilm_l6 weights, Lucene through the JVM, the CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lsr_run.data import load_dataset, read_trec_run
from lsr_run.encoding import EncodeSpec, encode_corpus, encode_queries, read_query_vectors

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def minilm():
    from lsr_run.models.backbone import BackboneSpec, load_backbone
    from lsr_run.models.splade import SpladeEncoder

    mlm, tok, settings = load_backbone(BackboneSpec())
    return SpladeEncoder(mlm, tok, settings).eval()


def test_lucene_impact_search_equals_brute_force(minilm, data_dir, tmp_path, monkeypatch):
    from lsr_run.backends.brute_force import BruteForceBackend
    from lsr_run.backends.lucene import LuceneImpactBackend

    ds = load_dataset("adi", "test")
    spec = EncodeSpec(batch_size=16, doc_max_length=128, bf16=False)
    stats = encode_corpus(minilm, ds.corpus, tmp_path / "vectors", spec, min_shards=2)  # 2 files, 2 threads
    assert stats["docs"] == 82 and stats["doc_terms"] > 10 and stats["shards"] == 2
    encode_queries(minilm, ds.judged_queries(), tmp_path / "queries.jsonl", spec)
    queries = read_query_vectors(tmp_path / "queries.jsonl")
    runs = {}
    backends = (("lucene", LuceneImpactBackend(threads=2)), ("anserini", LuceneImpactBackend(threads=2, indexer="anserini")),
                ("brute", BruteForceBackend()))
    from lsr_run.backends import impact_index

    monkeypatch.setattr(impact_index, "MB_PER_PROCESS", 1)  # a tiny corpus, still 2 indexing processes + merge
    for name, backend in backends:
        built = backend.build(tmp_path / "vectors", tmp_path / f"index-{name}")
        if name == "lucene":
            assert built["processes"] == 2
        backend.search(tmp_path / f"index-{name}", queries, 20, tmp_path / f"{name}.trec")
        runs[name] = read_trec_run(tmp_path / f"{name}.trec")
    assert set(runs["lucene"]) == set(runs["anserini"]) == set(runs["brute"]) == set(queries)
    for qid in queries:
        brute = sorted(runs["brute"][qid].items(), key=lambda x: (-x[1], x[0]))
        for name in ("lucene", "anserini"):  # the direct indexer and Anserini's IndexCollection
            assert sorted(runs[name][qid].items(), key=lambda x: (-x[1], x[0])) == brute, (name, qid)
            # ranks as written, not just sets: the run files list the same documents in the same order
            assert list(runs[name][qid].items()) == list(runs["brute"][qid].items()), (name, qid)


def test_bm25_scifact_matches_pyserini_regression(data_dir, tmp_path):
    from lsr_run.cli import CONF_DIR
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from lsr_run.pipeline import run

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="run", overrides=["experiment=bm25", "eval=scifact"])
    metrics = run(cfg, tmp_path / "bm25")
    assert metrics["scifact"]["ndcg@10"] == pytest.approx(0.6789, abs=5e-4)
    assert metrics["scifact"]["queries"] == 300


def _lsr_run(args, cwd):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-m", "lsr_run.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=1200)


def test_cli_short_real_run_then_reload_and_evaluate(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    common = ["eval=none", "+eval.datasets.adi={name: adi, split: test}", "train.doc_max_length=128",
              "encode.doc_max_length=128"]
    proc = _lsr_run(["backbone=minilm_l6", "data.train.max_queries=48", "train.max_steps=4", "train.batch_size=4",
                     "train.log_every=1", "train.save_every=2", "candidates.depth=20", "train.collapse.check_every=1", *common,
                     f"hydra.run.dir={run_dir}"], ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    adi = metrics["adi"]
    for key in ("ndcg@10", "mrr@10", "recall@100", "recall@1000", "query_terms", "doc_terms"):
        assert isinstance(adi[key], float), key
    assert 0.0 < adi["ndcg@10"] <= 1.0
    assert adi["doc_terms"] > adi["query_terms"] > 1
    assert set(metrics) == {"adi"}  # datasets only: how the run ended is in status.json
    assert json.loads((run_dir / "status.json").read_text()) == {"state": "done", "collapsed": False}
    for name in ("config.yaml", "meta.json", "model/lsr_run.json", "runs/adi.trec", "per_query/adi.json",
                 "train_log.jsonl", "head_scaling.json", "init_report.json", "plots/training.png"):
        assert (run_dir / name).exists(), name
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["seed"] == 42 and "torch" in meta["packages"]
    log = [json.loads(l) for l in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    # evaluate the saved model again without training, in a new run directory
    again = tmp_path / "again"
    proc = _lsr_run(["stages=[encode,index,search,evaluate]", f"model.path={run_dir / 'model'}", *common,
                     f"hydra.run.dir={again}"], ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics2 = json.loads((again / "metrics.json").read_text())
    assert metrics2["adi"]["ndcg@10"] == pytest.approx(adi["ndcg@10"], abs=1e-9)
    assert metrics2["adi"]["doc_terms"] == pytest.approx(adi["doc_terms"], abs=1e-9)
