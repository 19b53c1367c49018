"""Negative samplers: pure functions of (candidate pool, teacher scores, rng).

Randomness comes from ``item_rng(seed, epoch, query_id)``, a generator derived from the three values with a
stable hash, so a query's negatives depend only on them: resampled each epoch, identical after a resume,
identical across processes. Candidates arrive ranked (e.g. BM25 order) with positives already removed;
``scores`` are teacher scores for them, or None (then the pool's rank order stands in for scores).
When the pool holds fewer candidates than requested, samplers repeat candidates to fill the group (training
needs a fixed group size); the count of such queries is reported by ``sampling_stats``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from .errors import ConfigError


def stable_int(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def item_rng(seed: int, epoch: int, item: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(epoch), stable_int(item)])


def _as_scores(pool: list[str], scores: np.ndarray | None) -> np.ndarray:
    if scores is None:
        return -np.arange(len(pool), dtype=np.float64)  # rank order: best first
    return np.asarray(scores, dtype=np.float64)


def _fill(chosen: list[int], size: int, n: int, rng: np.random.Generator) -> list[int]:
    """Pad ``chosen`` to n by drawing (with repetition) from the pool when it is too small."""
    if len(chosen) >= n:
        return chosen[:n]
    extra = rng.integers(0, size, n - len(chosen)).tolist()
    return chosen + extra


@dataclass
class NegativeSampler:
    num_negatives: int = 3

    def __post_init__(self) -> None:
        if self.num_negatives < 1:
            raise ConfigError(f"sampling.num_negatives={self.num_negatives}: must be >= 1")

    def sample(self, pool: list[str], scores: np.ndarray | None, rng: np.random.Generator) -> list[str]:
        if not pool:
            raise ValueError("empty candidate pool")
        return [pool[i] for i in self.indices(_as_scores(pool, scores), rng)]

    def indices(self, scores: np.ndarray, rng: np.random.Generator) -> list[int]:  # pragma: no cover
        raise NotImplementedError


@dataclass
class TopKSampler(NegativeSampler):
    """The ``num_negatives`` highest-scored candidates (ties by pool order); ``depth`` > 0 instead draws
    them uniformly from the top ``depth`` (the common "random among BM25 top-50")."""

    depth: int = 0

    def indices(self, scores: np.ndarray, rng: np.random.Generator) -> list[int]:
        order = np.argsort(-scores, kind="stable")
        if self.depth and self.depth > self.num_negatives:
            top = order[: self.depth]
            picked = rng.choice(len(top), size=min(self.num_negatives, len(top)), replace=False)
            return _fill([int(top[i]) for i in picked], len(scores), self.num_negatives, rng)
        return _fill([int(i) for i in order[: self.num_negatives]], len(scores), self.num_negatives, rng)


@dataclass
class RandomSampler(NegativeSampler):
    """Uniformly from the pool, without replacement."""

    def indices(self, scores: np.ndarray, rng: np.random.Generator) -> list[int]:
        k = min(self.num_negatives, len(scores))
        return _fill(rng.choice(len(scores), size=k, replace=False).tolist(), len(scores), self.num_negatives, rng)


@dataclass
class StratifiedSampler(NegativeSampler):
    """One negative from each of ``num_negatives`` strata of the query's teacher-score range
    ("Beyond Hard Negatives", arXiv 2604.04734): equal-width bins over [min, max] (``strata: width``) or
    equal-count bins (``strata: quantile``). An empty stratum is refilled from its nearest non-empty
    neighbours (nearer first, the higher-scored side on a tie), without reusing a candidate while others remain.
    """

    strata: str = "width"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.strata not in ("width", "quantile"):
            raise ConfigError(f"sampling.strata={self.strata}: allowed width, quantile")

    def bins(self, scores: np.ndarray) -> np.ndarray:
        """Stratum index per candidate, 0 = highest scores."""
        n = self.num_negatives
        if self.strata == "quantile":
            order = np.argsort(-scores, kind="stable")
            bins = np.empty(len(scores), dtype=np.int64)
            bins[order] = (np.arange(len(scores)) * n) // max(len(scores), 1)
            return bins
        hi, lo = float(scores.max()), float(scores.min())
        if hi == lo:
            return (np.arange(len(scores)) * n) // len(scores)
        frac = (hi - scores) / (hi - lo)  # 0 at the top score, 1 at the bottom
        return np.minimum((frac * n).astype(np.int64), n - 1)

    def indices(self, scores: np.ndarray, rng: np.random.Generator) -> list[int]:
        n = self.num_negatives
        bins = self.bins(scores)
        members = [list(np.nonzero(bins == s)[0]) for s in range(n)]
        for m in members:
            rng.shuffle(m)
        chosen: list[int] = []
        for s in range(n):
            for offset in range(n):  # nearest non-empty stratum: s, s-1, s+1, s-2, ...
                picked = False
                for t in ((s - offset, s + offset) if offset else (s,)):
                    if 0 <= t < n and members[t]:
                        chosen.append(int(members[t].pop()))
                        picked = True
                        break
                if picked:
                    break
        return _fill(chosen, len(scores), n, rng)


def softmax_entropy(scores: np.ndarray) -> float:
    z = scores - scores.max()
    p = np.exp(z) / np.exp(z).sum()
    return float(-(p * np.log(np.clip(p, 1e-30, None))).sum())
