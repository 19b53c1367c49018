"""Corpora, query sets and teacher scores as memory-mapped Arrow tables, converted once and shared.

A source (a BEIR ``corpus.jsonl``/``queries.jsonl``, an ir_datasets id, a Hugging Face Hub dataset, a teacher score
file) is converted once into a folder under the data cache, keyed by the source and its identity (path, size,
modification time and inode for files; the id for ir_datasets and the Hub). The folder holds

- ``data.arrow``: the rows in source order, an Arrow stream that ``datasets.Dataset.from_file`` memory-maps;
- ``hashes.npy`` / ``rows.npy``: the 64-bit xxh3 hash of every id, sorted, and the row each belongs to: lookup by id
  is a binary search over a memory-mapped array, never a Python dict over the whole corpus;
- ``meta.json``: rows, empty texts, the SHA-256 content key of the source file (what provenance keys stages by).

Later runs, and every DDP rank, map the same files: the operating system keeps one copy of the pages, and a
process's memory grows only with what it reads. Conversion validates as it goes and keeps the messages of the
JSONL readers (file and line for bad JSON, bad UTF-8 and duplicate ids). Conversions are serialised by a file
lock and published by renaming a finished folder, so concurrent processes never read half a table.
"""

from __future__ import annotations

import array
import bisect
import fcntl
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import xxhash

from .errors import DataError
from .provenance import RACY_NS

log = logging.getLogger(__name__)

FORMAT = 1  # bump when the folder layout changes: older conversions are then not reused
BATCH_ROWS = 16384
TEXT_SCHEMA = pa.schema([("id", pa.string()), ("title", pa.string()), ("text", pa.string())])
SCORE_SCHEMA = pa.schema([("qid", pa.string()), ("docid", pa.string()), ("score", pa.float64())])


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``<cache_dir>/data`` (``paths.cache_dir`` / ``LSR_CACHE_DIR``), else ``$XDG_CACHE_HOME/lsr-run/data``."""
    if cache_dir:
        return Path(cache_dir).expanduser() / "data"
    if os.environ.get("LSR_CACHE_DIR"):
        return Path(os.environ["LSR_CACHE_DIR"]).expanduser() / "data"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "lsr-run" / "data"


def hash_ids(ids: Iterable[str]) -> np.ndarray:
    """xxh3-64 of each id's UTF-8 bytes (stable across processes and machines)."""
    ids = list(ids)
    return np.fromiter((xxhash.xxh3_64_intdigest(i.encode()) for i in ids), dtype=np.uint64, count=len(ids))




def file_identity(path: Path) -> dict:
    st = Path(path).stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


