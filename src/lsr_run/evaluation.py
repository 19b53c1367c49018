"""Scoring runs with ranx, following trec_eval's conventions.

Metric names are ranx's everywhere (``ndcg@10``, ``mrr@10``, ``recall@1000``, ``map-l2``...). Only judged
queries are scored, a judged query the run has no result for counts as zero (``trec_eval -c``), and tied scores
are broken by document id, descending, as trec_eval breaks them. Self-hits
(a query's own id among its results, as in arguana and quora) can be removed before scoring.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_METRICS = ("ndcg@10", "mrr@10", "recall@100", "recall@1000")


def _ranx():
    os.environ.setdefault("NUMBA_CACHE_DIR", str(Path.home() / ".cache" / "lsr-run-numba"))
    import ranx

    return ranx


@contextlib.contextmanager
def numba_quiet():
    """Silence numba's cast warning that ranx's parallel sort raises when numba compiles it (once per cache)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="unsafe cast from uint64 to int64")
        yield


def remove_self_hits(run: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    return {q: {d: s for d, s in docs.items() if d != q} for q, docs in run.items()}


def trec_ranking(docs: dict[str, float]) -> list[tuple[str, float]]:
    """(doc, score) pairs in the order trec_eval ranks them: score descending, ties broken by document id
    descending."""
    return [(doc, score) for score, doc in sorted(zip(docs.values(), docs.keys()), reverse=True)]


def trec_order(docs: dict[str, float]) -> dict[str, float]:
    """The ranking trec_eval scores, returned as distinct descending values, so that no scorer can re-break the
    ties its own way (sparse dot products tie often: thousands of tied pairs in a scifact run)."""
    ranked = trec_ranking(docs)
    n = len(ranked)
    return {doc: float(n - i) for i, (doc, _) in enumerate(ranked)}


def evaluate_run(qrels: dict[str, dict[str, int]], run: dict[str, dict[str, float]],
                 metrics=DEFAULT_METRICS) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """-> (mean metrics, per-query metrics). Unjudged queries are ignored; judged queries without results
    score zero on every metric."""
    ranx = _ranx()
    metrics = list(metrics)
    judged = {q: {d: int(r) for d, r in docs.items()} for q, docs in qrels.items() if docs}
    if not judged:
        raise ValueError("no judged queries to evaluate")
    # ranx needs at least one result per query: a placeholder doc with score -inf is never relevant
    # (ids cannot collide with a real doc: it holds a NUL byte) and so contributes zero.
    filled = {}
    for qid in judged:
        docs = run.get(qid)
        filled[qid] = trec_order(docs) if docs else {"\x00none": -1e30}
    # Plain dicts, in the same query order, rather than ranx.Qrels/Run: those build numba typed dicts whose
    # code cannot be cached, ~5 s of compilation in every process that scores a run.
    # (A single metric is asked twice: ranx's per-query return for one metric looks it up under a stripped name.)
    with numba_quiet():
        per_query_raw = ranx.evaluate(judged, filled, metrics if len(metrics) > 1 else metrics * 2,
                                      return_mean=False)
    per_query = {qid: {m: float(per_query_raw[m][i]) for m in metrics} for i, qid in enumerate(judged)}
    means = {m: float(sum(v[m] for v in per_query.values()) / len(per_query)) for m in metrics}
    return means, per_query


def warm_up(metrics=DEFAULT_METRICS + ("map", "ndcg@100")) -> None:
    """Compile ranx's numba functions into NUMBA_CACHE_DIR (about 35-50 s once per environment; ``make
    install`` calls this so the first experiment does not pay for it)."""
    evaluate_run({"q1": {"d1": 1, "d2": 2}, "q2": {"d3": 1}}, {"q1": {"d1": 2.0, "d4": 1.0}, "q2": {}}, metrics)


if __name__ == "__main__":
    import time

    start = time.time()
    warm_up()
    print(f"ranx metrics compiled in {time.time() - start:.1f} s (cache: {os.environ['NUMBA_CACHE_DIR']})")
