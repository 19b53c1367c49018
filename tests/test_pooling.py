"""SPLADE pooling: masking, max-before-activation, and the chunked max-logits projection."""

import pytest
import torch

from lsr_run.models.max_logits import _forward, max_logits
from lsr_run.models.splade import splade_pool

from conftest import make_tiny_encoder


def test_pool_ignores_padding():
    logits = torch.tensor([[[1.0, -1.0], [5.0, 2.0], [9.0, 9.0]]])  # third token is padding
    mask = torch.tensor([[1, 1, 0]])
    out = splade_pool(logits, mask)
    assert torch.allclose(out, torch.log1p(torch.tensor([[5.0, 2.0]])))


def test_max_before_activation_equals_activation_before_max():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 50) * 3
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 4:] = 0
    reference = torch.log1p(torch.relu(logits)).masked_fill(~mask.bool().unsqueeze(-1), 0).amax(1)
    assert torch.equal(splade_pool(logits, mask), reference)


def test_max_logits_matches_full_projection_and_gradients():
    torch.manual_seed(0)
    hidden = torch.randn(3, 6, 8, requires_grad=True)
    weight = torch.randn(37, 8, requires_grad=True)
    bias = torch.randn(37, requires_grad=True)
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3, [1, 1, 0, 0, 0, 0]])
    full = (hidden @ weight.T + bias).masked_fill(~mask.bool().unsqueeze(-1), float("-inf")).amax(1)
    chunked = max_logits(hidden, weight, bias, mask, chunk=10)
    assert torch.allclose(full, chunked, atol=1e-6)
    g = torch.randn_like(full)
    grads_full = torch.autograd.grad((full * g).sum(), [hidden, weight, bias])
    grads_chunked = torch.autograd.grad((chunked * g).sum(), [hidden, weight, bias])
    for a, b in zip(grads_full, grads_chunked):
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("sparsity", [0.0, 0.97])
@pytest.mark.parametrize("relu", [False, True])
def test_sparse_backward_equals_autograd_on_the_full_projection(dtype, tied, sparsity, relu):
    """Values and gradients of hidden, decoder weight (tied to an input embedding or not) and bias, against
    autograd through (B, L, V) logits; bf16 inputs are compared on the same bf16-rounded values. ``relu``: the
    output goes through SPLADE's log(1 + relu), and ``relu_follows`` keeps winning tokens for live entries only."""
    torch.manual_seed(3)
    b, length, width, vocab = 4, 11, 16, 300
    ids = torch.randint(0, vocab, (b, length))
    mask = torch.ones(b, length, dtype=torch.long)
    mask[1, 7:], mask[3, 2:] = 0, 0
    base = (torch.randn(vocab, width) * 0.5).to(dtype).float()
    proj = (torch.randn(width, width) * 0.3).to(dtype).float()
    bias0 = torch.randn(vocab).to(dtype).float()
    upstream = torch.randn(b, vocab)
    upstream[torch.rand(b, vocab) < sparsity] = 0  # relu zeroes most entries once training has sparsified

    def run(sparse: bool):
        weight = base.clone().requires_grad_()
        embed = weight if tied else base.clone().requires_grad_()
        bias = bias0.clone().requires_grad_()
        hidden = (embed[ids] @ proj).to(dtype)  # the "encoder": input embeddings -> hidden states
        if sparse:
            out = max_logits(hidden, weight.to(dtype), bias, mask, chunk=64, relu_follows=relu)
        else:
            logits = hidden.float() @ weight.to(dtype).float().T + bias
            if dtype == torch.float32:
                out = logits.masked_fill(~mask.bool().unsqueeze(-1), float("-inf")).amax(1)
            else:  # bf16 rounding makes exact ties, which amax splits: route through the same winning tokens
                _, winners = _forward(hidden.detach(), weight.detach().to(dtype), mask, 64, with_index=True)
                out = logits.gather(1, winners.unsqueeze(1)).squeeze(1)
        if relu:
            out = torch.log1p(torch.relu(out))
        (out * upstream).sum().backward()
        return out.detach(), weight.grad, bias.grad, (None if tied else embed.grad)

    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for got, want in zip(run(True), run(False)):
        if want is not None:
            torch.testing.assert_close(got, want, **tol)


