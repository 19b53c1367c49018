"""Corpus and query encoding into quantised sparse vectors (Anserini JsonVectorCollection shards).

Documents are encoded in length-sorted batches and written in shards (at least one per Lucene indexing thread);
each shard is written under a temporary name and renamed, and the folder is only trusted once its ``.done``
marker exists. Blank documents get a filler term that no query contains, so they exist in the index but never
match.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .impacts import (QUANTIZATION_SCALE, SparseVector, prune_shard, quantize, term_vocabulary, to_sparse,
                      vector_line, write_vectors)
from .errors import ConfigError, LsrError
from .models import cpu_gemm
from .models.splade import SpladeEncoder, switch
from . import interrupt
from .run_dir import EncodedCorpus, atomic_path, write_error, write_json

log = logging.getLogger(__name__)

EMPTY_DOC_TERM = "[lsr-run:empty]"
ENCODE_CHUNK = 65_536  # documents read from the corpus table at a time (and sorted by length among themselves)


@dataclass
class EncodeSpec:
    batch_size: int = 32
    query_batch_size: int = 64
    doc_max_length: int = 256
    query_max_length: int = 64
    bf16: str = "auto"
    shard_size: int = 100_000  # docs per shard at most; 0: no limit (shards = indexing threads)
    max_tokens: int | None = None  # batches by a token budget (batch_size then caps the texts per batch)
    weights: str | None = None  # bf16: encode with the weights cast to bf16, rather than autocast over fp32
    cpu_gemm: str = "auto"  # fp32 CPU linear layers: auto | onednn | mkl (models/cpu_gemm.py), process-wide
    # static pruning: the k highest impacts of each document (index stage) and query (search stage); the encodings
    # keep every term, so changing k builds a new index or searches again, and never encodes again
    doc_top_k: int | None = None
    query_top_k: int | None = None

    def __post_init__(self) -> None:
        switch(self.bf16, False, "encode.bf16")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ConfigError(f"encode.max_tokens={self.max_tokens}: must be >= 1 (or null: batch_size texts)")
        cpu_gemm.check(self.cpu_gemm, "encode.cpu_gemm")
        for key in ("doc_top_k", "query_top_k"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"encode.{key}={value}: must be >= 1 (or null: every term)")
        if self.weights not in (None, "bf16"):
            raise ConfigError(f"encode.weights={self.weights}: allowed null (as loaded), bf16")


def encode_texts(encoder: SpladeEncoder, texts: list[str], max_length: int, batch_size: int, bf16,
                 desc: str | None, max_tokens: int | None = None) -> list[SparseVector]:
    terms = term_vocabulary(encoder.tokenizer)
    out: list[SparseVector | None] = [None] * len(texts)
    for positions, weights in encoder.encode(texts, max_length, batch_size, bf16, progress=desc,
                                             max_tokens=max_tokens):
        for pos, vec in zip(positions, to_sparse(quantize(weights, QUANTIZATION_SCALE), terms)):
            out[pos] = vec
    return out  # type: ignore[return-value]


class ShardWriter:
    """Writes encoded documents into ``n`` JSONL shards. Row j of the encode order goes to shard j mod n: shards
    hold similar amounts of postings, which keeps the indexing processes (one group of files each) evenly busy.
    Shards are written under temporary names and renamed by ``close``. Writing is in line with encoding: a
    writer thread beside the model's threads slowed encoding on 2 CPU cores from 22 to 13 docs/s (measured)."""

    def __init__(self, paths: list[Path], terms: list[str]):
        self.paths = paths
        self.terms = terms
        self.files = [open(p.with_name(p.name + ".tmp"), "w", encoding="utf-8") for p in paths]
        self.written = 0
        self.total_terms = 0

    def write(self, ids: list[str], blank: list[bool], impacts: torch.Tensor) -> None:
        for doc_id, is_blank, vec in zip(ids, blank, to_sparse(impacts, self.terms)):
            self.total_terms += 0 if is_blank else len(vec)
            if is_blank or not vec:
                vec = {EMPTY_DOC_TERM: 1}
            shard = self.written % len(self.files)
            try:
                self.files[shard].write(vector_line(doc_id, vec))
            except OSError as e:  # a full disk: one line naming the shard
                raise (write_error(e, self.paths[shard]) or e) from None
            self.written += 1

    def close(self, keep: bool = True) -> None:
        """Close the shards; rename them into place (``keep``) or delete them (a failed encoding)."""
        for f in self.files:
            try:
                f.close()
            except OSError as e:  # the last buffered write failed (full disk)
                if keep:
                    self.close(keep=False)
                    raise (write_error(e, f.name) or e) from None
        for p in self.paths:
            tmp = p.with_name(p.name + ".tmp")
            if keep:
                tmp.replace(p)
            else:
                tmp.unlink(missing_ok=True)


