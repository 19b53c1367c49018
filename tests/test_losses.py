"""Each loss against values computed by hand; the FLOPS schedule."""

import math

import pytest
import torch

from lsr_run.errors import ConfigError
from lsr_run.losses import FlopsRegularizer, InfoNCE, KLDivergence, MarginMSE, ScoredBatch, WeightedSum
from lsr_run.losses.regularizers import flops, quadratic_warmup


def _batch(teacher=True):
    group = torch.tensor([[3.0, 1.0, 0.0], [2.0, 2.0, 1.0]])
    all_scores = torch.tensor([[3.0, 1.0, 0.0, 0.5, 0.5, 0.5],
                               [1.0, 0.0, 0.0, 2.0, 2.0, 1.0]])
    t = torch.tensor([[5.0, 4.0, 1.0], [3.0, 1.0, 0.0]]) if teacher else None
    return ScoredBatch(group, all_scores, t)


def test_infonce_in_batch_hand_computed():
    b = _batch()
    row0 = -3.0 + math.log(sum(math.exp(x) for x in [3.0, 1.0, 0.0, 0.5, 0.5, 0.5]))
    row1 = -2.0 + math.log(sum(math.exp(x) for x in [1.0, 0.0, 0.0, 2.0, 2.0, 1.0]))
    assert InfoNCE()(b).item() == pytest.approx((row0 + row1) / 2, rel=1e-6)


def test_infonce_without_in_batch_uses_group_only():
    b = _batch()
    row0 = -3.0 + math.log(math.exp(3) + math.exp(1) + 1)
    row1 = -2.0 + math.log(2 * math.exp(2) + math.exp(1))
    assert InfoNCE(in_batch=False)(b).item() == pytest.approx((row0 + row1) / 2, rel=1e-6)


def test_margin_mse_hand_computed():
    # student margins: [2, 3], [0, 1]; teacher margins: [1, 4], [2, 3]
    expected = ((2 - 1) ** 2 + (3 - 4) ** 2 + (0 - 2) ** 2 + (1 - 3) ** 2) / 4
    assert MarginMSE()(_batch()).item() == pytest.approx(expected)


def test_kl_div_hand_computed():
    def softmax(v):
        e = [math.exp(x) for x in v]
        return [x / sum(e) for x in e]

    total = 0.0
    for s, t in (([3.0, 1.0, 0.0], [5.0, 4.0, 1.0]), ([2.0, 2.0, 1.0], [3.0, 1.0, 0.0])):
        p, q = softmax(t), softmax(s)
        total += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    assert KLDivergence()(_batch()).item() == pytest.approx(total / 2, rel=1e-6)
    t2 = KLDivergence(temperature=2.0)(_batch()).item()
    assert t2 < total / 2  # a higher temperature flattens both distributions


def test_weighted_sum():
    b = _batch()
    combo = WeightedSum({"kl": {"loss": KLDivergence(), "weight": 0.5}, "nce": {"loss": InfoNCE(), "weight": 2.0}})
    assert combo(b).item() == pytest.approx(0.5 * KLDivergence()(b).item() + 2.0 * InfoNCE()(b).item(), rel=1e-6)
    assert combo.needs_teacher


def test_teacher_losses_need_teacher():
    with pytest.raises(ConfigError, match="teacher"):
        MarginMSE()(_batch(teacher=False))


def test_flops_value_and_quadratic_warmup():
    w = torch.tensor([[1.0, 0.0, 2.0], [3.0, 0.0, 0.0]])
    assert flops(w).item() == pytest.approx(2.0 ** 2 + 0 + 1.0 ** 2)
    reg = FlopsRegularizer(lambda_q=0.3, lambda_d=0.1, warmup_steps=10)
    assert reg.weights_at(0) == (0.0, 0.0)
    assert reg.weights_at(5) == pytest.approx((0.3 * 0.25, 0.1 * 0.25))
    assert reg.weights_at(10) == pytest.approx((0.3, 0.1))
    assert reg.weights_at(1000) == pytest.approx((0.3, 0.1))
    out = reg(w, w, step=5)
    assert out["reg"].item() == pytest.approx((0.075 + 0.025) * 5.0)
    assert quadratic_warmup(3, 0) == 1.0


def test_regularizer_rejects_negative_weight():
    with pytest.raises(ConfigError, match="regularizer.lambda_q"):
        FlopsRegularizer(lambda_q=-1.0)
