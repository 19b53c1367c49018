"""Shared fixtures. Fast tests use tiny random models built in code; tests marked ``integration`` use
../shared/data (or $LSR_DATA_DIR), the real minilm_l6 weights and the JVM."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LSR_DATA_DIR", ROOT.parent / "shared" / "data")).resolve()
os.environ.setdefault("LSR_DATA_DIR", str(SHARED_DATA))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
CONF_DIR = ROOT / "conf"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (SHARED_DATA / "scifact").is_dir():
        pytest.fail(f"test data missing: {SHARED_DATA}/scifact (set LSR_DATA_DIR to ../shared/data)")
    return SHARED_DATA


_TINY_BACKBONES: dict = {}


def tiny_backbone(kind: str, seed: int = 0):
    """``load_backbone`` of a tiny random model, built once per (kind, seed), then copied: the same weights and
    global torch RNG state as a fresh build, without its cost (~0.15-0.25 s, mostly ModernBERT's truncated-normal
    initialisation and the tokenizer's loading; the fast tests build ~50). The tokenizer is shared (no code
    changes a tokenizer's settings; a copy would cost as much as loading it)."""
    import copy

    if (kind, seed) not in _TINY_BACKBONES:
        from lsr_run.models.backbone import BackboneSpec, load_backbone

        built = load_backbone(BackboneSpec(name=f"tiny_{kind}", model_id=f"tiny-{kind}", tiny=kind), seed)
        _TINY_BACKBONES[kind, seed] = built, torch.get_rng_state()
    (mlm, tok, settings), rng = _TINY_BACKBONES[kind, seed]
    torch.set_rng_state(rng)  # where a fresh build leaves it: tests that train after building stay seeded alike
    return copy.deepcopy(mlm), tok, dict(settings)


def make_tiny_encoder(kind: str = "bert", seed: int = 0, chunk: int = 4096, active: float | None = None):
    """A random tiny SPLADE encoder. ``active``: shift the decoder bias so that about this fraction of the logits of
    a probe text are positive, as in a real head (a random head leaves about half positive: vectors ~15k terms)."""
    from lsr_run.models.splade import SpladeEncoder

    mlm, tok, settings = tiny_backbone(kind, seed)
    encoder = SpladeEncoder(mlm, tok, settings, chunk=chunk)
    if active is not None:
        with torch.no_grad():
            batch = encoder.tokenize(["document about sparse retrieval lucene index", "query sparse"], 24)
            logits = encoder.logits(batch["input_ids"], batch["attention_mask"])
            encoder.mlm.get_output_embeddings().bias.sub_(torch.quantile(logits.flatten()[:100000].float(), 1 - active))
    return encoder


@pytest.fixture(params=["bert", "modernbert"])
def tiny_kind(request) -> str:
    return request.param


@pytest.fixture
def tiny_encoder(tiny_kind):
    torch.manual_seed(0)
    return make_tiny_encoder(tiny_kind)


def write_beir(folder: Path, docs: dict, queries: dict, qrels: dict, split: str = "test") -> Path:
    """Write a tiny BEIR-layout dataset."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "corpus.jsonl", "w") as f:
        for doc_id, (title, text) in docs.items():
            f.write(json.dumps({"_id": doc_id, "title": title, "text": text}) + "\n")
    with open(folder / "queries.jsonl", "w") as f:
        for qid, text in queries.items():
            f.write(json.dumps({"_id": qid, "text": text}) + "\n")
    (folder / "qrels").mkdir(exist_ok=True)
    with open(folder / "qrels" / f"{split}.tsv", "w") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        for qid, docs_rel in qrels.items():
            for doc_id, rel in docs_rel.items():
                f.write(f"{qid}\t{doc_id}\t{rel}\n")
    return folder


# ---------------------------------------------------------------- a toy end-to-end setup (no Java)

WORDS = ("sparse dense retrieval lucene index query document term weight model train neural network vector "
         "score rank search engine corpus token vocabulary head norm scale logit entropy variance teacher "
         "student negative positive sample stratified random hard batch").split()


@pytest.fixture
def toy(tmp_path):
    rng = random.Random(0)
    docs = {f"d{i}": ("", " ".join(rng.choices(WORDS, k=30))) for i in range(40)}
    queries = {f"q{i}": " ".join(rng.choices(WORDS, k=5)) for i in range(16)}
    qrels = {f"q{i}": {f"d{i}": 1} for i in range(16)}
    data = tmp_path / "data"
    write_beir(data / "toy", docs, queries, qrels, split="train")
    write_beir(data / "toytest", docs, queries, qrels, split="test")
    run = tmp_path / "candidates.trec"
    with open(run, "w") as f:
        for q in queries:
            for rank, d in enumerate(rng.sample(sorted(docs), 12), 1):
                f.write(f"{q} Q0 {d} {rank} {20 - rank} bm25\n")
    return {"data": data, "candidates": run}


def toy_overrides(toy, steps=6):
    return ["debug=default", f"train.max_steps={steps}", "candidates=run_file", f"candidates.path={toy['candidates']}",
            "data.train.name=toy", "data.train.irds_id=null", "eval=none",
            "+eval.datasets.toytest={name: toytest, split: test}"]


def cli(args, env_extra=None, wait=True):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **(env_extra or {}))
    cmd = [sys.executable, "-m", "lsr_run.cli", *args]
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=900)
    proc.stderr = proc.stdout  # logs (stdout) and errors (stderr) in the order they were written
    return proc


def free_port() -> int:
    """A TCP port on localhost that nothing listens on now (the kernel's choice), for a test's rendezvous."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def losses(run_dir: Path) -> dict[int, float]:
    from lsr_run.plots import read_train_log

    return {r["step"]: r["loss"] for r in read_train_log(run_dir / "train_log.jsonl")}


