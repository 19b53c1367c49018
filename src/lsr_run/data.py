"""Datasets: BEIR-layout folders and ir_datasets ids -> corpus, queries, qrels (ids are strings everywhere).

A dataset is named in the config (``name``, ``split``, optional ``irds_id``). It resolves to the folder
``$LSR_DATA_DIR/<name>`` when that exists, else to its ir_datasets id. Loading validates as it reads: malformed
JSON is reported with file and line, duplicate ids, ids with whitespace (TREC files cannot hold them),
fractional relevance grades and non-UTF-8 bytes are errors, qrels naming unknown queries or documents are counted
(an error if none match), empty documents and queries are counted.

Documents and queries are converted once into memory-mapped Arrow tables (``lsr_run.store``): a corpus is a
``Corpus`` (a read-only mapping id -> text read from the mapped file), never a dict of every document.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping

from .errors import DataError, LsrError
from .store import TextTable, _slug, cache_root, convert_file, converted, write_text_table

log = logging.getLogger(__name__)


class Corpus(TextTable):
    """Documents by id on a memory-mapped Arrow table; ``text(doc_id)`` is ``title + " " + text`` as BEIR and
    Pyserini's flat indexes use. ``Corpus.from_dicts(titles, texts, name)`` builds a small one in memory."""


@dataclass
class Dataset:
    """One query set on one corpus, with its judgements for one split."""

    name: str
    corpus_key: str
    corpus: Corpus
    queries: Mapping[str, str]  # a TextTable (memory-mapped) or a dict
    qrels: dict[str, dict[str, int]]
    source: str = ""
    stats: dict = field(default_factory=dict)

    def judged_queries(self) -> dict[str, str]:
        return {q: t for q, t in self.queries.items() if q in self.qrels}


def data_dir() -> Path | None:
    value = os.environ.get("LSR_DATA_DIR")
    return Path(value).expanduser() if value else None


def resolve(name: str, irds_id: str | None = None, path: str | None = None) -> tuple[str, str]:
    """Return ("folder", path) or ("irds", id) for a dataset entry."""
    if path:
        if not Path(path).is_dir():
            raise DataError(f"dataset '{name}': path {path} is not a folder")
        return "folder", str(path)
    root = data_dir()
    if root is not None and (root / name).is_dir():
        return "folder", str(root / name)
    if irds_id:
        return "irds", irds_id
    where = f"{root}/{name}" if root else "$LSR_DATA_DIR (unset)"
    raise DataError(f"dataset '{name}': no folder {where} and no irds_id to download it by; "
                    f"set LSR_DATA_DIR to the folder holding '{name}/' or give the entry an irds_id")


# ---------------------------------------------------------------- BEIR folders

def iter_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; errors name the file and line.

    Lines are read as bytes and decoded one by one, so a bad byte is reported on its own line.
    """
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(obj, dict):
                    raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
                yield lineno, obj
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot be read ({e})") from None


_WHITESPACE = re.compile(r"\s")


def check_id(value: str, where: Path | str, lineno: int | None, what: str) -> str:
    """``value`` if it can be a TREC id (non-empty, no whitespace); else a DataError naming file and line."""
    if value and not _WHITESPACE.search(value):
        return value
    at = f"{where}:{lineno}" if lineno is not None else f"{where}"
    problem = "is empty" if not value else "contains whitespace"
    raise DataError(f"{at}: {what} id {value!r} {problem}; TREC run and qrels files cannot hold such an id "
                    f"(rename it in the data)")


def split_columns(line: str) -> list[str]:
    """Columns of a TSV line (split on tabs, so an id with a space stays one column and is caught by
    ``check_id``), or of a whitespace-separated line (TREC files) when it has no tab."""
    if "\t" in line:
        parts = [p.strip() for p in line.rstrip("\r\n").split("\t")]
        return parts if any(parts) else []
    return line.split()


def _id_of(obj: dict, path: Path, lineno: int, what: str = "document") -> str:
    for key in ("_id", "id", "docid", "doc_id", "qid", "query_id"):
        if key in obj and obj[key] is not None:
            return check_id(str(obj[key]), path, lineno, what)
    raise DataError(f"{path}:{lineno}: no '_id' field")


def _jsonl_rows(path: Path, what: str) -> Iterator[tuple[int, str, str, str]]:
    """``(line, id, title, text)`` of a BEIR corpus or queries file, validated line by line."""
    for lineno, obj in iter_jsonl(path):
        row_id = _id_of(obj, path, lineno, what)
        if what == "document":
            title, text = str(obj.get("title") or ""), str(obj.get("text") or obj.get("contents") or "")
        else:
            title, text = "", str(obj.get("text") or obj.get("query") or "")
        yield lineno, row_id, title, text


def convert_jsonl(path: Path, what: str, cache_dir: str | None = None) -> Path:
    """The Arrow conversion folder of a corpus (``what="document"``) or queries file, made on first use and
    remade when the file's content changes."""
    path = Path(path)

    def build(tmp: Path) -> dict:
        counts = write_text_table(tmp, _jsonl_rows(path, what), str(path), what)
        if what == "document" and not counts["rows"]:
            raise DataError(f"{path}: no documents")
        return counts

    return convert_file(path, "corpus" if what == "document" else "queries", build, cache_dir)


