"""Head scaling lands on exactly the intended tensors, norms match the request, and survives reload."""

import pytest
import torch

from lsr_run.errors import ConfigError
from lsr_run.models.head_scaling import ConstantScaling, MatchNorm, NoScaling, decoder_of, is_tied
from lsr_run.models.splade import SpladeEncoder

from conftest import make_tiny_encoder


def _snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_constant_untie_scales_only_the_decoder(tiny_kind):
    enc = make_tiny_encoder(tiny_kind)
    model = enc.mlm
    assert is_tied(model)
    before = _snapshot(model)
    record = ConstantScaling(k=16, target="weight", tie="untie").apply(model)
    after = _snapshot(model)
    assert not is_tied(model)
    assert record["untied"] is True
    embed_name = next(n for n, p in model.named_parameters() if p is model.get_input_embeddings().weight)
    dec_w = decoder_of(model).weight
    torch.testing.assert_close(after[embed_name], before[embed_name])  # input embeddings untouched
    torch.testing.assert_close(dec_w, before[embed_name] / 16)
    changed = [n for n in after if n in before and not torch.equal(after[n], before[n])]
    assert changed == [], changed  # nothing else among the pre-existing parameters changed
    step = record["steps"][0]["records"][0]
    assert step["factor"] == pytest.approx(1 / 16)
    assert step["norm_after"] == pytest.approx(step["norm_before"] / 16, rel=1e-5)


def test_constant_keep_scales_shared_embeddings(tiny_kind):
    model = make_tiny_encoder(tiny_kind).mlm
    w0 = model.get_input_embeddings().weight.detach().clone()
    bias0 = decoder_of(model).bias.detach().clone()
    record = ConstantScaling(k=4, target="weight", tie="keep").apply(model)
    assert is_tied(model)
    torch.testing.assert_close(model.get_input_embeddings().weight, w0 / 4)
    torch.testing.assert_close(decoder_of(model).bias, bias0)  # bias untouched with target=weight
    names = record["steps"][0]["records"][0]["tensors"]
    assert len(names) >= 1 and any("embed" in n for n in names)


def test_weight_and_bias_scales_logits_exactly(tiny_kind):
    enc = make_tiny_encoder(tiny_kind)
    enc.eval()
    with torch.no_grad():
        decoder_of(enc.mlm).bias.normal_()
    ref = make_tiny_encoder(tiny_kind)
    ref.load_state_dict(enc.state_dict())
    ref.eval()
    batch = enc.tokenize(["sparse retrieval with lucene"], 16)
    with torch.no_grad():
        before = enc.logits(batch["input_ids"], batch["attention_mask"])
    ConstantScaling(k=8, target="weight_and_bias", tie="untie").apply(enc.mlm)
    with torch.no_grad():
        after = enc.logits(batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(after, before / 8, rtol=1e-4, atol=1e-5)
    assert torch.equal(after > 0, before > 0)


def test_match_norm_hits_reference(tiny_kind):
    model = make_tiny_encoder(tiny_kind).mlm
    record = MatchNorm(reference_norm=12.5).apply(model)
    assert decoder_of(model).weight.norm().item() == pytest.approx(12.5, rel=1e-5)
    assert record["decoder_norm"] == pytest.approx(12.5, rel=1e-5)


def test_inflate_then_correct_restores_norm(tiny_kind):
    model = make_tiny_encoder(tiny_kind).mlm
    n0 = decoder_of(model).weight.norm().item()
    e0 = model.get_input_embeddings().weight.detach().clone()
    ConstantScaling(k=16, tie="keep").apply(model, inflate=16.0)
    assert decoder_of(model).weight.norm().item() == pytest.approx(n0, rel=1e-5)
    torch.testing.assert_close(model.get_input_embeddings().weight, e0)  # inflating always unties first
    model2 = make_tiny_encoder(tiny_kind).mlm
    NoScaling().apply(model2, inflate=16.0)
    assert decoder_of(model2).weight.norm().item() == pytest.approx(16 * n0, rel=1e-5)


def test_scaling_survives_save_and_reload(tiny_kind, tmp_path):
    enc = make_tiny_encoder(tiny_kind)
    record = ConstantScaling(k=16, target="weight_and_bias", tie="untie").apply(enc.mlm)
    enc.settings["head_scaling"] = record
    enc.eval()
    texts = ["what is splade", "learned sparse retrieval builds term weights from mlm logits"]
    with torch.no_grad():
        expected = enc.encode_batch(texts, 32)
    enc.save(tmp_path / "model")
    again = SpladeEncoder.load(tmp_path / "model")
    again.eval()
    with torch.no_grad():
        got = again.encode_batch(texts, 32)
    assert torch.equal(expected, got)
    assert not is_tied(again.mlm)
    assert again.settings["head_scaling"]["factor"] == pytest.approx(1 / 16)


def test_bad_scaling_config():
    with pytest.raises(ConfigError, match="head_scaling.k"):
        ConstantScaling(k=0)
    with pytest.raises(ConfigError, match="head_scaling.target"):
        ConstantScaling(target="bias")
    with pytest.raises(ConfigError, match="head_scaling.tie"):
        ConstantScaling(tie="maybe")
    with pytest.raises(ConfigError, match="reference_norm"):
        MatchNorm(reference_norm=-1)