def test_relu_follows_keeps_winners_of_live_entries_only_and_refuses_a_gradient_elsewhere():
    """With ``relu_follows`` the winning tokens of live entries (max logit + bias > 0) are those of the full
    index, the rest are -1; a gradient that reaches a dead entry (no relu after all) raises instead of going to a
    wrong token."""
    torch.manual_seed(5)
    hidden, weight, bias = torch.randn(3, 7, 8), torch.randn(9000, 8), torch.randn(9000) - 2.0
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] + [0] * 6])
    values, full = _forward(hidden, weight, mask, 4096, with_index=True, per_row=True)
    _, live_only = _forward(hidden, weight, mask, 4096, with_index=True, per_row=True, live_bias=bias)
    live = values + bias > 0
    assert 0 < int(live.sum()) < live.numel()
    assert torch.equal(live_only[live], full[live]) and bool((live_only[~live] == -1).all())
    weight.requires_grad_()
    out = max_logits(hidden, weight, bias, mask, chunk=64, relu_follows=True)
    with pytest.raises(RuntimeError, match="relu_follows"):
        out.sum().backward()  # every entry gets a gradient: not what a relu would pass


def test_max_logits_inference_path_equals_the_autograd_path():
    torch.manual_seed(0)
    hidden, weight, bias = torch.randn(3, 6, 8), torch.randn(37, 8), torch.randn(37)
    for mask in (torch.tensor([[1] * 6, [1] * 3 + [0] * 3, [1, 1, 0, 0, 0, 0]]), torch.ones(3, 6, dtype=torch.long)):
        full = (hidden @ weight.T + bias).masked_fill(~mask.bool().unsqueeze(-1), float("-inf")).amax(1)
        with torch.inference_mode():  # the encoding path: no index kept, no mask pass without padding
            fast = max_logits(hidden, weight, bias, mask, chunk=10)
        slow = max_logits(hidden, weight.requires_grad_(), bias, mask, chunk=10)
        weight.requires_grad_(False)
        assert torch.allclose(full, fast, atol=1e-6) and torch.equal(fast, slow.detach())


def test_per_text_and_batched_tilings_agree():
    from lsr_run.models.max_logits import _forward

    torch.manual_seed(1)
    hidden, weight = torch.randn(4, 9, 8), torch.randn(20000, 8)  # more entries than one per-text tile
    mask = torch.tensor([[1] * 9, [1] * 5 + [0] * 4, [1] * 2 + [0] * 7, [1] * 9])
    full = (hidden @ weight.T).masked_fill(~mask.bool().unsqueeze(-1), float("-inf"))
    for with_index in (False, True):
        rows = _forward(hidden, weight, mask, 4096, with_index, per_row=True)
        batched = _forward(hidden, weight, mask, 4096, with_index, per_row=False)
        assert torch.allclose(rows[0], full.amax(1), atol=1e-5) and torch.allclose(batched[0], full.amax(1), atol=1e-5)
        if with_index:
            assert torch.equal(rows[1], full.argmax(1)) and torch.equal(batched[1], full.argmax(1))


def test_encoder_chunked_equals_full(tiny_kind):
    chunked = make_tiny_encoder(tiny_kind, chunk=1000)
    full = make_tiny_encoder(tiny_kind, chunk=0)
    full.load_state_dict(chunked.state_dict())
    chunked.eval()
    full.eval()
    texts = ["a short query", "a much longer document about sparse retrieval and lucene impact indexes"]
    with torch.no_grad():
        a = chunked.encode_batch(texts, 32)
        b = full.encode_batch(texts, 32)
    assert a.shape == (2, chunked.vocab_size)
    assert torch.allclose(a, b, atol=1e-5)
    assert (a >= 0).all()


def test_encode_batches_keep_input_order(tiny_encoder):
    tiny_encoder.eval()
    texts = ["x " * n for n in (1, 9, 3, 7, 2)]
    seen = {}
    for positions, weights in tiny_encoder.encode(texts, max_length=16, batch_size=2, bf16=False):
        for p, w in zip(positions, weights):
            seen[p] = w
    assert sorted(seen) == list(range(5))
    with torch.no_grad():
        direct = tiny_encoder.encode_batch([texts[3]], 16)[0]
    assert torch.allclose(seen[3], direct, atol=1e-5)


def _texts(n=40, seed=0):
    import random

    rng = random.Random(seed)
    words = "sparse lucene impact index query document term weight vocabulary head norm".split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(1, 30))) for _ in range(n)]


def _encoded(encoder, texts, **kw):
    out = {}
    for positions, weights in encoder.encode(texts, 24, bf16=False, **kw):
        out.update(zip(positions, weights))
    return torch.stack([out[i] for i in range(len(texts))])