def load_corpus_file(path: Path, name: str = "", cache_dir: str | None = None) -> Corpus:
    """A BEIR ``corpus.jsonl(.gz)``, converted to Arrow once (``lsr_run.store``) and memory-mapped."""
    corpus = Corpus.open(convert_jsonl(path, "document", cache_dir), name=name)
    if corpus.empty:
        log.warning("%s: %d empty documents (indexed so they exist, they never match)", path, corpus.empty)
    return corpus


def load_queries_file(path: Path, cache_dir: str | None = None) -> tuple[TextTable, int]:
    queries = TextTable.open(convert_jsonl(path, "query", cache_dir), name=Path(path).parent.name)
    return queries, queries.empty


def load_qrels_file(path: Path) -> dict[str, dict[str, int]]:
    """TREC (``qid 0 docid rel``) or BEIR TSV (``query-id corpus-id score`` with a header).

    Grades are integers; a fractional grade (0.5) is an error rather than silently truncated."""
    qrels: dict[str, dict[str, int]] = {}
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                parts = split_columns(line)
                if not parts:
                    continue
                if lineno == 1 and not _is_number(parts[-1]):
                    continue  # header
                if len(parts) == 4:
                    qid, _, doc_id, rel = parts
                elif len(parts) == 3:
                    qid, doc_id, rel = parts
                else:
                    raise DataError(f"{path}:{lineno}: expected 3 (BEIR) or 4 (TREC) columns, got {len(parts)}")
                check_id(qid, path, lineno, "query")
                check_id(doc_id, path, lineno, "document")
                if not _is_number(rel):
                    raise DataError(f"{path}:{lineno}: relevance '{rel}' is not a number")
                grade = float(rel)
                if grade != int(grade):
                    raise DataError(f"{path}:{lineno}: relevance '{rel}' is not an integer grade; "
                                    f"round the grades in the file (lsr-run does not guess how)")
                qrels.setdefault(qid, {})[doc_id] = int(grade)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 ({e.reason})") from None
    return qrels


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _find(folder: Path, stem: str) -> Path:
    found = [c for c in (folder / f"{stem}.jsonl", folder / f"{stem}.jsonl.gz") if c.exists()]
    if len(found) == 2:
        raise DataError(f"{folder}: both {stem}.jsonl and {stem}.jsonl.gz exist and it is ambiguous which one is "
                        f"meant; remove or rename one")
    if found:
        return found[0]
    raise DataError(f"{folder}: missing {stem}.jsonl (or {stem}.jsonl.gz)")