def shard_count(docs: int, shard_size: int, min_shards: int) -> int:
    """Enough shards for ``shard_size`` docs each (0: no limit), and at least ``min_shards`` (the indexing
    threads: Anserini indexes one file per thread), never more than one per document."""
    n = -(-docs // shard_size) if shard_size > 0 else 1
    return max(1, min(docs, max(n, min_shards)))


def encode_corpus(encoder: SpladeEncoder, corpus, out_dir: Path, spec: EncodeSpec, rank: int = 0,
                  world: int = 1, min_shards: int = 1, overlap: bool | None = None) -> dict:
    """Write ``out_dir/part-RRR-XXXXX.jsonl`` shards (this rank's contiguous share of the corpus) and return
    the share's stats; ``merge_stats`` combines the ranks' stats. ``min_shards`` is the number of files the
    whole corpus should at least be split into (the indexing threads); each rank writes its part of them.

    ``overlap`` (default: on with CUDA) keeps the host off the device's critical path: the next batch is
    tokenised in one thread and each batch's conversion to impacts and its shard lines are written in another,
    one batch behind the device, while it computes the next. The shards are the same byte for byte. On a CPU
    both threads would compete with the model's own (22 against 13 docs/s on 2 cores, measured)."""
    start = time.time()
    out_dir.mkdir(parents=True, exist_ok=True)
    per = -(-len(corpus) // world)
    lo, hi = rank * per, min(len(corpus), (rank + 1) * per)
    n_docs = max(0, hi - lo)
    n_shards = shard_count(n_docs, spec.shard_size, -(-min_shards // world))
    files = EncodedCorpus(out_dir)
    writer = ShardWriter([files.shard(rank, s) for s in range(n_shards)],
                         term_vocabulary(encoder.tokenizer))
    empty = 0
    overlap = encoder.device.type == "cuda" if overlap is None else overlap
    pool, pending = None, None
    if overlap:
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(1, thread_name_prefix="lsr-run-shards")
    try:  # texts stream from the memory-mapped table, ENCODE_CHUNK at a time (each chunk sorted by length)
        for ids, texts in corpus.batches(lo, hi, ENCODE_CHUNK):
            blank = [not t.strip() for t in texts]
            empty += sum(blank)
            for positions, weights in encoder.encode(texts, spec.doc_max_length, spec.batch_size, spec.bf16,
                                                     progress=f"encode {corpus.name}", prefetch=overlap,
                                                     max_tokens=spec.max_tokens):
                args = ([ids[i] for i in positions], [blank[i] for i in positions],
                        quantize(weights, QUANTIZATION_SCALE))
                if pool is None:
                    writer.write(*args)
                else:  # one batch in flight: its write errors surface here, in order
                    if pending is not None:
                        pending.result()
                    pending = pool.submit(writer.write, *args)
                interrupt.check()  # a signal whose exception was swallowed stops encoding here
        if pending is not None:
            pending.result()
    except BaseException:  # an error or a signal (interrupt.Interrupted): no .tmp shard is left behind
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        writer.close(keep=False)
        raise
    if pool is not None:
        pool.shutdown(wait=True)
    writer.close()
    seconds = time.time() - start
    stats = {"docs": n_docs, "doc_terms": writer.total_terms / max(1, n_docs), "empty_docs": int(empty),
             "shards": n_shards, "seconds": seconds, "docs_per_second": n_docs / max(1e-9, seconds)}
    write_json(files.rank_stats(rank), stats)
    return stats


def merge_stats(out_dir: Path) -> dict:
    """Combine every rank's stats into ``stats.json`` (the file later stages read)."""
    files = EncodedCorpus(out_dir)
    parts = [json.loads(p.read_text()) for p in files.all_rank_stats()]
    docs = sum(p["docs"] for p in parts)
    seconds = max(p["seconds"] for p in parts)
    stats = {"docs": docs, "doc_terms": sum(p["doc_terms"] * p["docs"] for p in parts) / max(1, docs),
             "empty_docs": sum(p["empty_docs"] for p in parts), "shards": sum(p.get("shards", 0) for p in parts),
             "seconds": seconds,
             "docs_per_second": docs / max(1e-9, seconds), "ranks": len(parts)}
    write_json(files.stats, stats)
    return stats


PRUNE_MB_PER_PROCESS = 128 * 2**20  # shards' bytes from which one more pruning process pays for its start


def prune_corpus(src: Path, dst: Path, k: int, processes: int = 1) -> dict:
    """Write every shard of the encoded corpus ``src`` into ``dst`` under the same name, each document cut to its
    ``k`` highest impacts (``impacts.top_k``); -> {"docs", "doc_terms"} of the pruned vectors (blank documents'
    filler term not counted, as in the encode stats). Large corpora are pruned by up to ``processes`` processes
    (``python -m lsr_run.impacts``, which never imports torch), one per 128 MB of shards."""
    dst.mkdir(parents=True, exist_ok=True)
    shards = EncodedCorpus(src).shards()
    size = sum(s.stat().st_size for s in shards)
    processes = max(1, min(processes, len(shards), size // PRUNE_MB_PER_PROCESS))
    if processes == 1:
        counts = [prune_shard(shard, dst / shard.name, k, EMPTY_DOC_TERM) for shard in shards]
    else:
        started: list[subprocess.Popen] = []
        try:
            for group in (shards[i::processes] for i in range(processes)):
                started.append(interrupt.popen(
                    [sys.executable, "-m", "lsr_run.impacts", str(k), EMPTY_DOC_TERM, str(dst), *map(str, group)],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
            outputs = [p.communicate() for p in started]
        finally:
            interrupt.stop(started)
        failed = [err.strip().splitlines()[-1:] for p, (_, err) in zip(started, outputs) if p.returncode]
        if failed:
            raise LsrError(f"pruning {src} to {k} terms a document failed: {failed[0]}")
        counts = [tuple(json.loads(line)) for out, _ in outputs for line in out.splitlines()]
    docs, terms = sum(c[0] for c in counts), sum(c[1] for c in counts)
    return {"docs": docs, "doc_terms": terms / max(1, docs)}


def encode_queries(encoder: SpladeEncoder, queries: dict[str, str], path: Path, spec: EncodeSpec) -> dict:
    qids = list(queries)
    vectors = encode_texts(encoder, [queries[q] for q in qids], spec.query_max_length, spec.query_batch_size,
                           spec.bf16, desc=None, max_tokens=spec.max_tokens)
    with atomic_path(path) as tmp:
        write_vectors(tmp, zip(qids, vectors), id_key="qid")
    return {"queries": len(qids), "query_terms": sum(len(v) for v in vectors) / max(1, len(qids))}


def read_query_vectors(path: Path) -> dict[str, SparseVector]:
    out = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            obj = json.loads(line)
            out[str(obj["qid"])] = obj["vector"]
    return out
