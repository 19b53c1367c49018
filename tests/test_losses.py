"""Each loss against values computed by hand; the FLOPS schedule; what a loss declares and what the trainer logs."""

import math

import pytest
import torch

from lsr_run.errors import ConfigError
from lsr_run.losses import (FlopsRegularizer, InfoNCE, KLDivergence, MarginMSE, NoRegularizer, RankingLoss,
                            ScoredBatch, WeightedSum)
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


# ---------------------------------------------------------------- values on fixed inputs, from the formulas


def _random_batch(b=4, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    all_scores = torch.randn(b, b * (1 + n), generator=g) * 3
    group = all_scores.view(b, b, -1)[torch.arange(b), torch.arange(b)]  # as train.scores_of takes it
    teacher = torch.randn(b, 1 + n, generator=g) * 2
    return ScoredBatch(group, all_scores, teacher)


def _lse(row):
    m = max(row)
    return m + math.log(sum(math.exp(x - m) for x in row))


def _expected(batch, temperature=1.0):
    """Each loss from its formula, in Python floats (float64), independently of torch.nn.functional."""
    a, g, t = batch.all_scores.tolist(), batch.group_scores.tolist(), batch.teacher.tolist()
    size, b = len(g[0]), len(g)
    nce_in_batch = sum(_lse([x / temperature for x in a[i]]) - a[i][i * size] / temperature for i in range(b)) / b
    nce_group = sum(_lse([x / temperature for x in g[i]]) - g[i][0] / temperature for i in range(b)) / b
    margin = sum(((g[i][0] - g[i][j]) - (t[i][0] - t[i][j])) ** 2 for i in range(b) for j in range(1, size))
    margin /= b * (size - 1)
    kl = 0.0
    for i in range(b):
        log_s = [x / temperature - _lse([y / temperature for y in g[i]]) for x in g[i]]
        log_t = [x / temperature - _lse([y / temperature for y in t[i]]) for x in t[i]]
        kl += sum(math.exp(lt) * (lt - ls) for lt, ls in zip(log_t, log_s))
    return {"infonce": nce_in_batch, "infonce_group": nce_group, "margin_mse": margin, "kl_div": kl / b}


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_every_loss_equals_its_formula_on_fixed_inputs(temperature):
    batch = _random_batch()
    expected = _expected(batch, temperature)
    losses = {"infonce": InfoNCE(temperature=temperature), "infonce_group": InfoNCE(temperature, in_batch=False),
              "margin_mse": MarginMSE(), "kl_div": KLDivergence(temperature=temperature)}
    if temperature != 1.0:  # Margin-MSE has no temperature: one value is enough
        expected.pop("margin_mse"), losses.pop("margin_mse")
    for name, loss in losses.items():
        value = loss.evaluate(batch)
        assert value.total.item() == pytest.approx(expected[name], rel=1e-5, abs=1e-6), name
        assert value.parts == {}  # a single loss is its total
        assert torch.equal(value.total, loss(batch)), name  # calling the loss and evaluating it agree exactly


def test_weighted_sum_parts_and_total_on_fixed_inputs():
    batch = _random_batch(seed=1)
    expected = _expected(batch)
    combo = WeightedSum({"kl_div": {"loss": KLDivergence(), "weight": 1.0},
                         "infonce": {"loss": InfoNCE(), "weight": 0.1},
                         "margin_mse": {"loss": MarginMSE(), "weight": 0.25}})
    value = combo.evaluate(batch)
    assert set(value.parts) == {"kl_div", "infonce", "margin_mse"}
    for name, part in value.parts.items():
        assert part == pytest.approx(expected[name], rel=1e-5, abs=1e-6), name
    total = 1.0 * expected["kl_div"] + 0.1 * expected["infonce"] + 0.25 * expected["margin_mse"]
    assert value.total.item() == pytest.approx(total, rel=1e-5)
    # the same float32 sum, in the same order, as the parts' own losses give it
    same = 0.0 + 1.0 * KLDivergence()(batch) + 0.1 * InfoNCE()(batch) + 0.25 * MarginMSE()(batch)
    assert torch.equal(value.total, same) and torch.equal(combo(batch), same)


# ---------------------------------------------------------------- what a loss declares


def test_needs_teacher_is_declared_by_the_type():
    assert (InfoNCE.needs_teacher, MarginMSE.needs_teacher, KLDivergence.needs_teacher) == (False, True, True)
    for loss in (InfoNCE(), MarginMSE(), KLDivergence()):
        assert "needs_teacher" not in vars(loss)  # the class says it, not the instance
        assert loss.needs_teacher is type(loss).needs_teacher
    plain = WeightedSum({"a": {"loss": InfoNCE()}, "b": {"loss": InfoNCE(in_batch=False), "weight": 0.5}})
    distilled = WeightedSum({"a": {"loss": InfoNCE()}, "kl": {"loss": KLDivergence()}})
    assert plain.needs_teacher is False and distilled.needs_teacher is True
    nested = WeightedSum({"inner": {"loss": distilled}})
    assert nested.needs_teacher is True
    with pytest.raises(AttributeError):
        distilled.needs_teacher = False  # derived from the parts: it cannot be set


def test_weighted_sum_refuses_a_part_that_is_not_a_ranking_loss():
    with pytest.raises(ConfigError, match="loss.losses.x.loss"):
        WeightedSum({"x": {"loss": torch.nn.MSELoss()}})


def test_regularizers_return_only_their_own_terms():
    w = torch.tensor([[1.0, 0.0, 2.0], [3.0, 0.0, 0.0]])
    assert set(FlopsRegularizer()(w, w, step=1)) == {"reg", "flops_q", "flops_d", "lambda_q", "lambda_d"}
    out = NoRegularizer()(w, w, step=1)
    assert set(out) == {"reg"} and out["reg"].item() == 0.0


# ---------------------------------------------------------------- what the trainer logs


class _Scaled:
    """A regularizer with its own statistic: the trainer must log it as given."""

    def __call__(self, queries, docs, step):
        norm = queries.abs().sum(1).mean()
        return {"reg": 1e-4 * norm, "query_l1": norm.detach()}


def _log(tmp_path):
    import json

    return [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]


def test_trainer_logs_the_parts_of_loss_and_regularizer(tmp_path):
    from test_robustness import _trainer

    loss = WeightedSum({"a": {"loss": InfoNCE()}, "b": {"loss": InfoNCE(in_batch=False), "weight": 0.5}})
    _trainer(tmp_path / "x", loss, regularizer=_Scaled(), max_steps=2).train()
    records = _log(tmp_path / "x")
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert {"loss_a", "loss_b", "query_l1", "reg", "rank_loss"} <= set(r)
        assert not {"flops_q", "flops_d", "lambda_q", "lambda_d"} & set(r)
        assert r["rank_loss"] == pytest.approx(r["loss_a"] + 0.5 * r["loss_b"], rel=1e-5)
        assert r["reg"] == pytest.approx(1e-4 * r["query_l1"], rel=1e-5)
        assert r["loss"] == pytest.approx(r["rank_loss"] + r["reg"], rel=1e-5)

    _trainer(tmp_path / "y", InfoNCE(), regularizer=NoRegularizer(), max_steps=1).train()
    (record,) = _log(tmp_path / "y")
    assert record["reg"] == 0.0 and record["loss"] == record["rank_loss"]
    assert not [k for k in record if k.startswith(("flops_", "lambda_", "loss_"))]

    from lsr_run.plots import plot_training
    from lsr_run.run_dir import RunDir

    assert plot_training(RunDir(tmp_path / "y" / "run")).is_file()  # a log without regularizer weights plots


def test_trainer_refuses_a_loss_that_is_not_a_ranking_loss(tmp_path):
    from test_robustness import _trainer

    class NotALoss:
        def __call__(self, batch):
            return batch.group_scores.sum()

    with pytest.raises(ConfigError, match="ranking loss"):
        _trainer(tmp_path, NotALoss())
    assert issubclass(InfoNCE, RankingLoss)
