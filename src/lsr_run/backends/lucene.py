"""Lucene through Anserini: impact indexes of quantised SPLADE vectors, and BM25 over title+text.

Queries are passed pre-encoded: each query becomes a whitespace-separated string in which every term appears
``impact`` times; with ``-impact -pretokenized`` Anserini scores sum_t q_t * d_t exactly (integers), which the
brute-force backend reproduces.

No query is dropped silently: Lucene's limit of 1,024 clauses (distinct terms) is raised to what the longest
query needs, and a query with terms that gets no result (an impact query, or any query whose search logged
an exception) is an error naming the dataset (the run file's name) and the query id.
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
from . import TextBackend, VectorBackend

log = logging.getLogger(__name__)


def _threads(threads: int) -> int:
    return threads if threads > 0 else max(1, os.cpu_count() or 1)


def _check_index(index_dir: Path) -> None:
    if not (Path(index_dir).is_dir() and any(Path(index_dir).glob("segments_*"))):
        raise LsrError(f"{index_dir}: not a Lucene index (no segments_* file); run the index stage first")


def _search(index_dir: Path, topics: dict[str, str], run_path: Path, k: int, threads: int, extra: list[str],
            max_terms: int, strict: bool) -> None:
    """Search ``topics`` (qid -> query line) into ``run_path``. Every query with terms must get a result when
    ``strict`` (impact search: query and documents share one vocabulary), and in any case when Anserini logged
    an exception."""
    _check_index(index_dir)
    log_file = run_path.parent / "anserini.log"
    topics_file = run_path.with_name(f".{run_path.stem}.topics.tsv.tmp-{os.getpid()}")
    with atomic_path(run_path) as tmp:
        try:
            with open(topics_file, "w", encoding="utf-8") as f:
                for qid, line in topics.items():
                    f.write(f"{qid}\t{line}\n")
            output = run_anserini("search.SearchCollection",
                                  ["-index", str(index_dir), "-topics", str(topics_file), "-topicReader", "TsvString",
                                   "-output", str(tmp), "-hits", str(k), "-threads", str(_threads(threads)), *extra],
                                  log_file=log_file, max_clauses=max_terms + 16)  # 16: room for wrapping queries
        finally:
            topics_file.unlink(missing_ok=True)
        if not tmp.exists():  # Anserini exits 0 without a run file on some bad inputs
            raise LsrError(f"Anserini wrote no run file for {run_path.stem} on {index_dir}")
        _check_hits(tmp, topics, index_dir, run_path, output, strict, log_file)


def _check_hits(tmp: Path, topics: dict[str, str], index_dir: Path, run_path: Path, output: str, strict: bool,
                log_file: Path) -> None:
    with open(tmp, encoding="utf-8") as f:
        answered = {line.split(None, 1)[0] for line in f if line.strip()}
    empty = [q for q, line in topics.items() if line.strip() and q not in answered]
    if not empty:
        return
    errors = [line.strip() for line in output.splitlines() if "Exception" in line or "TooManyClauses" in line]
    if strict or errors:
        why = f"Anserini reported: {errors[0][:200]}" if errors else "Lucene returned nothing"
        raise LsrError(f"search of {run_path.stem}: query {empty[0]} has terms but got no result from {index_dir} "
                       f"({len(empty)} such queries; {why}; see {log_file})")
    log.warning("search of %s: %d queries got no result (no indexed term), e.g. %s", run_path.stem, len(empty),
                empty[0])


def _sanitize(text: str) -> str:
    return " ".join(text.split())


@dataclass
class LuceneImpactBackend(VectorBackend):
    """Lucene impact index over JsonVectorCollection shards, searched with Anserini's impact searcher.

    ``indexer``: ``direct`` writes each term once with its impact as term frequency (``impact_index``; one
    process per indexing thread, merged); ``anserini`` runs ``IndexCollection -impact -pretokenized``, which
    repeats every term ``impact`` times. Both give the same postings and the same ranked lists.
    """

    threads: int = 0
    heap: str = "4g"
    indexer: str = "direct"  # direct | anserini

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
        topics = {qid: " ".join(" ".join([term] * w) for term, w in vec.items() if w > 0)
                  for qid, vec in queries.items()}
        max_terms = max((sum(1 for w in v.values() if w > 0) for v in queries.values()), default=0)
        _search(index_dir, topics, run_path, k, self.threads, ["-impact", "-pretokenized"], max_terms, strict=True)


@dataclass
class LuceneBm25Backend(TextBackend):
    """BM25 over ``title + " " + text`` with Anserini's default English analyzer (Pyserini's BEIR "flat")."""

    k1: float = 0.9
    b: float = 0.4
    threads: int = 0
    heap: str = "4g"

    def build_from_corpus(self, corpus, index_dir: Path) -> dict:
        index_dir.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=index_dir.parent, prefix=".bm25-docs-") as docs_dir:
            with open(Path(docs_dir) / "docs.jsonl", "w", encoding="utf-8") as f:
                for ids, texts in corpus.batches():  # streamed from the memory-mapped table
                    for doc_id, text in zip(ids, texts):
                        f.write(json.dumps({"id": doc_id, "contents": text}) + "\n")
            with atomic_path(index_dir) as tmp:
                run_anserini("index.IndexCollection",
                             ["-collection", "JsonCollection", "-input", docs_dir, "-index", str(tmp),
                              "-generator", "DefaultLuceneDocumentGenerator", "-threads", str(_threads(self.threads)),
                              "-storePositions", "-storeDocvectors"],
                             heap=self.heap, log_file=index_dir.parent / f"{index_dir.name}.log")
        return {"index": str(index_dir)}

    def search_text(self, index_dir: Path, queries: dict[str, str], k: int, run_path: Path) -> None:
        topics = {qid: _sanitize(text) for qid, text in queries.items()}
        max_terms = max((len(set(t.lower().split())) for t in topics.values()), default=0)  # analysed: at most
        # a query of only stopwords or unseen words has no result legitimately: an error only with an exception
        _search(index_dir, topics, run_path, k, self.threads,
                ["-bm25", "-bm25.k1", str(self.k1), "-bm25.b", str(self.b)], max_terms, strict=False)

    def top(self, dataset, queries: dict[str, str], k: int, work_dir: Path) -> dict[str, dict[str, float]]:
        """BM25's top ``k`` of ``dataset``'s corpus for ``queries``, as {qid: {doc_id: score}}, through an index and
        a run file kept in ``work_dir``. Both are named by what made them (the index by the corpus' content; the
        run by the index, k1, b, k and every query's id and text), so a changed corpus, query set or parameter
        never reuses an old one, and the same request costs nothing the second time."""
        from ..data import read_trec_run
        from ..provenance import corpus_digest, digest

        work_dir = Path(work_dir)
        index = work_dir / f"bm25-{dataset.name}-{corpus_digest(dataset)}"
        if not index.exists():
            self.build_from_corpus(dataset.corpus, index)
        key = digest({"index": index.name, "k1": self.k1, "b": self.b, "k": k, "queries": sorted(queries.items())})
        run_path = work_dir / f"bm25-{dataset.name}-top{k}-{key}.trec"
        if not run_path.exists():
            self.search_text(index, queries, k, run_path)
        return read_trec_run(run_path)
