"""Candidate pools for training queries: BM25 top-N (Pyserini/Anserini), a TREC run file, or a teacher file.

A pool is a ranked list of document ids with the query's positives removed (positives are kept apart).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from .data import Dataset, known, read_trec_run, run_table
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


@dataclass
class Bm25Candidates:
    depth: int = 100
    k1: float = 0.9
    b: float = 0.4

    def __post_init__(self) -> None:
        if self.depth < 1:
            raise ConfigError(f"candidates.depth={self.depth}: must be >= 1")

    def pools(self, dataset: Dataset, positives: dict[str, list[str]], work_dir: Path) -> Pools:
        from .backends.lucene import LuceneBm25Backend

        backend = LuceneBm25Backend(k1=self.k1, b=self.b)
        index = Path(work_dir) / f"bm25-{dataset.corpus_key}"
        if not index.exists():
            backend.build_from_corpus(dataset.corpus, index)
        run_path = Path(work_dir) / f"bm25-{dataset.name}-top{self.depth}.trec"
        if not run_path.exists():
            # extra depth so that removing positives still leaves `depth` candidates
            extra = max(len(p) for p in positives.values())
            backend.search_text(index, {q: dataset.queries[q] for q in positives}, self.depth + extra, run_path)
        pools = {q: [d for d in ranked if d not in positives[q]][: self.depth]
                 for q, ranked in _rank(read_trec_run(run_path), self.depth + 1000).items()}
        return _finish(pools, positives, dataset.corpus, "BM25")


@dataclass
class RunFileCandidates:
    path: str = ""
    depth: int = 100

    def pools(self, dataset: Dataset, positives: dict[str, list[str]], work_dir: Path) -> Pools:
        if not self.path or not Path(self.path).exists():
            raise ConfigError(f"candidates.path={self.path!r}: TREC run file not found")
        return _finish(_rank_table(run_table(Path(self.path)), positives, self.depth), positives,
                       dataset.corpus, self.path)


@dataclass
class TeacherFileCandidates:
    """Candidates present in a teacher file (score pickle/TSV, or msmarco-hard-negatives.jsonl)."""

    path: str = ""
    format: str = "auto"
    depth: int = 100
    systems: list | None = None

    def pools(self, dataset: Dataset, positives: dict[str, list[str]], work_dir: Path) -> Pools:
        from .teachers import read_hard_negatives, score_table

        if "hard-negatives" in str(self.path) or self.format == "hard_negatives":
            _, pools = read_hard_negatives(Path(self.path), self.systems)
            pools = {q: p[: self.depth] for q, p in pools.items()}
        else:
            pools = _rank_table(score_table(Path(self.path), self.format), positives, self.depth)
        return _finish(pools, positives, dataset.corpus, self.path)