def _slug(text: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[:60] or "data"


def _read_meta(folder: Path) -> dict | None:
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if meta.get("format") == FORMAT else None


def _write_meta(folder: Path, meta: dict) -> None:
    tmp = folder / f".meta.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, folder / "meta.json")


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def converted(folder: Path, build, fresh=lambda meta: True) -> Path:
    """``folder`` when a finished conversion is there and ``fresh(meta)``; else ``build(tmp)`` fills a temporary
    folder that then replaces it. One process converts while the others wait on the lock, then map its result;
    a process that mapped a replaced conversion keeps reading its (unlinked) files safely."""
    meta = _read_meta(folder)
    if meta is not None and fresh(meta):
        return folder
    with _locked(folder.parent / f".{folder.name}.lock"):
        meta = _read_meta(folder)
        if meta is not None and fresh(meta):  # another process finished it while this one waited
            return folder
        tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            start = time.time()
            meta = build(tmp)
            meta.update(format=FORMAT, seconds=round(time.time() - start, 3))
            _write_meta(tmp, meta)
            if folder.exists():
                old = folder.parent / f".{folder.name}.old-{os.getpid()}"
                os.replace(folder, old)
                shutil.rmtree(old, ignore_errors=True)
            os.replace(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("converted %s to Arrow in %s (%.1f s)", meta.get("source"), folder, meta["seconds"])
    return folder


def convert_file(path: Path, kind: str, build, cache_dir=None, **settings) -> Path:
    """The conversion folder of a file, (re)made by ``build(tmp) -> meta`` when the file's content changed.

    The folder is named by the file's resolved path (and ``settings``); its ``meta.json`` records the file's
    SHA-256 content key and identity (size, modification time, inode). A later load trusts an unchanged identity
    when the file was last modified well before the conversion began; otherwise (a file rewritten within one
    clock tick keeps its size and timestamp) it compares the content key, as git does for racily clean files."""
    from .provenance import digest, file_digest

    path = Path(path)
    real = path.resolve()
    folder = cache_root(cache_dir) / (f"{kind}-{_slug(real.parent.name)}-{_slug(real.name)[:20]}-"
                                      f"{digest({'kind': kind, 'path': str(real), **settings})[:12]}")

    def fresh(meta: dict) -> bool:
        identity = file_identity(path)
        if meta.get("identity") == identity and identity["mtime_ns"] + RACY_NS < meta["started_ns"]:
            return True
        if meta.get("sha256") != file_digest(path):
            return False
        now = time.time_ns()
        if identity["mtime_ns"] + RACY_NS < now:  # the content checked now, and the file has settled since: later
            meta.update(identity=identity, started_ns=now)  # loads may trust its identity again (git's refresh)
            try:
                _write_meta(folder, meta)
            except OSError:  # a read-only shared cache: the next load checks the content again
                pass
        return True

    def build_with_identity(tmp: Path) -> dict:
        started, identity, content = time.time_ns(), file_identity(path), file_digest(path)
        meta = build(tmp)
        meta.update(source=str(path), sha256=content, identity=identity, started_ns=started)
        return meta

    return converted(folder, build_with_identity, fresh)


# ---------------------------------------------------------------- writing

class _TableWriter:
    """Streams rows into ``data.arrow`` in batches, remembering each id's hash and source line."""

    def __init__(self, folder: Path, schema: pa.Schema):
        self.path = folder / "data.arrow"
        self.schema = schema
        self._sink = pa.OSFile(str(self.path), "wb")
        self._writer = pa.ipc.new_stream(self._sink, schema)
        self._columns: list[list] = [[] for _ in schema.names]
        self.rows = 0

    def add(self, *values) -> None:
        for column, value in zip(self._columns, values):
            column.append(value)
        if len(self._columns[0]) >= BATCH_ROWS:
            self.flush()

    def flush(self) -> None:
        if self._columns[0]:
            batch = pa.record_batch([pa.array(c, type=f.type) for c, f in zip(self._columns, self.schema)],
                                    schema=self.schema)
            self._writer.write_batch(batch)
            self.rows += batch.num_rows
            self._columns = [[] for _ in self.schema.names]

    def close(self) -> None:
        self.flush()
        self._writer.close()
        self._sink.close()


def write_text_table(folder: Path, rows: Iterator[tuple[int | None, str, str, str]], where: str, what: str) -> dict:
    """Rows ``(line, id, title, text)`` -> ``data.arrow`` + id index; duplicate ids are an error naming both
    lines. Returns the counts for ``meta.json``."""
    writer = _TableWriter(folder, TEXT_SCHEMA)
    hashes, lines = [], array.array("q")  # compact: 8 bytes a row, not a Python int
    empty = 0
    pending_ids: list[str] = []
    try:
        for line, doc_id, title, text in rows:
            writer.add(doc_id, title, text)
            pending_ids.append(doc_id)
            lines.append(line if line is not None else -1)
            if not (title.strip() or text.strip()):
                empty += 1
            if len(pending_ids) >= BATCH_ROWS:
                hashes.append(hash_ids(pending_ids))
                pending_ids = []
    finally:
        writer.close()
    hashes.append(hash_ids(pending_ids))
    _write_index(folder, np.concatenate(hashes), np.frombuffer(lines, dtype=np.int64), where, what)
    return {"rows": writer.rows, "empty": empty}


def _write_index(folder: Path, hashes: np.ndarray, lines: np.ndarray, where: str, what: str) -> None:
    order = np.argsort(hashes, kind="stable")
    ordered = hashes[order]
    same = np.nonzero(ordered[1:] == ordered[:-1])[0]
    if len(same):
        ids = _open_table(folder).column("id")
        found = []
        for i in same:
            a, b = int(order[i]), int(order[i + 1])  # a < b: a stable sort keeps source order among equals
            if ids[a].as_py() == ids[b].as_py():
                found.append((b, a))
        if found:
            later, first = min(found)
            at = f"{where}:{lines[later]}" if lines[later] >= 0 else where
            first_at = f"line {lines[first]}" if lines[first] >= 0 else f"row {first}"
            raise DataError(f"{at}: duplicate {what} id '{ids[later].as_py()}' (first at {first_at})")
    np.save(folder / "hashes.npy", ordered)
    np.save(folder / "rows.npy", order.astype(np.int64))


# ---------------------------------------------------------------- reading

def _open_table(folder: Path) -> pa.Table:
    """The memory-mapped Arrow table of a conversion folder; nothing is copied.

    This is what ``datasets.Dataset.from_file`` does (an Arrow stream over ``pyarrow.memory_map``), done without
    importing ``datasets``, which costs each process about a second and 90 MB (pandas and the rest);
    ``open_dataset`` gives the same file as a ``datasets.Dataset``."""
    return pa.ipc.open_stream(pa.memory_map(str(folder / "data.arrow"))).read_all()


def open_dataset(folder: Path):
    """A conversion folder's table as a memory-mapped ``datasets.Dataset`` (``map``, ``filter``, ``to_pandas``...)."""
    import datasets

    return datasets.Dataset.from_file(str(folder / "data.arrow"))


class Column:
    """Random reads from a chunked Arrow column. ``ChunkedArray.take`` concatenates the chunks (the whole column,
    on every call) and a take per chunk costs more than it saves for scattered rows; reading each value from its
    chunk is the fastest of the three (measured on a 1M-document table: 0.5 ms for 256 rows)."""

    def __init__(self, column: pa.ChunkedArray):
        self.column = column
        self.chunks = column.chunks
        self.starts = np.cumsum([0] + [len(c) for c in self.chunks])
        self._starts = self.starts.tolist()

    def get(self, row: int):
        """One value (no array is built: the fast path for single lookups)."""
        c = bisect.bisect_right(self._starts, row) - 1
        return self.chunks[c][row - self._starts[c]].as_py()

    def take(self, rows: np.ndarray) -> list:
        rows = np.asarray(rows, dtype=np.int64)
        which = np.searchsorted(self.starts, rows, side="right") - 1
        offsets = rows - self.starts[which]
        chunks = self.chunks
        return [chunks[c][o].as_py() for c, o in zip(which.tolist(), offsets.tolist())]


class IdIndex:
    """Row of an id: binary search of its xxh3 hash among the sorted hashes (collisions resolved by comparing
    the ids themselves)."""

    def __init__(self, hashes: np.ndarray, rows: np.ndarray, ids: pa.ChunkedArray):
        self.hashes, self.rows, self.ids = hashes, rows, Column(ids)

    @classmethod
    def build(cls, ids: pa.ChunkedArray) -> "IdIndex":
        hashes = hash_ids(ids.to_pylist())
        order = np.argsort(hashes, kind="stable")
        return cls(hashes[order], order.astype(np.int64), ids)

    def row(self, key: str) -> int:
        """Row of one key, -1 when absent (scalar path: no arrays built)."""
        h = np.uint64(xxhash.xxh3_64_intdigest(key.encode()))
        pos = int(np.searchsorted(self.hashes, h))
        while pos < len(self.hashes) and self.hashes[pos] == h:
            row = int(self.rows[pos])
            if self.ids.get(row) == key:
                return row
            pos += 1
        return -1

    def lookup(self, keys: list[str]) -> np.ndarray:
        """Row of each key, -1 where the key is absent."""
        if not keys:
            return np.zeros(0, dtype=np.int64)
        h = hash_ids(keys)
        pos = np.searchsorted(self.hashes, h)
        pos_ok = np.minimum(pos, len(self.hashes) - 1)
        hit = self.hashes[pos_ok] == h
        rows = np.where(hit, self.rows[pos_ok], -1)
        # verify: an id whose hash matches another id's hash (or several rows sharing one hash)
        check = np.nonzero(hit)[0]
        if len(check):
            got = self.ids.take(rows[check])
            for j, (i, found) in enumerate(zip(check, got)):
                if found != keys[i]:  # another id with the same hash: search its run of equal hashes
                    rows[i] = self.row(keys[i])
        return rows


def joined(title: str | None, text: str) -> str:
    """A row's text: ``title + " " + text`` (BEIR's and Pyserini's flat ``contents``), the text alone without a title."""
    return f"{title} {text}".strip() if title else text


class TextTable(Mapping):
    """Id -> text over an Arrow table with columns ``id``, ``title``, ``text``; ``table[id]`` is ``joined(title,
    text)``.

    It is a read-only mapping, so code written for ``dict[str, str]`` works on it; ``many(ids)`` and
    ``batches()`` read many rows at once, which is what encoding and training do."""

    def __init__(self, table: pa.Table, index: IdIndex | None = None, name: str = "", empty: int = 0,
                 digest: str = "", folder: Path | None = None):
        self.table = table
        self.index = index or IdIndex.build(table.column("id"))
        self._titles, self._texts = Column(table.column("title")), Column(table.column("text"))
        self.name, self.empty, self.digest, self.folder = name, empty, digest, folder

    @classmethod
    def open(cls, folder: Path, name: str = "") -> "TextTable":
        meta = json.loads((folder / "meta.json").read_text())
        table = _open_table(folder)
        index = IdIndex(np.load(folder / "hashes.npy", mmap_mode="r"), np.load(folder / "rows.npy", mmap_mode="r"),
                        table.column("id"))
        return cls(table, index, name=name, empty=meta.get("empty", 0), digest=meta.get("sha256", ""),
                   folder=folder)

    @classmethod
    def from_dicts(cls, titles: Mapping[str, str], texts: Mapping[str, str], name: str = "") -> "TextTable":
        """An in-memory table (tests, small slices); ``titles`` may lack ids."""
        ids = list(texts)
        table = pa.table([pa.array(ids, pa.string()), pa.array([titles.get(i, "") for i in ids], pa.string()),
                          pa.array([texts[i] for i in ids], pa.string())], schema=TEXT_SCHEMA)
        empty = sum(1 for i in ids if not (titles.get(i, "").strip() or texts[i].strip()))
        return cls(table, name=name, empty=empty)

    # Mapping
    def __len__(self) -> int:
        return self.table.num_rows

    def __iter__(self) -> Iterator[str]:
        for chunk in self.table.column("id").chunks:
            yield from chunk.to_pylist()

    def __contains__(self, key) -> bool:
        return isinstance(key, str) and self.index.row(key) >= 0

    def items(self) -> Iterator[tuple[str, str]]:
        """``(id, text)`` in source order, read a batch of rows at a time."""
        for ids, texts in self.batches():
            yield from zip(ids, texts)

    def values(self) -> Iterator[str]:
        for _, texts in self.batches():
            yield from texts

    def __getitem__(self, key: str) -> str:
        row = self.index.row(key) if isinstance(key, str) else -1
        if row < 0:
            raise KeyError(key)
        return joined(self._titles.get(row), self._texts.get(row))

    # batched access
    def rows(self, rows: np.ndarray) -> list[str]:
        """Texts of the given row numbers, in that order."""
        return list(map(joined, self._titles.take(rows), self._texts.take(rows)))

    def many(self, keys: list[str]) -> list[str]:
        """Texts of ``keys`` (a KeyError names the first absent id)."""
        rows = self.index.lookup(list(keys))
        if len(rows) and rows.min() < 0:
            raise KeyError(keys[int(np.argmin(rows))])
        return self.rows(rows)

    def contains(self, keys: list[str]) -> np.ndarray:
        return self.index.lookup(list(keys)) >= 0

    def ids(self, start: int = 0, stop: int | None = None) -> list[str]:
        """Ids of rows ``start:stop`` in source order (all of them by default: a list the size of the table)."""
        stop = len(self) if stop is None else min(stop, len(self))
        return self.table.column("id").slice(start, max(0, stop - start)).to_pylist()

    def batches(self, start: int = 0, stop: int | None = None, size: int = 65536) -> Iterator[tuple[list[str], list[str]]]:
        """``(ids, texts)`` of rows ``start:stop`` in source order, ``size`` rows at a time."""
        stop = len(self) if stop is None else min(stop, len(self))
        for lo in range(start, stop, size):
            part = self.table.slice(lo, min(size, stop - lo))
            yield part.column("id").to_pylist(), list(map(joined, part.column("title").to_pylist(),
                                                         part.column("text").to_pylist()))

    def text(self, key: str) -> str:
        return self[key]


# ---------------------------------------------------------------- teacher scores

class ScoreTable:
    """Teacher scores ``(qid, docid, score)`` on Arrow, grouped by query: ``scores(qid)`` reads one query's rows
    through the memory map, so a file of hundreds of millions of pairs is never loaded whole."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.table = _open_table(folder)
        self.meta = json.loads((folder / "meta.json").read_text())
        self.hashes = np.load(folder / "hashes.npy", mmap_mode="r")  # sorted query hashes
        self.starts = np.load(folder / "starts.npy", mmap_mode="r")  # first row of each query's group
        self.counts = np.load(folder / "counts.npy", mmap_mode="r")

    def __len__(self) -> int:
        return int(self.meta["queries"])

    def scores(self, qid: str) -> dict[str, float]:
        h = hash_ids([qid])[0]
        pos = int(np.searchsorted(self.hashes, h))
        while pos < len(self.hashes) and self.hashes[pos] == h:
            part = self.table.slice(int(self.starts[pos]), int(self.counts[pos]))
            if part.num_rows and part.column("qid")[0].as_py() == qid:
                return dict(zip(part.column("docid").to_pylist(), part.column("score").to_pylist()))
            pos += 1
        return {}

    def example_query(self) -> str | None:
        return self.table.column("qid")[0].as_py() if self.table.num_rows else None


def write_score_table(folder: Path, rows: Iterator[tuple[str, str, float]]) -> dict:
    """Rows in any order -> ``data.arrow`` grouped by query (a query's rows contiguous) + query index.

    A file whose queries come in groups (the usual layout) is written in one streaming pass; otherwise the
    rows are regrouped with a stable sort on the memory-mapped first pass, so pairs keep their file order."""
    first = folder / "pass1"
    first.mkdir()
    writer = _TableWriter(first, SCORE_SCHEMA)
    group_hashes, group_starts = [], []
    grouped, seen_groups, last = True, set(), None
    try:
        for qid, docid, score in rows:
            if qid != last:
                h = xxhash.xxh3_64_intdigest(qid.encode())
                if grouped and h in seen_groups:
                    grouped = False  # a query seen before comes back: regroup below
                seen_groups.add(h)
                group_hashes.append(h)
                group_starts.append(writer.rows + len(writer._columns[0]))
                last = qid
            writer.add(qid, docid, score)
    finally:
        writer.close()
    total = writer.rows
    if grouped:
        os.replace(first / "data.arrow", folder / "data.arrow")
        starts = np.asarray(group_starts, dtype=np.int64)
        hashes = np.asarray(group_hashes, dtype=np.uint64)
    else:
        table = _open_table(first)
        qh = hash_ids(table.column("qid").to_pylist())
        order = np.argsort(qh, kind="stable")
        regrouped = table.take(pa.array(order))
        with pa.OSFile(str(folder / "data.arrow"), "wb") as sink, pa.ipc.new_stream(sink, SCORE_SCHEMA) as w:
            for batch in regrouped.to_batches(max_chunksize=BATCH_ROWS):
                w.write_batch(batch)
        qh = qh[order]
        boundaries = np.concatenate([[0], np.nonzero(qh[1:] != qh[:-1])[0] + 1])
        starts, hashes = boundaries.astype(np.int64), qh[boundaries]
        del table, regrouped
    shutil.rmtree(first)
    counts = np.diff(np.concatenate([starts, [total]])).astype(np.int64)
    order = np.argsort(hashes, kind="stable")
    np.save(folder / "hashes.npy", hashes[order])
    np.save(folder / "starts.npy", starts[order])
    np.save(folder / "counts.npy", counts[order])
    return {"rows": int(total), "queries": int(len(starts))}