def load_folder(name: str, folder: Path, split: str, cache_dir: str | None = None) -> Dataset:
    folder = Path(folder)
    corpus = load_corpus_file(_find(folder, "corpus"), name=folder.name, cache_dir=cache_dir)
    queries, empty_queries = load_queries_file(_find(folder, "queries"), cache_dir)
    qrels_path = folder / "qrels" / f"{split}.tsv"
    if not qrels_path.exists():
        have = sorted(p.stem for p in (folder / "qrels").glob("*.tsv")) if (folder / "qrels").is_dir() else []
        raise DataError(f"{qrels_path}: missing (splits present: {', '.join(have) or 'none'})")
    qrels = load_qrels_file(qrels_path)
    stats = check_qrels(qrels, queries, corpus, qrels_path)
    stats.update(empty_documents=corpus.empty, empty_queries=empty_queries)
    corpus_key = folder.name if folder.name not in ("", ".", "..") else folder.resolve().name  # a path component
    return Dataset(name=name, corpus_key=corpus_key, corpus=corpus, queries=queries, qrels=qrels,
                   source=str(folder), stats=stats)


def known(table: Mapping[str, str], keys: list[str]) -> set[str]:
    """The ``keys`` that ``table`` holds (one batched lookup on a TextTable)."""
    if not keys:
        return set()
    if isinstance(table, TextTable):
        return {k for k, hit in zip(keys, table.contains(keys)) if hit}
    return {k for k in keys if k in table}


def check_qrels(qrels: dict[str, dict[str, int]], queries: Mapping[str, str], corpus: Corpus,
                where: Path | str) -> dict:
    """Drop judgements naming unknown queries/documents (counted); an error if nothing is left."""
    known_q = known(queries, list(qrels))
    unknown_q = [q for q in qrels if q not in known_q]
    known_d = known(corpus, [d for docs in qrels.values() for d in docs])
    unknown_d = 0
    kept = 0
    for qid in list(qrels):
        if qid not in known_q:
            del qrels[qid]
            continue
        docs = qrels[qid]
        for doc_id in [d for d in docs if d not in known_d]:
            del docs[doc_id]
            unknown_d += 1
        kept += len(docs)
        if not docs:
            del qrels[qid]
    if unknown_q or unknown_d:
        log.warning("%s: %d judged queries not in queries file, %d judged documents not in corpus (dropped)",
                    where, len(unknown_q), unknown_d)
    if kept == 0:
        raise DataError(f"{where}: no judgement names a known query and document "
                        f"({len(unknown_q)} unknown queries, {unknown_d} unknown documents)")
    return {"qrels_unknown_queries": len(unknown_q), "qrels_unknown_docs": unknown_d, "qrels": kept}


# ---------------------------------------------------------------- ir_datasets

def _converted_rows(cache_dir: str | None, kind: str, key: dict, rows, where: str, what: str, name: str,
                   cls=TextTable) -> TextTable:
    """A table converted once from an iterator of ``(line, id, title, text)`` (ir_datasets, the Hub)."""
    from .provenance import digest

    slug = _slug(str(key.get("irds") or key.get("hf") or "data").replace("/", "__"))
    folder = cache_root(cache_dir) / f"{kind}-{slug}-{digest({'format': 1, 'kind': kind, **key})[:16]}"

    def build(tmp: Path) -> dict:
        counts = write_text_table(tmp, rows(), where, what)
        if not counts["rows"]:
            raise DataError(f"{where}: no {what}s")
        return {"source": where, **counts}

    return cls.open(converted(folder, build), name=name)


