"""Do the documents a run retrieves carry more terms than the ones it should retrieve?

A sparse dot product adds one product per shared term, so a document with many low-weight expansion terms can
climb the ranking on many small matches (long queries make it worse): a length bias that BM25 normalises away.
For each dataset of a finished vector run this measures the mean number of terms of the encoded documents over
the whole corpus, over the judged relevant documents and over the run's top ``depth`` results of the judged
queries. Terms are counted in the run's encodings (``encoded/<corpus>/corpus``: every term, also for a run that
indexed pruned vectors), so runs of one model with and without pruning are measured on the same counts.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from .collect import QrelsCache
from .data import read_trec_run
from .encoding import EMPTY_DOC_TERM
from .errors import LsrError
from .evaluation import trec_ranking
from .impacts import read_vectors
from .run_dir import EncodedCorpus, RunDir, read_json


def corpus_terms(folder: Path) -> dict[str, int]:
    """{doc id: number of terms} of an encoded corpus (a blank document's filler term counts 0)."""
    return {doc_id: 0 if EMPTY_DOC_TERM in vec else len(vec)
            for shard in EncodedCorpus(folder).shards() for doc_id, vec in read_vectors(shard)}


def term_bias(path: Path, depth: int = 10) -> dict[str, dict]:
    """{dataset: {docs, corpus_terms, relevant_terms, retrieved_terms, retrieved_over_relevant}} of the finished
    vector run in ``path``: mean terms per document over the corpus, the relevant documents of the judged queries
    (each judgement once) and the run's top ``depth`` of those queries (each result once)."""
    run = RunDir(Path(path))
    if not run.config.exists() or not run.metrics.exists():
        raise LsrError(f"{run.root}: not a finished run directory (config.yaml and metrics.json are needed)")
    config = yaml.safe_load(run.config.read_text()) or {}
    specs = (config.get("eval") or {}).get("datasets") or {}
    data_dir = (config.get("paths") or {}).get("data_dir")
    from .stages import corpus_id

    corpora: dict[Path, dict[str, int]] = {}
    cache = QrelsCache()
    out: dict[str, dict] = {}
    for dataset, entry in read_json(run.metrics).items():
        if not isinstance(entry, dict) or not entry.get("scored", True) or not run.run_file(dataset).exists():
            continue
        if dataset not in specs:
            raise LsrError(f"{run.config}: eval.datasets.{dataset} is missing (needed for its judgements)")
        ds = cache.dataset(dataset, specs[dataset], data_dir)
        folder = run.encoded_corpus(corpus_id(ds))
        if not EncodedCorpus(folder).stats.exists():
            raise LsrError(f"{folder}: no finished encoding of {dataset}'s corpus (a vector run keeps it there)")
        if folder not in corpora:
            corpora[folder] = corpus_terms(folder)
        terms, qrels = corpora[folder], ds.qrels
        ranking = read_trec_run(run.run_file(dataset))
        top = [doc for q in qrels for doc, _ in trec_ranking(ranking.get(q, {}))[:depth]]
        relevant = [doc for q in qrels for doc, grade in qrels[q].items() if grade > 0]
        missing = [doc for doc in top if doc not in terms]
        if missing:
            raise LsrError(f"{run.run_file(dataset)}: ranks {missing[0]!r}, which {folder} does not hold")
        relevant = [doc for doc in relevant if doc in terms]  # judgements may name documents not in the corpus
        means = {name: sum(terms[d] for d in docs) / max(1, len(docs))
                 for name, docs in (("corpus_terms", terms), ("relevant_terms", relevant), ("retrieved_terms", top))}
        out[dataset] = {"docs": len(terms), **means, "depth": depth,
                        "retrieved_over_relevant": means["retrieved_terms"] / max(1e-9, means["relevant_terms"])}
    return out


def markdown(results: dict[str, dict[str, dict]]) -> str:
    """One row per run and dataset: mean terms per document (corpus, relevant, retrieved) and the ratio."""
    lines = ["| run | dataset | corpus | relevant | retrieved | retrieved / relevant |", "|---|---|---:|---:|---:|---:|"]
    for name, datasets in results.items():
        for dataset, r in datasets.items():
            lines.append(f"| {name} | {dataset} | {r['corpus_terms']:.0f} | {r['relevant_terms']:.0f} | "
                         f"{r['retrieved_terms']:.0f} | {r['retrieved_over_relevant']:.2f} |")
    return "\n".join(lines)
