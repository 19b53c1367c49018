"""Candidate pools for training queries: BM25 top-N (Pyserini/Anserini), a TREC run file, or a teacher file.

A pool is a ranked list of document ids with the query's positives removed (positives are kept apart). Every
source takes ``random: N``: N more documents drawn uniformly from the whole corpus, appended after the ranked
ones (the pool of "Beyond Hard Negatives": a retriever's top 100 plus 100 random documents), so that the teacher's
scores over a pool span from near-positives to unrelated documents. The draw is a function of the query id and
``random_seed`` alone: every sampler, loss and training seed sees the same pool, and a teacher's cached scores
serve them all.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from .data import Dataset, known, run_table
from .errors import ConfigError, DataError

log = logging.getLogger(__name__)

Pools = dict[str, list[str]]


def _rank(run: dict[str, dict[str, float]], depth: int) -> Pools:
    return {q: sorted(docs, key=lambda d: (-docs[d], d))[:depth] for q, docs in run.items()}


def _rank_table(table, queries, depth: int) -> Pools:
    """``_rank`` of the training queries only, each read from a memory-mapped table (``ScoreTable``)."""
    return _rank({q: table.scores(q) for q in queries}, depth)


def _finish(pools: Pools, positives: dict[str, list[str]], corpus, source: str) -> Pools:
    """Pools of the training queries without their positives and without ids the corpus lacks."""
    in_corpus = known(corpus, list({d for q in positives for d in pools.get(q, [])}))
    out = {}
    for qid, pos in positives.items():
        pool = [d for d in pools.get(qid, []) if d not in pos and d in in_corpus]
        if pool:
            out[qid] = pool
    if not out:
        raise DataError(f"candidates from {source}: no training query has a non-positive candidate")
    dropped = len(positives) - len(out)
    if dropped:
        log.warning("candidates from %s: %d training queries have no candidate and are skipped", source, dropped)
    return out


def add_random(pools: Pools, positives: dict[str, list[str]], corpus, n: int, seed: int = 0) -> Pools:
    """Each pool followed by ``n`` documents drawn uniformly, without replacement, from the whole corpus (none
    of the query's positives, none already in its pool); drawn from ``item_rng(seed, 0, query id)``."""
    if n <= 0:
        return pools
    from .sampling import item_rng

    import pyarrow as pa

    ids = corpus.table.column("id")
    size = len(ids)
    out = {}
    for qid, pool in pools.items():
        taken = set(pool) | set(positives.get(qid, ()))
        rng = item_rng(seed, 0, f"random-candidates:{qid}")
        # n + |taken| distinct rows always hold n new documents (or every new one the corpus has)
        rows = rng.choice(size, size=min(size, n + len(taken)), replace=False)
        extra = [doc for doc in ids.take(pa.array(rows, pa.int64())).to_pylist() if doc not in taken]
        out[qid] = pool + extra[:n]
    return out


@dataclass
class CandidateSource:
    """What every source shares: ``random`` documents from the whole corpus appended to each ranked pool."""

    depth: int = 100
    random: int = 0
    random_seed: int = 0

    def __post_init__(self) -> None:
        if self.depth < 1:
            raise ConfigError(f"candidates.depth={self.depth}: must be >= 1")
        if self.random < 0:
            raise ConfigError(f"candidates.random={self.random}: must be >= 0")

    @property
    def size(self) -> int:
        """The most candidates a query's pool can hold."""
        return self.depth + self.random

    def finish(self, pools: Pools, positives: dict[str, list[str]], corpus, source: str) -> Pools:
        return add_random(_finish(pools, positives, corpus, source), positives, corpus, self.random, self.random_seed)


@dataclass
class Bm25Candidates(CandidateSource):
    k1: float = 0.9
    b: float = 0.4

    def pools(self, dataset: Dataset, positives: dict[str, list[str]], work_dir: Path) -> Pools:
        from .backends.lucene import LuceneBm25Backend

        # extra depth so that removing positives still leaves `depth` candidates
        extra = max(len(p) for p in positives.values())
        run = LuceneBm25Backend(k1=self.k1, b=self.b).top(dataset, {q: dataset.queries[q] for q in positives},
                                                          self.depth + extra, Path(work_dir))
        pools = {q: [d for d in ranked if d not in positives[q]][: self.depth]
                 for q, ranked in _rank(run, self.depth + 1000).items()}
        return self.finish(pools, positives, dataset.corpus, "BM25")


@dataclass
class RunFileCandidates(CandidateSource):
    path: str = ""

    def pools(self, dataset: Dataset, positives: dict[str, list[str]], work_dir: Path) -> Pools:
        if not self.path or not Path(self.path).exists():
            raise ConfigError(f"candidates.path={self.path!r}: TREC run file not found")
        return self.finish(_rank_table(run_table(Path(self.path)), positives, self.depth), positives,
                           dataset.corpus, self.path)


@dataclass
class TeacherFileCandidates(CandidateSource):
    """Candidates present in a teacher file (score pickle/TSV, or msmarco-hard-negatives.jsonl)."""

    path: str = ""
    format: str = "auto"
    systems: list | None = None

    def pools(self, dataset: Dataset, positives: dict[str, list[str]], work_dir: Path) -> Pools:
        from .teachers import read_hard_negatives, score_table

        if "hard-negatives" in str(self.path) or self.format == "hard_negatives":
            _, pools = read_hard_negatives(Path(self.path), self.systems)
            pools = {q: p[: self.depth] for q, p in pools.items()}
        else:
            pools = _rank_table(score_table(Path(self.path), self.format), positives, self.depth)
        return self.finish(pools, positives, dataset.corpus, self.path)
