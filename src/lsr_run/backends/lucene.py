"""Lucene through Anserini: impact indexes of quantised SPLADE vectors, and BM25 over title+text.

Queries are passed pre-encoded: each query becomes a whitespace-separated string in which every term appears
``impact`` times; with ``-impact -pretokenized`` Anserini scores sum_t q_t * d_t exactly (integers), which the
brute-force backend reproduces.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import LsrError
from ..java import run_anserini
from ..run_dir import atomic_path

log = logging.getLogger(__name__)


def _threads(threads: int) -> int:
    return threads if threads > 0 else max(1, os.cpu_count() or 1)


def _check_index(index_dir: Path) -> None:
    if not (Path(index_dir).is_dir() and any(Path(index_dir).glob("segments_*"))):
        raise LsrError(f"{index_dir}: not a Lucene index (no segments_* file); run the index stage first")


def _search(index_dir: Path, topics: Path, run_path: Path, k: int, threads: int, extra: list[str]) -> None:
    _check_index(index_dir)
    with atomic_path(run_path) as tmp:
        run_anserini("search.SearchCollection",
                     ["-index", str(index_dir), "-topics", str(topics), "-topicReader", "TsvString",
                      "-output", str(tmp), "-hits", str(k), "-threads", str(_threads(threads)), *extra],
                     log_file=run_path.parent / "anserini.log")
        if not tmp.exists():  # Anserini exits 0 without a run file on some bad inputs
            raise LsrError(f"Anserini wrote no run file for {topics} on {index_dir}")


def _sanitize(text: str) -> str:
    return " ".join(text.split())


@dataclass
class LuceneImpactBackend:
    """Lucene impact index over JsonVectorCollection shards, searched with Anserini's impact searcher.

    ``indexer``: ``direct`` writes each term once with its impact as term frequency (``impact_index``; one
    process per indexing thread, merged); ``anserini`` runs ``IndexCollection -impact -pretokenized``, which
    repeats every term ``impact`` times. Both give the same postings and the same ranked lists.
    """

    threads: int = 0
    heap: str = "4g"
    indexer: str = "direct"  # direct | anserini
    needs_vectors: bool = True

    def __post_init__(self):
        if self.indexer not in ("direct", "anserini"):
            raise LsrError(f"index.indexer={self.indexer!r}: expected 'direct' or 'anserini'")

    @property
    def indexing_threads(self) -> int:
        """Indexing runs one thread (anserini) or process (direct) per group of input files: the encode stage
        writes at least this many shards."""
        return _threads(self.threads)

    def build(self, vectors_dir: Path, index_dir: Path) -> dict:
        if self.indexer == "direct":
            from .impact_index import build_impact_index

            with atomic_path(index_dir) as tmp:
                return build_impact_index(Path(vectors_dir), tmp, self.indexing_threads, self.heap,
                                          index_dir.parent / f"{index_dir.name}.log")
        with atomic_path(index_dir) as tmp:
            run_anserini("index.IndexCollection",
                         ["-collection", "JsonVectorCollection", "-input", str(vectors_dir), "-index", str(tmp),
                          "-generator", "DefaultLuceneDocumentGenerator", "-impact", "-pretokenized",
                          "-threads", str(_threads(self.threads))],
                         heap=self.heap, log_file=index_dir.parent / f"{index_dir.name}.log")
        return {"index": str(index_dir)}

    def search(self, index_dir: Path, queries: dict[str, dict[str, int]], k: int, run_path: Path) -> None:
        topics = run_path.with_suffix(".topics.tsv")
        topics.parent.mkdir(parents=True, exist_ok=True)
        with open(topics, "w", encoding="utf-8") as f:
            for qid, vec in queries.items():
                terms = " ".join(" ".join([term] * w) for term, w in vec.items())
                f.write(f"{qid}\t{terms}\n")
        _search(index_dir, topics, run_path, k, self.threads, ["-impact", "-pretokenized"])
        topics.unlink()


@dataclass
class LuceneBm25Backend:
    """BM25 over ``title + " " + text`` with Anserini's default English analyzer (Pyserini's BEIR "flat")."""

    k1: float = 0.9
    b: float = 0.4
    threads: int = 0
    heap: str = "4g"
    needs_vectors: bool = False

    def build_from_corpus(self, corpus, index_dir: Path) -> dict:
        index_dir.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=index_dir.parent, prefix=".bm25-docs-") as docs_dir:
            with open(Path(docs_dir) / "docs.jsonl", "w", encoding="utf-8") as f:
                for doc_id in corpus.ids():
                    f.write(json.dumps({"id": doc_id, "contents": corpus.text(doc_id)}) + "\n")
            with atomic_path(index_dir) as tmp:
                run_anserini("index.IndexCollection",
                             ["-collection", "JsonCollection", "-input", docs_dir, "-index", str(tmp),
                              "-generator", "DefaultLuceneDocumentGenerator", "-threads", str(_threads(self.threads)),
                              "-storePositions", "-storeDocvectors"],
                             heap=self.heap, log_file=index_dir.parent / f"{index_dir.name}.log")
        return {"index": str(index_dir)}

    def search_text(self, index_dir: Path, queries: dict[str, str], k: int, run_path: Path) -> None:
        topics = run_path.with_suffix(".topics.tsv")
        topics.parent.mkdir(parents=True, exist_ok=True)
        with open(topics, "w", encoding="utf-8") as f:
            for qid, text in queries.items():
                f.write(f"{qid}\t{_sanitize(text)}\n")
        _search(index_dir, topics, run_path, k, self.threads,
                ["-bm25", "-bm25.k1", str(self.k1), "-bm25.b", str(self.b)])
        topics.unlink()
