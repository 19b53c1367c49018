"""Sampler contracts: size, no positives, determinism per seed, strata coverage, short pools."""

import numpy as np
import pytest

from lsr_run.errors import ConfigError
from lsr_run.sampling import RandomSampler, StratifiedSampler, TopKSampler, item_rng, softmax_entropy

POOL = [f"d{i}" for i in range(20)]
SCORES = np.linspace(10.0, 0.0, 20)  # d0 best ... d19 worst


@pytest.mark.parametrize("sampler", [TopKSampler(4), RandomSampler(4), StratifiedSampler(4),
                                     StratifiedSampler(4, strata="quantile"), TopKSampler(4, depth=10)])
def test_size_membership_and_determinism(sampler):
    a = sampler.sample(POOL, SCORES, item_rng(1, 0, "q1"))
    b = sampler.sample(POOL, SCORES, item_rng(1, 0, "q1"))
    assert a == b
    assert len(a) == 4 and len(set(a)) == 4
    assert set(a) <= set(POOL)
    others = [tuple(sampler.sample(POOL, SCORES, item_rng(s, e, "q1"))) for s, e in [(2, 0), (1, 1), (3, 5)]]
    if not isinstance(sampler, TopKSampler) or sampler.depth:
        assert any(o != tuple(a) for o in others)  # seed and epoch change the draw


def test_topk_takes_highest_scores():
    shuffled = np.array(SCORES)[::-1].copy()  # now d19 has the best score
    assert TopKSampler(3).sample(POOL, shuffled, item_rng(0, 0, "q")) == ["d19", "d18", "d17"]
    assert TopKSampler(3).sample(POOL, None, item_rng(0, 0, "q")) == ["d0", "d1", "d2"]  # pool rank


def test_stratified_covers_every_stratum():
    sampler = StratifiedSampler(4)
    for seed in range(20):
        picked = sampler.sample(POOL, SCORES, item_rng(seed, 0, "q"))
        strata = sorted(int(p[1:]) // 5 for p in picked)  # equal width: 5 candidates per stratum here
        assert strata == [0, 1, 2, 3]


def test_stratified_refills_empty_strata_from_neighbours():
    scores = np.array([10.0, 9.9, 9.8, 9.7, 0.0])  # middle strata empty
    picked = StratifiedSampler(4).sample(["a", "b", "c", "d", "e"], scores, item_rng(0, 0, "q"))
    assert len(set(picked)) == 4 and "e" in picked


def test_fewer_candidates_than_requested_repeats():
    for sampler in (TopKSampler(5), RandomSampler(5), StratifiedSampler(5)):
        picked = sampler.sample(["a", "b"], np.array([1.0, 0.0]), item_rng(0, 0, "q"))
        assert len(picked) == 5 and set(picked) == {"a", "b"}


def test_stratified_keeps_more_variance_than_topk():
    rng = np.random.default_rng(0)
    var_top, var_strat = [], []
    for q in range(50):
        scores = np.sort(rng.normal(size=100))[::-1]
        pool = [f"d{i}" for i in range(100)]
        for sampler, acc in ((TopKSampler(7), var_top), (StratifiedSampler(7), var_strat)):
            picked = sampler.sample(pool, scores, item_rng(0, 0, str(q)))
            acc.append(np.var([scores[int(p[1:])] for p in picked]))
    assert np.mean(var_strat) > 5 * np.mean(var_top)


def test_entropy_and_bad_config():
    assert softmax_entropy(np.zeros(4)) == pytest.approx(np.log(4))
    with pytest.raises(ConfigError, match="num_negatives"):
        RandomSampler(0)
    with pytest.raises(ConfigError, match="strata"):
        StratifiedSampler(3, strata="log")


def test_sampling_stats_are_recorded_where_the_run_directory_says(tmp_path):
    import json

    from lsr_run.run_dir import RunDir
    from lsr_run.sampling_stats import record_sampling_stats
    from lsr_run.train import TrainingData

    teacher = {f"q{i}": {d: float(s) for d, s in zip(POOL, SCORES + i)} for i in range(3)}
    data = TrainingData({q: q for q in teacher}, {q: ["d0"] for q in teacher}, {q: POOL[1:] for q in teacher},
                        corpus=None, teacher=teacher)
    run = RunDir(tmp_path / "run")
    stats = record_sampling_stats(data, TopKSampler(3), seed=0, run=run)
    assert json.loads(run.sampling_stats.read_text()) == stats
    # every group is the positive d0 and the top-3 negatives d1..d3
    assert stats["queries"] == 3 and stats["sampler"] == "TopKSampler"
    assert stats["teacher_variance"] == pytest.approx(np.var(SCORES[:4]))
    assert run.sampling_plot.is_file()


def test_random_documents_from_the_whole_corpus_extend_each_pool():
    """``candidates.random``: N more documents per query, none a positive or already pooled, a function of the
    query id and the pool seed alone (every sampler and training seed sees the same pool)."""
    from lsr_run.candidates import CandidateSource, add_random
    from lsr_run.data import Corpus

    corpus = Corpus.from_dicts({}, {f"d{i}": f"text {i}" for i in range(500)})
    positives = {"q1": ["d0"], "q2": ["d1", "d2"], "q3": ["d3"]}
    pools = {"q1": ["d5", "d6"], "q2": ["d7"], "q3": ["d8"]}
    got = add_random(pools, positives, corpus, 100)
    for q, pool in got.items():
        assert pool[: len(pools[q])] == pools[q] and len(pool) == len(pools[q]) + 100
        assert len(set(pool)) == len(pool) and not set(pool) & set(positives[q]) and set(pool) <= set(corpus)
    assert got == add_random(pools, positives, corpus, 100)
    assert add_random({"q1": pools["q1"]}, positives, corpus, 100)["q1"] == got["q1"]  # other queries do not matter
    assert add_random(pools, positives, corpus, 100, seed=1)["q1"] != got["q1"]
    assert got["q1"][2:] != got["q2"][1:]
    whole = add_random({"q1": ["d5"]}, positives, corpus, 10_000)["q1"]  # more than the corpus holds
    assert sorted(whole) == sorted(d for d in corpus if d != "d0")
    assert add_random(pools, positives, corpus, 0) is pools
    with pytest.raises(ConfigError, match="candidates.random=-1"):
        CandidateSource(random=-1)


def test_the_random_pool_key_leaves_older_records_valid():
    """``candidates.random`` at 0 is left out of the training key and the run identity, so a run recorded before
    the key existed still matches; any other value is part of both."""
    from omegaconf import OmegaConf

    from lsr_run import provenance as prov
    from lsr_run.pipeline import _identity

    old = {"candidates": {"depth": 50}, "train": {"lr": 1e-4, "log_every": 5}, "seed": 1}
    now = {"candidates": {"depth": 50, "random": 0}, "train": {"lr": 1e-4, "log_every": 9}, "seed": 1}
    more = {"candidates": {"depth": 50, "random": 100}, "train": {"lr": 1e-4}, "seed": 1}
    key = prov.digest(prov.train_inputs(old, "x"))
    assert prov.digest(prov.train_inputs(now, "x")) == key
    assert prov.differences(prov.train_inputs(old, "x"), prov.train_inputs(more, "x")) == ["candidates.random"]
    assert _identity(OmegaConf.create(old)) == _identity(OmegaConf.create(now))
    assert _identity(OmegaConf.create(more)) != _identity(OmegaConf.create(now))
