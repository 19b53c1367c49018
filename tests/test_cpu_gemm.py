"""fp32 CPU linear layers through oneDNN (encode.cpu_gemm): as exact as the default BLAS, against float64."""

import copy

import pytest
import torch
from torch.nn import functional as F

from lsr_run.errors import ConfigError
from lsr_run.models import cpu_gemm
from lsr_run.models.splade import SpladeEncoder

from conftest import make_tiny_encoder

needs_onednn = pytest.mark.skipif(not cpu_gemm._op_available(), reason="this torch build lacks oneDNN's linear")


@pytest.fixture
def backend():
    """Set the process-wide backend inside a test and restore 'auto' after it."""
    yield cpu_gemm.set_backend
    cpu_gemm.set_backend("auto")


def _relative_errors(fn, x64, w64, b64, grad64):
    """fn's output and gradients in fp32 against float64 autograd: max |error| / max |truth| each."""
    x, w = x64.float().requires_grad_(), w64.float().requires_grad_()
    b = None if b64 is None else b64.float().requires_grad_()
    y = fn(x, w, b)
    y.backward(grad64.float())
    x_ref, w_ref = x64.clone().requires_grad_(), w64.clone().requires_grad_()
    b_ref = None if b64 is None else b64.clone().requires_grad_()
    y_ref = F.linear(x_ref, w_ref, b_ref)
    y_ref.backward(grad64)
    pairs = [(y, y_ref), (x.grad, x_ref.grad), (w.grad, w_ref.grad)] + ([] if b is None else [(b.grad, b_ref.grad)])
    return [float((a.detach().double() - r.detach()).abs().max() / r.detach().abs().max()) for a, r in pairs]


@needs_onednn
@pytest.mark.parametrize("shape", [(7, 96), (3, 20, 96)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_onednn_linear_and_its_gradients_are_as_exact_as_the_default(backend, shape, with_bias):
    backend("onednn")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    w = torch.randn(160, 96, generator=g, dtype=torch.float64)
    b = torch.randn(160, generator=g, dtype=torch.float64) if with_bias else None
    grad = torch.randn(*shape[:-1], 160, generator=g, dtype=torch.float64)
    onednn = _relative_errors(cpu_gemm.linear, x, w, b, grad)
    default = _relative_errors(F.linear, x, w, b, grad)
    for mine, theirs in zip(onednn, default):
        assert mine < 1e-6 and mine < 10 * theirs + 1e-7, (onednn, default)


@needs_onednn
def test_the_backend_decides_the_path(backend, monkeypatch):
    calls = []
    real = cpu_gemm._dense
    monkeypatch.setattr(cpu_gemm, "_dense", lambda *a: calls.append(1) or real(*a))
    x, w = torch.randn(4, 8), torch.randn(5, 8)
    backend("mkl")
    assert torch.equal(cpu_gemm.linear(x, w), F.linear(x, w)) and not calls
    backend("onednn")
    cpu_gemm.linear(x, w)
    assert calls == [1]
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 stays on F.linear (oneDNN through autocast already)
        out = cpu_gemm.linear(x, w)
    assert out.dtype == torch.bfloat16 and calls == [1]
    cpu_gemm.linear(x.double(), w.double())
    assert calls == [1]


@needs_onednn
def test_auto_is_onednn_off_intel_x86_only(backend, monkeypatch):
    for vendor, machine, expected in [("AuthenticAMD", "x86_64", True), ("GenuineIntel", "x86_64", False),
                                      ("", "aarch64", False)]:
        monkeypatch.setattr(cpu_gemm, "cpu_vendor", lambda cpuinfo="/proc/cpuinfo", v=vendor: v)
        monkeypatch.setattr(cpu_gemm.platform, "machine", lambda m=machine: m)
        assert backend("auto") is expected, (vendor, machine)
    assert backend("onednn") is True and backend("mkl") is False


def test_cpu_vendor_reads_the_first_vendor_line(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\n\nprocessor\t: 1\n")
    assert cpu_gemm.cpu_vendor(str(info)) == "AuthenticAMD"
    assert cpu_gemm.cpu_vendor(str(tmp_path / "missing")) == ""


def test_a_bad_setting_names_its_key():
    from lsr_run.encoding import EncodeSpec

    with pytest.raises(ConfigError, match="encode.cpu_gemm=blas"):
        cpu_gemm.set_backend("blas")
    with pytest.raises(ConfigError, match="encode.cpu_gemm=fast"):
        EncodeSpec(cpu_gemm="fast")
    assert EncodeSpec(cpu_gemm="oneDNN").cpu_gemm == "oneDNN"


def test_encoder_linear_layers_are_swapped_in_place_and_save_as_before(tmp_path):
    encoder = make_tiny_encoder("bert")
    linears = [m for m in encoder.mlm.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is cpu_gemm.Linear for m in linears)
    before = {k: v.clone() for k, v in encoder.mlm.state_dict().items()}
    assert cpu_gemm.use_cpu_gemm(encoder.mlm) == 0  # idempotent
    twin = copy.deepcopy(encoder)
    assert all(type(m) is cpu_gemm.Linear for m in twin.mlm.modules() if isinstance(m, torch.nn.Linear))
    encoder.save(tmp_path / "model")
    loaded = SpladeEncoder.load(tmp_path / "model")
    after = loaded.mlm.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@needs_onednn
@pytest.mark.parametrize("kind", ["bert", "modernbert"])
def test_encoder_onednn_matches_default_blas_within_fp32_rounding(backend, kind):
    """Encode and one training gradient with either backend: each within fp32 rounding of float64."""
    encoder = make_tiny_encoder(kind).eval()  # no dropout: the same function on every side
    texts = ["sparse retrieval with learned term weights", "a", "lucene impact index " * 12]
    batch = encoder.tokenize(texts, 64)
    truth_model = copy.deepcopy(encoder).double()
    backend("mkl")
    with torch.no_grad():
        truth = truth_model(batch["input_ids"], batch["attention_mask"]).double()
    results = {}
    for name in ("mkl", "onednn"):
        backend(name)
        model = copy.deepcopy(encoder)
        model.zero_grad()
        out = model(batch["input_ids"], batch["attention_mask"])
        out.sum().backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        results[name] = (out.detach(), grads)
    scale = float(truth.abs().max())
    for name, (out, _) in results.items():
        assert float((out.double() - truth).abs().max()) < 1e-5 * max(1.0, scale), name
    grads_mkl, grads_dnn = results["mkl"][1], results["onednn"][1]
    assert grads_mkl.keys() == grads_dnn.keys()
    for key in grads_mkl:
        top = float(grads_mkl[key].abs().max())
        assert float((grads_dnn[key] - grads_mkl[key]).abs().max()) <= 1e-4 * max(top, 1e-3), key