def load_irds(name: str, irds_id: str, cache_dir: str | None = None) -> Dataset:
    """Load through ir_datasets (downloads on first use; needs internet); documents and queries are converted to
    Arrow once, keyed by the ir_datasets id (whose files ir_datasets verifies by checksum)."""
    try:
        import ir_datasets
    except ImportError as e:  # pragma: no cover
        raise LsrError("ir_datasets is not installed") from e
    where = f"ir_datasets {irds_id}"
    try:
        ds = ir_datasets.load(irds_id)
        # documents are shared across query sets of one collection (msmarco-passage/dev/small and trec-dl-2019,
        # or beir/scifact/train and /test): ir_datasets names the collection that holds a dataset's documents
        docs_id = ir_datasets.docs_parent_id(irds_id)

        def doc_rows():
            for doc in ds.docs_iter():
                text = getattr(doc, "text", None) or getattr(doc, "body", "") or ""
                yield None, check_id(str(doc.doc_id), where, None, "document"), getattr(doc, "title", "") or "", text

        def query_rows():
            for q in ds.queries_iter():
                text = getattr(q, "text", None) or getattr(q, "title", "") or ""
                yield None, check_id(str(q.query_id), where, None, "query"), "", text

        corpus = _converted_rows(cache_dir, "corpus", {"irds": docs_id}, doc_rows, f"ir_datasets {docs_id}",
                                 "document", docs_id.split("/")[0], cls=Corpus)
        queries = _converted_rows(cache_dir, "queries", {"irds": irds_id}, query_rows, where, "query", irds_id)
        qrels: dict[str, dict[str, int]] = {}
        for qrel in ds.qrels_iter():
            qrels.setdefault(str(qrel.query_id), {})[str(qrel.doc_id)] = int(qrel.relevance)
    except KeyError as e:
        raise DataError(f"dataset '{name}': unknown ir_datasets id '{irds_id}'") from e
    except DataError:
        raise
    except Exception as e:  # network failures arrive as many exception types
        raise LsrError(f"dataset '{name}': ir_datasets could not load '{irds_id}' ({type(e).__name__}: {e}). "
                       f"Without internet, put the data in BEIR layout at $LSR_DATA_DIR/{name}/ "
                       f"(corpus.jsonl, queries.jsonl, qrels/<split>.tsv).") from None
    stats = check_qrels(qrels, queries, corpus, irds_id)
    stats.update(empty_documents=corpus.empty, empty_queries=queries.empty)
    return Dataset(name=name, corpus_key=docs_id.replace("/", "__"), corpus=corpus, queries=queries,
                   qrels=qrels, source=f"irds:{irds_id}", stats=stats)


def load_hf(name: str, hf_id: str, split: str = "test", cache_dir: str | None = None) -> Dataset:
    """A BEIR-style dataset on the Hugging Face Hub: ``<hf_id>`` with configs ``corpus`` and ``queries``
    (``_id``, ``title``, ``text``) and ``<hf_id>-qrels`` with the split (``query-id``, ``corpus-id``, ``score``),
    as the BeIR organisation publishes them. Converted to Arrow once, keyed by the id and the Hub's fingerprint."""
    import datasets

    where = f"Hugging Face dataset {hf_id}"
    try:
        docs = datasets.load_dataset(hf_id, "corpus", split="corpus")
        qs = datasets.load_dataset(hf_id, "queries", split="queries")
        judged = datasets.load_dataset(f"{hf_id}-qrels", split=split)
    except Exception as e:  # offline, unknown id, missing split: many exception types
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise LsrError(f"dataset '{name}': the Hugging Face Hub could not load '{hf_id}' ({type(e).__name__}: "
                       f"{reason}). Without internet, put the data in BEIR layout at $LSR_DATA_DIR/{name}/ "
                       f"(corpus.jsonl, queries.jsonl, qrels/<split>.tsv).") from None

    def rows(table, what):
        def gen():
            for batch in table.iter(batch_size=BATCH):
                ids = batch.get("_id") or batch.get("id")
                titles = batch.get("title") or [""] * len(ids)
                for i, (row_id, text) in enumerate(zip(ids, batch.get("text") or batch.get("query"))):
                    yield None, check_id(str(row_id), where, None, what), str(titles[i] or ""), str(text or "")
        return gen

    corpus = _converted_rows(cache_dir, "corpus", {"hf": hf_id, "fingerprint": docs._fingerprint},
                             rows(docs, "document"), where, "document", name, cls=Corpus)
    queries = _converted_rows(cache_dir, "queries", {"hf": hf_id, "fingerprint": qs._fingerprint},
                              rows(qs, "query"), where, "query", name)
    qrels: dict[str, dict[str, int]] = {}
    for batch in judged.iter(batch_size=BATCH):
        for qid, doc_id, rel in zip(batch["query-id"], batch["corpus-id"], batch["score"]):
            qrels.setdefault(check_id(str(qid), where, None, "query"), {})[
                check_id(str(doc_id), where, None, "document")] = int(rel)
    stats = check_qrels(qrels, queries, corpus, where)
    stats.update(empty_documents=corpus.empty, empty_queries=queries.empty)
    return Dataset(name=name, corpus_key=_slug(hf_id.replace("/", "__")), corpus=corpus, queries=queries,
                   qrels=qrels, source=f"hf:{hf_id}", stats=stats)


