"""Exact sparse dot-product search without Java, for small corpora and to cross-check Lucene.

Scores the same quantised integer vectors as the Lucene impact index; ties are broken by document id
(ascending), as Anserini does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import sparse

from ..data import write_trec_run
from ..impacts import read_vectors
from ..run_dir import EncodedCorpus, atomic_path
from . import VectorBackend


@dataclass
class BruteForceBackend(VectorBackend):
    """Build = a CSR matrix of document impacts; search = one sparse matrix product per query batch."""

    batch_size: int = 256

    def build(self, vectors_dir: Path, index_dir: Path) -> dict:
        doc_ids, rows, cols, vals = [], [], [], []
        term_ids: dict[str, int] = {}
        for shard in EncodedCorpus(vectors_dir).shards():
            for doc_id, vec in read_vectors(shard):
                r = len(doc_ids)
                doc_ids.append(doc_id)
                for term, w in vec.items():
                    rows.append(r)
                    cols.append(term_ids.setdefault(term, len(term_ids)))
                    vals.append(w)
        matrix = sparse.csr_matrix((np.asarray(vals, dtype=np.int64), (rows, cols)),
                                   shape=(len(doc_ids), len(term_ids)))
        with atomic_path(index_dir) as tmp:
            tmp.mkdir(parents=True)
            sparse.save_npz(tmp / "docs.npz", matrix)
            (tmp / "doc_ids.json").write_text(json.dumps(doc_ids))
            (tmp / "terms.json").write_text(json.dumps(term_ids))
        return {"index": str(index_dir), "docs": len(doc_ids), "terms": len(term_ids)}

    def search(self, index_dir: Path, queries: dict[str, dict[str, int]], k: int, run_path: Path) -> None:
        index_dir = Path(index_dir)
        matrix = sparse.load_npz(index_dir / "docs.npz").tocsc()
        doc_ids = json.loads((index_dir / "doc_ids.json").read_text())
        term_ids = json.loads((index_dir / "terms.json").read_text())
        # ties broken by doc id ascending: rank by (-score, id) via a precomputed id order
        id_rank = np.empty(len(doc_ids), dtype=np.int64)
        id_rank[np.argsort(np.asarray(doc_ids, dtype=object), kind="stable")] = np.arange(len(doc_ids))
        run: dict[str, list[tuple[str, float]]] = {}
        qids = list(queries)
        for start in range(0, len(qids), self.batch_size):
            batch = qids[start:start + self.batch_size]
            rows, cols, vals = [], [], []
            for r, qid in enumerate(batch):
                for term, w in queries[qid].items():
                    if term in term_ids:
                        rows.append(r)
                        cols.append(term_ids[term])
                        vals.append(w)
            q = sparse.csr_matrix((np.asarray(vals, dtype=np.int64), (rows, cols)), shape=(len(batch), len(term_ids)))
            scores = (q @ matrix.T).toarray()
            for r, qid in enumerate(batch):
                s = scores[r]
                hit = np.nonzero(s > 0)[0]
                order = np.lexsort((id_rank[hit], -s[hit]))[:k]
                run[qid] = [(doc_ids[i], float(s[i])) for i in hit[order]]
        write_trec_run(run_path, run)
