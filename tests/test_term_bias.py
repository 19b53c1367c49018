"""scripts/term_bias.py: mean terms per document over the corpus, the relevant documents and a run's top results,
counted in the run's own encodings, on a run directory written by hand (every figure known by construction)."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import write_beir
from lsr_run.collect import QrelsCache
from lsr_run.encoding import EMPTY_DOC_TERM
from lsr_run.errors import LsrError
from lsr_run.impacts import write_vectors
from lsr_run.run_dir import EncodedCorpus, RunDir, write_json
from lsr_run.stages import corpus_id
from lsr_run.term_bias import markdown, term_bias


def _run(tmp_path, ranking: str):
    docs = {f"d{i}": ("", f"text {i}") for i in range(4)}
    data = write_beir(tmp_path / "data" / "toy", docs, {"q0": "a", "q1": "b", "q9": "c"},
                      {"q0": {"d0": 1}, "q1": {"d1": 2, "d3": 0}})
    spec = {"name": "toy", "split": "test", "path": str(data)}
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    run.config.write_text(yaml.safe_dump({"eval": {"datasets": {"toy": spec}}, "paths": {"data_dir": None}}))
    write_json(run.metrics, {"toy": {"ndcg@10": 0.5}})
    folder = run.encoded_corpus(corpus_id(QrelsCache().dataset("toy", spec)))
    folder.mkdir(parents=True)
    vectors = {"d0": {"a": 5}, "d1": {"a": 3, "b": 1}, "d2": {"a": 1, "b": 1, "c": 1}, "d3": {EMPTY_DOC_TERM: 1}}
    write_vectors(EncodedCorpus(folder).shard(0, 0), vectors.items())
    write_json(EncodedCorpus(folder).stats, {"docs": 4})
    run.run_file("toy").parent.mkdir()
    run.run_file("toy").write_text(ranking)
    return run


def test_terms_of_the_corpus_the_relevant_and_the_retrieved_documents(tmp_path):
    # q0 ranks d2, d1, d0; q1 ties d2 and d3 (trec_eval puts the larger id first: d3) above d1; q9 is not judged
    run = _run(tmp_path, "q0 Q0 d2 1 3.0 r\nq0 Q0 d1 2 2.0 r\nq0 Q0 d0 3 1.0 r\n"
                         "q1 Q0 d2 1 5.0 r\nq1 Q0 d3 2 5.0 r\nq1 Q0 d1 3 1.0 r\nq9 Q0 d0 1 9.0 r\n")
    r = term_bias(run.root, depth=2)["toy"]
    assert r["docs"] == 4 and r["corpus_terms"] == pytest.approx((1 + 2 + 3 + 0) / 4)
    assert r["relevant_terms"] == pytest.approx((1 + 2) / 2)  # d0 and d1; d3 is judged 0
    assert r["retrieved_terms"] == pytest.approx((3 + 2 + 0 + 3) / 4)  # q0: d2, d1; q1: d3, d2
    assert r["retrieved_over_relevant"] == pytest.approx(2.0 / 1.5)
    assert "| toy | 2 | 2 | 2 | 1.33 |" in markdown({"x": {"toy": r}}).replace(" x ", "")


def test_a_run_ranking_a_document_its_encodings_lack_is_named(tmp_path):
    run = _run(tmp_path, "q0 Q0 d7 1 3.0 r\n")
    with pytest.raises(LsrError, match=r"toy.trec: ranks 'd7', which .*corpus does not hold"):
        term_bias(run.root)
    assert json.loads(run.metrics.read_text()) == {"toy": {"ndcg@10": 0.5}}  # the run is only read
