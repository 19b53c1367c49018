import json

import torch

from lsr_run.impacts import QUANTIZATION_SCALE, quantize, term_vocabulary, to_sparse, top_k


def test_quantize_rounds_and_scales():
    w = torch.tensor([[0.004, 0.016, 1.234, 0.0, 0.126]])
    assert QUANTIZATION_SCALE == 100
    assert quantize(w).tolist() == [[0, 2, 123, 0, 13]]
    assert quantize(w).dtype == torch.int32


def test_to_sparse_drops_zeros_and_orders_by_impact():
    impacts = torch.tensor([[0, 5, 0, 9], [0, 0, 0, 0]], dtype=torch.int32)
    terms = ["a", "b", "c", "d"]
    assert to_sparse(impacts, terms) == [{"d": 9, "b": 5}, {}]


def test_top_k_keeps_the_highest_impacts_and_breaks_ties_by_the_vectors_order():
    impacts = torch.tensor([[0, 5, 3, 5, 1, 3, 0, 9]], dtype=torch.int32)
    vec = to_sparse(impacts, [f"t{i}" for i in range(8)])[0]
    assert top_k(vec, 3) == {"t7": 9, "t1": 5, "t3": 5}
    assert list(top_k(vec, 4)) == ["t7", "t1", "t3", "t2"]  # t2 and t5 tie at 3: the lower vocabulary id stays
    assert top_k(vec, 6) == top_k(vec, None) == vec == {"t7": 9, "t1": 5, "t3": 5, "t2": 3, "t5": 3, "t4": 1}
    shuffled = {"b": 2, "a": 7, "c": 2}  # any vector, in whatever order it was read: by impact, then its order
    assert list(top_k(shuffled, 2).items()) == [("a", 7), ("b", 2)]


def test_term_vocabulary_is_unique_and_whitespace_free():
    class Tok:
        def __len__(self):
            return 4

        def convert_ids_to_tokens(self, ids):
            return ["a", "b c", "", "a"]

    terms = term_vocabulary(Tok())
    assert len(set(terms)) == 4
    assert not any(" " in t or not t for t in terms)


def test_to_sparse_equals_a_row_by_row_reference_including_order():
    g = torch.Generator().manual_seed(0)
    impacts = torch.randint(0, 4, (6, 50), generator=g, dtype=torch.int32)  # many ties, zeros
    impacts[2] = 0  # an all-zero row keeps its place
    terms = [f"t{i}" for i in range(50)]
    for row, got in zip(impacts, to_sparse(impacts, terms)):
        idx = [i for i in range(50) if row[i] > 0]
        want = sorted(((terms[i], int(row[i])) for i in idx), key=lambda x: -x[1])  # stable: vocabulary order
        assert list(got.items()) == want


def test_shard_count_covers_the_indexing_threads_and_the_size_cap():
    from lsr_run.encoding import shard_count

    assert shard_count(1000, 100_000, 1) == 1
    assert shard_count(1000, 100_000, 4) == 4  # one file per indexing thread
    assert shard_count(1000, 300, 2) == 4  # the size cap wins when it needs more files
    assert shard_count(3, 0, 8) == 3  # never an empty shard
    assert shard_count(0, 100, 2) == 1


def test_encode_corpus_shards_hold_every_document_once_with_the_encoder_vectors(tmp_path):
    import json

    from conftest import make_tiny_encoder, write_beir
    from lsr_run.data import load_folder
    from lsr_run.encoding import EMPTY_DOC_TERM, EncodeSpec, encode_corpus, encode_texts

    docs = {f"d{i}": ("", " ".join(["sparse retrieval lucene"] * (i % 7 + 1))) for i in range(23)}
    docs["d5"] = ("", "   ")  # blank: indexed with the filler term, never matched
    ds = load_folder("toy", write_beir(tmp_path / "toy", docs, {"q": "lucene"}, {"q": {"d1": 1}}), "test")
    encoder = make_tiny_encoder("bert", active=0.01).eval()
    spec = EncodeSpec(batch_size=4, doc_max_length=32, bf16=False)
    stats = encode_corpus(encoder, ds.corpus, tmp_path / "vectors", spec, min_shards=3)
    shards = sorted((tmp_path / "vectors").glob("part-*.jsonl"))
    assert stats["shards"] == len(shards) == 3 and not list((tmp_path / "vectors").glob("*.tmp"))
    rows = [json.loads(line) for s in shards for line in s.read_text().splitlines()]
    sizes = [len(s.read_text().splitlines()) for s in shards]
    assert sorted(r["id"] for r in rows) == sorted(docs) and max(sizes) - min(sizes) <= 1
    ids = ds.corpus.ids()
    want = dict(zip(ids, encode_texts(encoder, [ds.corpus.text(i) for i in ids], 32, 4, False, None)))
    for r in rows:
        assert r["vector"] == ({EMPTY_DOC_TERM: 1} if r["id"] == "d5" else want[r["id"]]), r["id"]
    assert stats["empty_docs"] == 1
    assert abs(stats["doc_terms"] - sum(len(want[i]) for i in ids if i != "d5") / len(ids)) < 1e-9


