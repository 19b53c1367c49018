"""Retrieval backends: Lucene impact index, Lucene BM25, and an exact brute-force sparse dot product.

A backend is chosen by the ``index`` config group (``_target_``). What it indexes is its type, not a setting:

- a ``VectorBackend`` indexes encoded documents (``build(vectors_dir, index_dir)``: shards of quantised
  {term: int} vectors written by the encode stage) and searches encoded queries (``search``);
- a ``TextBackend`` indexes raw text (``build_from_corpus(corpus, index_dir)``) and searches query text
  (``search_text``); the encode stage does nothing for it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path


class VectorBackend(ABC):
    """Indexes and searches quantised sparse vectors."""

    @property
    def indexing_threads(self) -> int:
        """Indexing runs this many threads or processes, one per group of shards: the encode stage writes at
        least this many shards."""
        return 1

    @abstractmethod
    def build(self, vectors_dir: Path, index_dir: Path) -> dict:
        """Index every ``*.jsonl`` shard of ``vectors_dir`` into ``index_dir`` (atomically); a summary."""

    @abstractmethod
    def search(self, index_dir: Path, queries: dict[str, dict[str, int]], k: int, run_path: Path) -> None:
        """The top ``k`` documents of each query vector, as a TREC run at ``run_path``."""


class TextBackend(ABC):
    """Indexes and searches text."""

    @abstractmethod
    def build_from_corpus(self, corpus, index_dir: Path) -> dict:
        """Index every document of ``corpus`` (``batches()`` of ids and texts) into ``index_dir``; a summary."""

    @abstractmethod
    def search_text(self, index_dir: Path, queries: dict[str, str], k: int, run_path: Path) -> None:
        """The top ``k`` documents of each query text, as a TREC run at ``run_path``."""


Backend = VectorBackend | TextBackend

__all__ = ["Backend", "TextBackend", "VectorBackend"]
