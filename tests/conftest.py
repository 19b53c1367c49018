"""Shared fixtures. Fast tests use tiny random models built in code; tests marked ``integration`` use
../shared/data (or $LSR_DATA_DIR), the real minilm_l6 weights and the JVM."""

from __future__ import annotations

import os
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


def make_tiny_encoder(kind: str = "bert", seed: int = 0, chunk: int = 4096):
    from lsr_run.models.backbone import BackboneSpec, load_backbone
    from lsr_run.models.splade import SpladeEncoder

    mlm, tok, settings = load_backbone(BackboneSpec(name=f"tiny_{kind}", model_id=f"tiny-{kind}", tiny=kind), seed)
    return SpladeEncoder(mlm, tok, settings, chunk=chunk)


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
