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


def prune_shard(src: Path, dst: Path, k: int, filler: str) -> tuple[int, int]:
    """Copy the JSONL shard ``src`` to ``dst`` with each vector cut to its ``k`` highest impacts (``top_k``);
    -> (documents, terms kept), a vector holding the ``filler`` term (a blank document) counting no terms. Runs in
    worker processes that never import torch."""
    from .run_dir import write_error

    docs = terms = 0
    try:
        with open(dst, "w", encoding="utf-8") as f:
            for doc_id, vec in read_vectors(src):
                vec = top_k(vec, k)
                docs += 1
                terms += 0 if filler in vec else len(vec)
                f.write(vector_line(doc_id, vec))
    except OSError as e:  # a full disk: one line naming the file
        raise (write_error(e, dst) or e) from None
    return docs, terms


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


def main(argv: list[str] | None = None) -> None:
    """``python -m lsr_run.impacts K FILLER DST SHARD...``: prune each shard into DST (``prune_shard``), printing
    one JSON line [documents, terms] per shard (``encoding.prune_corpus``'s worker processes)."""
    import sys

    k, filler, dst, *shards = sys.argv[1:] if argv is None else argv
    for shard in map(Path, shards):
        print(json.dumps(prune_shard(shard, Path(dst) / shard.name, int(k), filler)), flush=True)


if __name__ == "__main__":
    main()
