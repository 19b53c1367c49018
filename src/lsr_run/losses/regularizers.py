"""Sparsity regularizers with weight schedules derived from the global step (resume-safe).

FLOPS (Paria et al., 2020), as used by SPLADE: sum over vocabulary of (mean activation over the batch)^2,
on queries and documents with separate weights, each warmed up quadratically:
lambda(step) = lambda * min(1, step / warmup_steps)^2.

A regularizer is called as ``reg(queries, docs, step)`` and returns a dict: ``"reg"``, the term added to the
ranking loss, and whatever else it wants in the training log (its own statistics only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError


def flops(weights: torch.Tensor) -> torch.Tensor:
    """(N, V) non-negative weights -> sum_j (mean_i w_ij)^2."""
    return torch.sum(torch.mean(torch.abs(weights), dim=0) ** 2)


def quadratic_warmup(step: int, warmup_steps: int) -> float:
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, step / warmup_steps) ** 2


@dataclass
class FlopsRegularizer:
    lambda_q: float = 3e-3
    lambda_d: float = 1e-3
    warmup_steps: int = 100

    def __post_init__(self) -> None:
        for key in ("lambda_q", "lambda_d"):
            if getattr(self, key) < 0:
                raise ConfigError(f"regularizer.{key}={getattr(self, key)}: must be >= 0")
        if self.warmup_steps < 0:
            raise ConfigError(f"regularizer.warmup_steps={self.warmup_steps}: must be >= 0")

    def weights_at(self, step: int) -> tuple[float, float]:
        factor = quadratic_warmup(step, self.warmup_steps)
        return self.lambda_q * factor, self.lambda_d * factor

    def __call__(self, queries: torch.Tensor, docs: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        wq, wd = self.weights_at(step)
        fq, fd = flops(queries), flops(docs)
        return {"flops_q": fq, "flops_d": fd, "reg": wq * fq + wd * fd, "lambda_q": wq, "lambda_d": wd}


@dataclass
class NoRegularizer:
    """No sparsity term: adds zero and logs nothing but ``reg``."""

    def __call__(self, queries: torch.Tensor, docs: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        return {"reg": queries.new_zeros(())}