BATCH = 10_000


def load_dataset(name: str, split: str = "test", irds_id: str | None = None, path: str | None = None,
                 cache_dir: str | None = None, hf_id: str | None = None) -> Dataset:
    """A folder (``path``, or ``$LSR_DATA_DIR/<name>``) when there is one, else the Hub (``hf_id``), else
    ir_datasets (``irds_id``)."""
    if hf_id and not path and not (data_dir() and (data_dir() / name).is_dir()):
        return load_hf(name, hf_id, split, cache_dir)
    kind, where = resolve(name, irds_id, path)
    if kind == "folder":
        return load_folder(name, Path(where), split, cache_dir)
    return load_irds(name, where, cache_dir)


def training_examples(dataset: Dataset) -> dict[str, list[str]]:
    """Query id -> ids of its positive documents (relevance > 0), in qrels order."""
    out = {}
    for qid, docs in dataset.qrels.items():
        pos = [d for d, rel in docs.items() if rel > 0]
        if pos and dataset.queries.get(qid, "").strip():
            out[qid] = pos
    if not out:
        raise DataError(f"dataset '{dataset.name}': no query with a positive judgement to train on")
    return out


def write_trec_run(path: Path, run: dict[str, list[tuple[str, float]]], tag: str = "lsr-run") -> None:
    """Ranked lists -> TREC run file (atomic)."""
    from .run_dir import atomic_path

    with atomic_path(path) as tmp, open(tmp, "w") as f:
        for qid, hits in run.items():
            check_id(qid, path, None, "query")
            for rank, (doc_id, score) in enumerate(hits, 1):
                check_id(doc_id, path, None, "document")
                f.write(f"{qid} Q0 {doc_id} {rank} {score:.6f} {tag}\n")


def trec_run_rows(path: Path) -> Iterator[tuple[str, str, float]]:
    """``(qid, docid, score)`` of ``qid Q0 docid rank score tag`` lines; exactly 6 columns (7 means an id or tag
    with whitespace)."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            parts = split_columns(line)
            if not parts:
                continue
            if len(parts) != 6:
                raise DataError(f"{path}:{lineno}: a TREC run line has 6 columns 'qid Q0 docid rank score tag', "
                                f"got {len(parts)}" + (" (an id or tag with whitespace?)" if len(parts) > 6 else ""))
            check_id(parts[0], path, lineno, "query")
            check_id(parts[2], path, lineno, "document")
            if not _is_number(parts[4]):
                raise DataError(f"{path}:{lineno}: score '{parts[4]}' is not a number")
            yield parts[0], parts[2], float(parts[4])


def read_trec_run(path: Path) -> dict[str, dict[str, float]]:
    """A whole TREC run file as ``{qid: {docid: score}}`` (``run_table`` reads a large one query by query)."""
    run: dict[str, dict[str, float]] = {}
    for qid, doc_id, score in trec_run_rows(path):
        run.setdefault(qid, {})[doc_id] = score
    return run


def run_table(path: Path, cache_dir: str | None = None):
    """A TREC run file converted once to a memory-mapped table grouped by query (``lsr_run.store.ScoreTable``):
    ``scores(qid)`` reads one query's ranked documents, so a run over MS MARCO's training queries is never held
    whole."""
    from .store import ScoreTable, write_score_table

    path = Path(path)
    return ScoreTable(convert_file(path, "run", lambda tmp: write_score_table(tmp, trec_run_rows(path)), cache_dir))
