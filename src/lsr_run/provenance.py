"""Keys that say what a stage's output was computed from, so a result can never be reused stale.

Every stage records, beside its output, a key: a digest of the config subset the stage reads and of the keys of
the artefacts it consumes (model weights, corpus content, encoded shards, index, queries). A stage is skipped only
when the key it recorded equals the key it would compute now. Keys chain: the model key is the digest of the
model's tensors, the encode key contains the model key and the corpus content, the index key contains the encode
key, the search key the index and query keys, so a change anywhere recomputes everything downstream of it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

# A file modified this close to a reading may change again within one clock tick without its mtime moving (git's
# "racily clean" case): its content is read again rather than trusted by identity.
RACY_NS = 2_000_000_000

# the config sections that determine a trained model
TRAIN_SECTIONS = ("backbone", "head_scaling", "candidates", "teacher", "sampling", "loss", "regularizer", "train",
                  "seed")
# train.* keys that change how a result is computed or logged, not what it is
TRAIN_NEUTRAL = ("log_every", "save_every", "prefetch")  # the model is the same whatever these are
# keys added after runs were recorded without them: at this value they are left out of the record, so a run
# finished before the key existed still matches (candidates.random=0 is the pool such a run trained on)
INERT_DEFAULTS = {"candidates.random": 0, "candidates.random_seed": 0, "train.compile": False,
                  "encode.max_tokens": None, "encode.weights": None, "encode.cpu_gemm": "auto",
                  "encode.doc_top_k": None, "encode.query_top_k": None}


def digest(obj: Any) -> str:
    """A short, stable digest of any JSON-able value."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


_FILE_DIGESTS: dict[tuple, str] = {}


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes, memoised per process by path, size, modification time and inode, except for a
    file modified in the last two seconds (rewritten within one clock tick, it would keep its size and time)."""
    import time

    path = Path(path)
    st = path.stat()
    memo = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if memo in _FILE_DIGESTS:
        return _FILE_DIGESTS[memo]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    if st.st_mtime_ns < time.time_ns() - RACY_NS:
        _FILE_DIGESTS[memo] = h.hexdigest()[:20]
    return h.hexdigest()[:20]


def folder_digest(folder: Path) -> str:
    """Content key of a folder (a saved model): the digest of every file under it, by relative path. Hidden
    entries and trainer checkpoints (``checkpoint-*``) are left out: they are not what loading the folder reads."""
    folder = Path(folder)
    files = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and not any(p.startswith((".", "checkpoint-")) for p in rel.parts):
            files[rel.as_posix()] = file_digest(path)
    return digest(files)


def corpus_file(folder: Path) -> Path | None:
    for name in ("corpus.jsonl", "corpus.jsonl.gz"):
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    return None


def corpus_digest(dataset) -> str:
    """Content key of a dataset's corpus: the corpus file's bytes (a folder; computed once, when the file was
    converted to Arrow) or the ir_datasets collection id."""
    if getattr(dataset.corpus, "digest", ""):
        return dataset.corpus.digest
    folder = Path(dataset.source) if dataset.source else None
    file = corpus_file(folder) if folder is not None and folder.is_dir() else None
    if file is not None:
        return file_digest(file)
    return digest({"collection": dataset.corpus_key, "source": dataset.source})


def texts_digest(texts: dict[str, str]) -> str:
    h = hashlib.sha256()
    for key in sorted(texts):
        h.update(key.encode() + b"\0" + texts[key].encode() + b"\n")
    return h.hexdigest()[:20]


def model_key(folder: Path) -> str:
    """Key of a saved model: its settings (with the per-tensor digests the save wrote) and its weights file."""
    folder = Path(folder)
    parts = {}
    for name in ("lsr_run.json", "model.safetensors"):
        path = folder / name
        parts[name] = file_digest(path) if path.is_file() else None
    if not any(parts.values()):
        parts["folder"] = str(folder.resolve())
    return digest(parts)


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj}


def differences(old: dict, new: dict) -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    a, b = flatten(old), flatten(new)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def drop(tree: dict, dotted: str, only_if: Any = None, always: bool = True) -> None:
    """Remove a dotted key from nested dicts (always, or only when it holds ``only_if``)."""
    *parents, last = dotted.split(".")
    node: Any = tree
    for p in parents:
        node = node.get(p) if isinstance(node, dict) else None
    if isinstance(node, dict) and last in node and (always or node[last] == only_if):
        del node[last]


def drop_inert(tree: dict, section: str = "") -> dict:
    """Remove, in place, every ``INERT_DEFAULTS`` key that holds its default from a config (or from its
    ``section``, e.g. the encode dict alone), so that configs recorded before a key existed compare equal to
    configs recorded after it. Returns ``tree``."""
    prefix = f"{section}." if section else ""
    for dotted, value in INERT_DEFAULTS.items():
        if dotted.startswith(prefix):
            drop(tree, dotted[len(prefix):], value, always=False)
    return tree


def train_inputs(cfg: dict, data_key: str) -> dict:
    """What a trained model is a function of: the training config (minus logging cadence) and the data."""
    inputs = json.loads(json.dumps({k: cfg.get(k) for k in TRAIN_SECTIONS}, default=str))
    inputs["train"] = inputs.get("train") or {}
    for dotted in TRAIN_NEUTRAL:
        drop(inputs, f"train.{dotted}")
    drop_inert(inputs)
    inputs["data"] = {"config": cfg.get("data", {}).get("train"), "content": data_key}
    return inputs
