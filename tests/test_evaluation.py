"""ranx numbers equal trec_eval's conventions (checked with pytrec_eval) on the same runs."""

import random

import pytest
import pytrec_eval

from lsr_run.evaluation import evaluate_run, remove_self_hits


def _fixture(seed=0):
    rng = random.Random(seed)
    docs = [f"d{i}" for i in range(60)]
    qrels, run = {}, {}
    for q in range(25):
        qid = f"q{q}"
        qrels[qid] = {d: rng.choice([0, 1, 1, 2, 3]) for d in rng.sample(docs, 8)}
        if q % 7 == 3:
            continue  # judged query with no results at all
        ranked = rng.sample(docs, 40)
        run[qid] = {d: 100.0 - i + rng.random() * 0.1 for i, d in enumerate(ranked)}
    run["unjudged"] = {"d1": 1.0}
    return qrels, run


def _trec(qrels, run, measures, relevance_level=1):
    ev = pytrec_eval.RelevanceEvaluator(qrels, measures, relevance_level=relevance_level)
    res = ev.evaluate(run)
    return res


def test_ndcg_recall_mrr_match_trec_eval_including_empty_queries():
    qrels, run = _fixture()
    ours, per_query = evaluate_run(qrels, run, ["ndcg@10", "recall@100", "mrr@10"])
    trec = _trec(qrels, run, {"ndcg_cut.10", "recall.100", "recip_rank"})
    n = len(qrels)  # trec_eval -c: every judged query counts, missing ones as zero
    assert ours["ndcg@10"] == pytest.approx(sum(r["ndcg_cut_10"] for r in trec.values()) / n, abs=1e-6)
    assert ours["recall@100"] == pytest.approx(sum(r["recall_100"] for r in trec.values()) / n, abs=1e-6)
    assert set(per_query) == set(qrels)
    assert per_query["q3"]["ndcg@10"] == 0.0
    # MRR@10: reciprocal rank of the first relevant within the top 10
    for qid, docs in run.items():
        if qid not in qrels:
            continue
        top = sorted(docs, key=lambda d: -docs[d])[:10]
        rr = next((1 / (i + 1) for i, d in enumerate(top) if qrels[qid].get(d, 0) > 0), 0.0)
        assert per_query[qid]["mrr@10"] == pytest.approx(rr)


def test_map_l2_matches_trec_eval_l2():
    qrels, run = _fixture(1)
    ours, _ = evaluate_run(qrels, run, ["map-l2", "recall@1000-l2"])
    trec = _trec(qrels, run, {"map", "recall.1000"}, relevance_level=2)
    judged_l2 = [q for q in qrels if any(r >= 2 for r in qrels[q].values())]
    # trec_eval -l 2 scores a query with no grade>=2 judgement as 0 (it has no relevant documents)
    expected_map = sum(trec[q]["map"] for q in trec if q in judged_l2) / len(qrels)
    assert ours["map-l2"] == pytest.approx(expected_map, abs=1e-6)
    expected_r = sum(trec[q]["recall_1000"] for q in trec if q in judged_l2) / len(qrels)
    assert ours["recall@1000-l2"] == pytest.approx(expected_r, abs=1e-6)


def test_tied_scores_are_ranked_as_trec_eval_ranks_them():
    # sparse dot products tie often: here every query's 40 results share 3 scores
    qrels, run = _fixture(2)
    tied = {q: {d: float(round(s) % 3) for d, s in docs.items()} for q, docs in run.items()}
    measures = {"ndcg_cut.10", "map", "recip_rank"}
    _, per_query = evaluate_run(qrels, tied, ["ndcg@10", "map", "mrr"])
    trec = _trec(qrels, tied, measures)
    for qid, r in trec.items():
        assert per_query[qid]["ndcg@10"] == pytest.approx(r["ndcg_cut_10"], abs=1e-9)
        assert per_query[qid]["map"] == pytest.approx(r["map"], abs=1e-9)
        assert per_query[qid]["mrr"] == pytest.approx(r["recip_rank"], abs=1e-9)
    # the smallest case: two documents tied, the one with the larger id is ranked first
    assert evaluate_run({"q": {"b": 1}}, {"q": {"a": 1.0, "b": 1.0}}, ["mrr"])[0]["mrr"] == 1.0
    assert evaluate_run({"q": {"a": 1}}, {"q": {"a": 1.0, "b": 1.0}}, ["mrr"])[0]["mrr"] == 0.5


def test_queries_are_matched_by_id_whatever_their_order():
    qrels, run = _fixture(3)
    reordered = dict(reversed(list(run.items())))
    assert evaluate_run(qrels, reordered, ["ndcg@10"])[1] == evaluate_run(qrels, run, ["ndcg@10"])[1]
    trec = _trec(qrels, reordered, {"ndcg_cut.10"})
    _, per_query = evaluate_run(qrels, reordered, ["ndcg@10"])
    assert all(per_query[q]["ndcg@10"] == pytest.approx(r["ndcg_cut_10"], abs=1e-9) for q, r in trec.items())


def test_self_hits_removed():
    assert remove_self_hits({"a": {"a": 3.0, "b": 1.0}}) == {"a": {"b": 1.0}}