def test_token_budget_batches_fit_the_budget_and_encode_like_fixed_batches(tiny_kind):
    encoder = make_tiny_encoder(tiny_kind)
    texts = _texts()
    batches, ids = encoder.token_batches(texts, 24, batch_size=64, max_tokens=100)
    assert sorted(p for b in batches for p in b) == list(range(len(texts)))  # every text once
    assert all(len(b) * max(len(ids[p]) for p in b) <= 100 for b in batches)
    sizes = [len(b) for b in batches]
    assert sizes[0] < max(sizes)  # long texts in small batches, short ones in large
    assert max(len(b) for b in encoder.token_batches(texts, 24, batch_size=3, max_tokens=10_000)[0]) == 3
    # padding as the tokenizer pads: the same tensors for one batch
    reference = encoder.tokenize([texts[p] for p in batches[1]], 24, device=None)
    collated = encoder.collate([ids[p] for p in batches[1]])
    assert all(torch.equal(reference[k], collated[k]) for k in ("input_ids", "attention_mask"))
    fixed = _encoded(encoder, texts, batch_size=8)
    budget = _encoded(encoder, texts, batch_size=64, max_tokens=100)
    assert torch.allclose(fixed, budget, atol=1e-5)
    assert torch.allclose(_encoded(encoder, texts, max_tokens=1), fixed, atol=1e-5)  # one text a batch
    assert list(encoder.encode([], 24, max_tokens=100)) == []


def test_bf16_weights_encode_within_bf16_rounding_of_fp32(tiny_kind):
    import copy

    encoder = make_tiny_encoder(tiny_kind, active=0.05)
    texts = _texts(12, seed=1)
    fp32 = _encoded(encoder, texts, batch_size=4)
    half = copy.deepcopy(encoder).to(dtype=torch.bfloat16)
    assert next(half.parameters()).dtype == torch.bfloat16
    bf16 = _encoded(half, texts, batch_size=4)
    assert bf16.dtype == torch.float32 and bf16.shape == fp32.shape
    strong = fp32 > 0.1  # the terms that survive quantisation; bf16 keeps 8 bits of mantissa through 2 layers
    assert strong.any()
    assert torch.allclose(bf16[strong], fp32[strong], rtol=0.1, atol=0.02)
    assert ((bf16 > 0) == (fp32 > 0)).float().mean() > 0.95  # the same vocabulary, up to terms at the edge