def test_overlapped_encoding_writes_the_same_shards(tmp_path, monkeypatch):
    """The CUDA path forced on a CPU: the next batch tokenised in a thread, the shards written in another one batch
    behind. Shards byte-identical to the in-line path's; a failed write surfaces and leaves no shard behind."""
    import pytest
    import torch

    from conftest import make_tiny_encoder, write_beir
    from lsr_run.data import load_folder
    from lsr_run.encoding import EncodeSpec, ShardWriter, encode_corpus

    docs = {f"d{i}": ("", " ".join(["sparse retrieval lucene index"] * (i % 5 + 1)) + f" doc{i}") for i in range(30)}
    ds = load_folder("toy", write_beir(tmp_path / "toy", docs, {"q": "lucene"}, {"q": {"d1": 1}}), "test")
    encoder = make_tiny_encoder("bert", active=0.01).eval()
    spec = EncodeSpec(batch_size=4, doc_max_length=32, bf16=False)
    texts = [ds.corpus.text(i) for i in ds.corpus.ids()]
    inline = list(encoder.encode(texts, 32, 4, False, prefetch=False))
    ahead = list(encoder.encode(texts, 32, 4, False, prefetch=True))
    assert [p for p, _ in inline] == [p for p, _ in ahead]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(inline, ahead))
    out = {}
    for overlap in (False, True):
        stats = encode_corpus(encoder, ds.corpus, tmp_path / f"v{overlap}", spec, min_shards=3, overlap=overlap)
        out[overlap] = ([p.read_bytes() for p in sorted((tmp_path / f"v{overlap}").glob("part-*.jsonl"))],
                        {k: v for k, v in stats.items() if k not in ("seconds", "docs_per_second")})
    assert out[True] == out[False] and len(out[True][0]) == 3

    calls = {"n": 0}
    original = ShardWriter.write

    def failing(self, *args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        return original(self, *args)

    monkeypatch.setattr(ShardWriter, "write", failing)
    with pytest.raises(OSError):
        encode_corpus(encoder, ds.corpus, tmp_path / "failed", spec, min_shards=3, overlap=True)
    assert not list((tmp_path / "failed").glob("*.jsonl*"))


def test_pruning_processes_write_what_pruning_in_process_writes(tmp_path, monkeypatch):
    """``prune_corpus`` on a large corpus hands groups of shards to ``python -m lsr_run.impacts`` processes: the
    same pruned shards and counts as pruning in the calling process (blank documents' filler counts no term)."""
    import random

    from lsr_run import encoding
    from lsr_run.impacts import write_vectors

    rng = random.Random(0)
    src = tmp_path / "corpus"
    src.mkdir()
    for n in range(3):
        rows = [(f"d{n}-{i}", {f"t{j}": rng.randint(1, 9) for j in rng.sample(range(50), rng.randint(1, 30))})
                for i in range(40)] + [(f"blank{n}", {encoding.EMPTY_DOC_TERM: 1})]
        write_vectors(src / f"part-000-{n:05d}.jsonl", rows)
    alone = encoding.prune_corpus(src, tmp_path / "alone", 5, processes=2)  # 3 small shards: in this process
    monkeypatch.setattr(encoding, "PRUNE_MB_PER_PROCESS", 1)  # every byte pays for a process
    procs = encoding.prune_corpus(src, tmp_path / "procs", 5, processes=2)
    assert procs == alone and alone["docs"] == 123
    names = sorted(p.name for p in src.glob("*.jsonl"))
    assert sorted(p.name for p in (tmp_path / "procs").iterdir()) == names
    for name in names:
        assert (tmp_path / "procs" / name).read_bytes() == (tmp_path / "alone" / name).read_bytes()
        pruned = [json.loads(line)["vector"] for line in (tmp_path / "procs" / name).read_text().splitlines()]
        full = [json.loads(line)["vector"] for line in (src / name).read_text().splitlines()]
        assert all(p == dict(sorted(f.items(), key=lambda kv: -kv[1])[:5]) for p, f in zip(pruned, full))
    kept = sum(min(5, len(v)) for name in names for v in
               (json.loads(line)["vector"] for line in (src / name).read_text().splitlines())
               if encoding.EMPTY_DOC_TERM not in v)
    assert alone["doc_terms"] == kept / 123
