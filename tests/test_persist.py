"""A saved model folder reloads bit-identically under every head setting, says so when it cannot, and opens in
sentence-transformers with the same vectors."""

from __future__ import annotations

import json

import pytest
import torch

from lsr_run.errors import LsrError
from lsr_run.models.backbone import BackboneSpec, load_backbone
from lsr_run.models.head_scaling import ConstantScaling, MatchNorm, NoScaling, is_tied
from lsr_run.models.splade import SpladeEncoder

from conftest import make_tiny_encoder

TEXTS = ["what is splade", "learned sparse retrieval builds term weights from masked language model logits",
         "lucene impact index"]


def _minilm() -> SpladeEncoder:
    mlm, tok, settings = load_backbone(BackboneSpec())
    return SpladeEncoder(mlm, tok, settings)


def _encode(enc: SpladeEncoder) -> torch.Tensor:
    enc.eval()
    with torch.no_grad():
        return enc.encode_batch(TEXTS, 32)


SCALINGS = {
    "none": lambda target, tie: NoScaling(target=target, tie=tie),
    "constant": lambda target, tie: ConstantScaling(k=16, target=target, tie=tie),
    "match_norm": lambda target, tie: MatchNorm(reference_norm=7.5, target=target, tie=tie),
}


def _round_trip(enc: SpladeEncoder, scaling, tmp_path, inflate: float = 1.0):
    record = scaling.apply(enc.mlm, inflate=inflate)
    enc.settings["head_scaling"] = record
    with torch.no_grad():  # a decoder bias that differs from any default initialisation
        enc.mlm.get_output_embeddings().bias.add_(torch.linspace(-0.5, 0.5, enc.vocab_size))
    expected = _encode(enc)
    enc.save(tmp_path / "model")
    again = SpladeEncoder.load(tmp_path / "model")
    assert torch.equal(expected, _encode(again))
    assert is_tied(again.mlm) == is_tied(enc.mlm)
    for (name, a), (_, b) in zip(sorted(enc.mlm.state_dict().items()), sorted(again.mlm.state_dict().items())):
        assert torch.equal(a, b), name
    return again


@pytest.mark.exhaustive  # every head setting; make test-fast keeps test_head_scaling's save-and-reload of each kind
@pytest.mark.parametrize("method", sorted(SCALINGS))
@pytest.mark.parametrize("target", ["weight", "weight_and_bias"])
@pytest.mark.parametrize("tie", ["keep", "untie"])
def test_round_trip_tiny(tiny_kind, method, target, tie, tmp_path):
    _round_trip(make_tiny_encoder(tiny_kind), SCALINGS[method](target, tie), tmp_path)


@pytest.mark.integration
@pytest.mark.parametrize("method", sorted(SCALINGS))
@pytest.mark.parametrize("target", ["weight", "weight_and_bias"])
@pytest.mark.parametrize("tie", ["keep", "untie"])
def test_round_trip_headless_minilm(method, target, tie, tmp_path):
    _round_trip(_minilm(), SCALINGS[method](target, tie), tmp_path)


@pytest.mark.integration
def test_round_trip_minilm_after_training_steps(tmp_path, data_dir):
    """A few real optimizer steps (InfoNCE + FLOPS on scifact train pairs) move every tensor, bias included."""
    from lsr_run.data import load_dataset, training_examples
    from lsr_run.losses.ranking import InfoNCE, ScoredBatch
    from lsr_run.losses.regularizers import FlopsRegularizer

    enc = _minilm()
    ConstantScaling(k=16, target="weight_and_bias", tie="untie").apply(enc.mlm, inflate=16.0)
    bias0 = enc.mlm.get_output_embeddings().bias.detach().clone()
    ds = load_dataset("scifact", "train", None, str(data_dir / "scifact"))
    positives = training_examples(ds)
    qids = sorted(positives)[:4]
    queries = [ds.queries[q] for q in qids]
    docs = [ds.corpus.text(positives[q][0]) for q in qids]
    opt = torch.optim.AdamW(enc.parameters(), lr=1e-3)
    loss_fn, reg = InfoNCE(), FlopsRegularizer(warmup_steps=0)
    enc.train()
    for _ in range(3):
        q = enc.encode_batch(queries, 16)
        d = enc.encode_batch(docs, 64)
        scores = q @ d.T
        loss = loss_fn(ScoredBatch(scores.diagonal()[:, None], scores)) + reg(q, d, step=1)["reg"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not torch.equal(bias0, enc.mlm.get_output_embeddings().bias)
    _round_trip(enc, NoScaling(tie="keep"), tmp_path)


def test_folder_lacking_a_tensor_is_an_error(tmp_path):
    from safetensors.torch import load_file, save_file

    enc = make_tiny_encoder("bert")
    ConstantScaling(k=16, target="weight_and_bias", tie="untie").apply(enc.mlm)
    enc.save(tmp_path / "model")
    weights = tmp_path / "model" / "model.safetensors"
    tensors = load_file(weights)
    del tensors["cls.predictions.decoder.bias"]
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(LsrError, match="lacks tensor cls.predictions.decoder.bias"):
        SpladeEncoder.load(tmp_path / "model")


def test_folder_with_a_changed_tensor_is_an_error(tmp_path):
    from safetensors.torch import load_file, save_file

    enc = make_tiny_encoder("modernbert")
    enc.save(tmp_path / "model")
    weights = tmp_path / "model" / "model.safetensors"
    tensors = load_file(weights)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(LsrError, match=f"tensor {name} differs"):
        SpladeEncoder.load(tmp_path / "model")


def test_manifest_lists_every_tensor_and_tie(tmp_path):
    enc = make_tiny_encoder("bert")
    enc.save(tmp_path / "model")
    record = json.loads((tmp_path / "model" / "lsr_run.json").read_text())["weights"]
    names = {n for n, _ in enc.mlm.named_parameters(remove_duplicate=False)}
    assert names <= set(record["tensors"])
    assert ["bert.embeddings.word_embeddings.weight", "cls.predictions.decoder.weight"] in record["tied"]


def _sentence_transformers_vectors(path, texts, max_length):
    from sentence_transformers import SparseEncoder

    model = SparseEncoder(str(path), device="cpu")
    model.max_seq_length = max_length
    return model.encode(texts, convert_to_tensor=True, convert_to_sparse_tensor=False).float()


@pytest.mark.parametrize("kind", ["bert", "modernbert"])
def test_sentence_transformers_opens_the_folder(kind, tmp_path):
    enc = make_tiny_encoder(kind)
    ConstantScaling(k=4, target="weight_and_bias", tie="untie").apply(enc.mlm)
    with torch.no_grad():
        enc.mlm.get_output_embeddings().bias.add_(0.25)
    expected = _encode(enc)
    enc.save(tmp_path / "model", max_length=32)
    got = _sentence_transformers_vectors(tmp_path / "model", TEXTS, 32)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (tmp_path / "model" / "README.md").read_text().startswith("---\nlibrary_name: sentence-transformers")


@pytest.mark.integration
def test_sentence_transformers_opens_a_minilm_folder(tmp_path):
    enc = _minilm()
    expected = _encode(enc)
    enc.save(tmp_path / "model", max_length=32)
    got = _sentence_transformers_vectors(tmp_path / "model", TEXTS, 32)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