def _train_forward(encoder, texts, bf16: bool):
    """Term weights with a gradient (as in training, dropout off), and the gradient of a weighted sum of them with
    respect to every parameter."""
    encoder.eval()
    encoder.zero_grad(set_to_none=True)
    batch = encoder.tokenize(texts, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = encoder(batch["input_ids"], batch["attention_mask"])
    (out * torch.linspace(0.5, 1.5, out.shape[1])).sum().backward()
    return out.detach(), torch.cat([p.grad.flatten() for p in encoder.parameters() if p.grad is not None])


def test_bf16_training_on_cpu_attends_in_fp32_with_sdpa_masks(tiny_kind, monkeypatch):
    """bf16 training on a CPU goes through ``lsr_run_sdpa``: attention in fp32 (faster there than the bf16 kernel's
    backward), padding masked as transformers' sdpa masks it, and no further from fp32 than the bf16 kernel is."""
    import copy

    import transformers.integrations.sdpa_attention as sdpa

    from lsr_run.models.attention import NAME

    encoder = make_tiny_encoder(tiny_kind, active=0.05)
    assert encoder.mlm.config._attn_implementation == NAME
    native = copy.deepcopy(encoder)
    native.mlm.set_attn_implementation("sdpa")
    texts = ["a short query", "a much longer document about sparse retrieval and lucene impact indexes " * 3]

    seen = []
    original = sdpa.sdpa_attention_forward

    def spy(module, query, key, value, mask, *args, **kwargs):
        seen.append((query.dtype, None if mask is None else mask.dtype))
        return original(module, query, key, value, mask, *args, **kwargs)

    monkeypatch.setattr(sdpa, "sdpa_attention_forward", spy)
    out, grads = _train_forward(encoder, texts, bf16=True)
    assert seen and all(dtype == torch.float32 and mask is not None for dtype, mask in seen)

    # padding stays masked: the short text alone equals the short text padded beside the long one
    alone, _ = _train_forward(encoder, texts[:1], bf16=True)
    assert torch.allclose(alone[0], out[0], rtol=0, atol=5e-4)  # attending padding moves it by ~3e-3

    ref_out, ref_grads = _train_forward(copy.deepcopy(native), texts, bf16=False)
    native_out, native_grads = _train_forward(native, texts, bf16=True)
    for ours, theirs, ref, bound in ((out, native_out, ref_out, 0.03), (grads, native_grads, ref_grads, 0.15)):
        err = (ours - ref).norm() / ref.norm()  # bf16's own rounding: ~1% on these outputs, ~6% on the gradients
        assert err < bound and err <= 1.1 * (theirs - ref).norm() / ref.norm() + 1e-4

    # no gradient (encoding), or fp32: transformers' sdpa itself, bit for bit
    seen.clear()
    batch = encoder.tokenize(texts, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        a = encoder(batch["input_ids"], batch["attention_mask"])
        b = native(batch["input_ids"], batch["attention_mask"])
    assert torch.equal(a, b) and all(dtype == torch.bfloat16 for dtype, _ in seen)
    fp32_out, fp32_grads = _train_forward(encoder, texts, bf16=False)
    assert torch.equal(fp32_out, ref_out) and torch.equal(fp32_grads, ref_grads)


def _near_threshold_case(seed: int, vocab: int = 5000, width: int = 64):
    """LayerNorm-scale hidden states and a decoder whose biases put every entry's fp32 max logit within 1e-3 of
    zero, half just above and half just below: the cases a loose or wrong bound would get wrong."""
    torch.manual_seed(seed)
    hidden = torch.nn.functional.layer_norm(torch.randn(3, 13, width), (width,)) * 1.5
    weight = torch.randn(vocab, width) / width ** 0.5
    mask = torch.ones(3, 13, dtype=torch.long)
    mask[1, 9:], mask[2, 1:] = 0, 0
    exact = (hidden.double() @ weight.double().T).masked_fill(~mask.bool().unsqueeze(-1), float("-inf")).amax(1)
    # one bias per entry: text 0 sits 1e-3 above or below zero, the others land where they land
    bias = (-exact[0] + torch.where(torch.rand(vocab) < 0.5, 1e-3, -1e-3)).float()
    return hidden, weight, bias, mask, exact


@pytest.mark.parametrize("with_index", [False, True])
def test_bf16_screening_keeps_every_live_entry_and_its_fp32_value(with_index):
    """Screening drops only entries it has proved dead: against a float64 projection, every entry whose max
    logit + bias is > 0 gets its fp32 value (and, ``with_index``, its winning token); dead ones come back <= -bias,
    so log(1 + relu) equals the unscreened output everywhere."""
    for seed in range(3):
        hidden, weight, bias, mask, exact = _near_threshold_case(seed)
        plain, plain_index = _forward(hidden, weight, mask, 4096, with_index, per_row=True, live_bias=bias,
                                      screen=False)
        screened, index = _forward(hidden, weight, mask, 4096, with_index, per_row=True, live_bias=bias, screen=True)
        live = exact + bias.double() > 0
        assert 0 < int(live[0].sum()) < live.shape[1]
        # the same fp32 sums in another order: a few ulps of logits up to about 5
        torch.testing.assert_close(screened[live], plain[live], rtol=1e-6, atol=5e-6)
        assert bool((screened[~live] + bias.expand_as(screened)[~live] <= 0).all())
        assert torch.equal(torch.log1p(torch.relu(screened + bias)) > 0, live)
        torch.testing.assert_close(torch.log1p(torch.relu(screened + bias)), torch.log1p(torch.relu(plain + bias)),
                                   rtol=1e-6, atol=5e-6)
        if with_index:
            assert torch.equal(index[live], plain_index[live]) and bool((index[~live] == -1).all())


def test_bf16_screening_follows_a_decoder_changed_in_place():
    """A decoder changed in place between calls (as AdamW's fused kernel does, without bumping the tensor's
    version) is screened with its new values: nothing of the old one is kept."""
    hidden, weight, bias, mask, _ = _near_threshold_case(7)
    param = torch.nn.Parameter(weight)
    optimizer = torch.optim.AdamW([param], lr=0.2, fused=True)
    with torch.no_grad():  # the same tensor object before and after the step
        before, _ = _forward(hidden, param, mask, 4096, False, per_row=True, live_bias=bias, screen=True)
        param.grad = torch.randn_like(param)  # each weight moves by the learning rate, up or down
        optimizer.step()
        after, _ = _forward(hidden, param, mask, 4096, False, per_row=True, live_bias=bias, screen=True)
        plain, _ = _forward(hidden, param, mask, 4096, False, per_row=True, live_bias=bias, screen=False)
    assert not torch.equal(before, after)
    torch.testing.assert_close(torch.log1p(torch.relu(after + bias)), torch.log1p(torch.relu(plain + bias)),
                               rtol=1e-6, atol=5e-6)


def test_screened_training_step_has_the_gradients_of_the_unscreened_one():
    """fp32 training through log(1 + relu): values and gradients (hidden, decoder, bias) with screening equal
    those without."""
    hidden0, weight0, bias0, mask, _ = _near_threshold_case(11)
    upstream = torch.randn(3, weight0.shape[0])

    def run(screen: bool):
        hidden, weight, bias = (t.clone().requires_grad_() for t in (hidden0, weight0, bias0))
        out = torch.log1p(torch.relu(max_logits(hidden, weight, bias, mask, relu_follows=True, screen=screen)))
        (out * upstream).sum().backward()
        return out.detach(), hidden.grad, weight.grad, bias.grad

    for got, want in zip(run(True), run(False)):  # fp32 sums in another order
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
