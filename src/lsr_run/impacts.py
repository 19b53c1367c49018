"""Quantised impacts: the one place that decides how float SPLADE weights become Lucene integers.

Anserini truncates float impact weights to integers and silently drops terms that end up at zero, so weights
are quantised here: ``round(w * QUANTIZATION_SCALE)``, zeros dropped. Both the Lucene and the brute-force
backends score the same integer vectors, so their results can be compared exactly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

if TYPE_CHECKING:  # torch only where tensors are converted: the indexing processes read shards without it
    import torch

QUANTIZATION_SCALE = 100

SparseVector = dict[str, int]


def term_vocabulary(tokenizer) -> list[str]:
    """Token id -> the term string written to Lucene (the token itself; ``[tok<id>]`` if it has whitespace or
    control characters)."""
    size = len(tokenizer)
    tokens = tokenizer.convert_ids_to_tokens(list(range(size)))
    seen: set[str] = set()
    terms = []
    for i, tok in enumerate(tokens):
        term = tok if tok and not any(c.isspace() or not c.isprintable() for c in tok) else f"[tok{i}]"
        if term in seen:
            term = f"[tok{i}]"
        seen.add(term)
        terms.append(term)
    return terms


def quantize(weights: torch.Tensor, scale: int = QUANTIZATION_SCALE) -> torch.Tensor:
    """(B, V) float weights -> (B, V) int32 impacts = round(w * scale)."""
    import torch

    return torch.round(weights.float() * scale).to(torch.int32)


def to_sparse(impacts: torch.Tensor, terms: list[str]) -> list[SparseVector]:
    """(B, V) int impacts -> one {term: impact} dict per row, zeros dropped, terms by decreasing impact."""
    import torch

    impacts = impacts.cpu()
    rows, cols = torch.nonzero(impacts > 0, as_tuple=True)
    values = impacts[rows, cols].long()
    # one sort for the whole batch: by row, then by decreasing impact (stable: ties keep vocabulary order)
    order = torch.argsort(rows.long() * (int(values.max()) + 1 if len(values) else 1) - values, stable=True)
    counts = torch.bincount(rows, minlength=impacts.shape[0]).tolist()
    cols, values = cols[order].tolist(), values[order].tolist()
    out, start = [], 0
    for n in counts:
        out.append({terms[c]: v for c, v in zip(cols[start:start + n], values[start:start + n])})
        start += n
    return out


def top_k(vec: SparseVector, k: int | None) -> SparseVector:
    """The ``k`` highest impacts of a vector (static pruning; ``None``: all). Ties keep the vector's own order,
    which for vectors written by ``to_sparse`` is vocabulary order, so pruning is deterministic."""
    if k is None or len(vec) <= k:
        return vec
    return dict(sorted(vec.items(), key=lambda kv: -kv[1])[:k])


def vector_line(doc_id: str, vec: SparseVector, id_key: str = "id") -> str:
    return json.dumps({id_key: doc_id, "contents": "", "vector": vec}, ensure_ascii=False) + "\n"


def write_vectors(path: Path, rows: Iterable[tuple[str, SparseVector]], id_key: str = "id") -> int:
    """JSONL in Anserini's JsonVectorCollection layout: {"id", "contents", "vector"}."""
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for doc_id, vec in rows:
            f.write(vector_line(doc_id, vec, id_key))
            n += 1
    return n


def read_vectors(path: Path, id_key: str = "id") -> Iterator[tuple[str, SparseVector]]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            obj = json.loads(line)
            yield str(obj[id_key]), obj["vector"]
