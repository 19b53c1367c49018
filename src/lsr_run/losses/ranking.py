"""Ranking losses over one positive and ``n`` sampled negatives per query.

Shapes: B queries, each with 1 + n documents (column 0 is the positive).
``group_scores`` (B, 1+n): student score of each query with its own documents.
``all_scores`` (B, B*(1+n)): each query against every document in the batch (in-batch negatives).
``teacher`` (B, 1+n) or None: teacher scores of the same pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError


@dataclass
class ScoredBatch:
    group_scores: torch.Tensor
    all_scores: torch.Tensor
    teacher: torch.Tensor | None = None

    @property
    def group_size(self) -> int:
        return self.group_scores.shape[1]


class RankingLoss(nn.Module):
    needs_teacher = False

    def forward(self, batch: ScoredBatch) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class InfoNCE(RankingLoss):
    """Contrastive loss (van den Oord et al.): softmax over the positive, its negatives and, with
    ``in_batch=True``, every other query's documents; target is the query's own positive."""

    def __init__(self, temperature: float = 1.0, in_batch: bool = True):
        super().__init__()
        if temperature <= 0:
            raise ConfigError(f"loss.temperature={temperature}: must be > 0")
        self.temperature = temperature
        self.in_batch = in_batch

    def forward(self, batch: ScoredBatch) -> torch.Tensor:
        if self.in_batch:
            b = batch.all_scores.shape[0]
            target = torch.arange(b, device=batch.all_scores.device) * batch.group_size
            return F.cross_entropy(batch.all_scores / self.temperature, target)
        target = torch.zeros(batch.group_scores.shape[0], dtype=torch.long, device=batch.group_scores.device)
        return F.cross_entropy(batch.group_scores / self.temperature, target)


def _require_teacher(batch: ScoredBatch, name: str) -> torch.Tensor:
    if batch.teacher is None:
        raise ConfigError(f"loss={name} needs teacher scores: choose a teacher (teacher=bi_encoder|cross_encoder|file)")
    return batch.teacher.to(batch.group_scores.dtype)


class MarginMSE(RankingLoss):
    """Margin-MSE (Hofstätter et al., 2020): MSE between student and teacher margins s(q,d+) - s(q,d-),
    averaged over every negative."""

    needs_teacher = True

    def forward(self, batch: ScoredBatch) -> torch.Tensor:
        teacher = _require_teacher(batch, "margin_mse")
        student_margin = batch.group_scores[:, :1] - batch.group_scores[:, 1:]
        teacher_margin = teacher[:, :1] - teacher[:, 1:]
        return F.mse_loss(student_margin, teacher_margin)


class KLDivergence(RankingLoss):
    """Listwise distillation: KL(softmax(teacher / T) || softmax(student / T)) over each query's documents."""

    needs_teacher = True

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        if temperature <= 0:
            raise ConfigError(f"loss.temperature={temperature}: must be > 0")
        self.temperature = temperature

    def forward(self, batch: ScoredBatch) -> torch.Tensor:
        teacher = _require_teacher(batch, "kl_div")
        log_p_student = F.log_softmax(batch.group_scores / self.temperature, dim=1)
        log_p_teacher = F.log_softmax(teacher / self.temperature, dim=1)
        return F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean")


class WeightedSum(RankingLoss):
    """sum_i w_i * loss_i; ``losses`` maps a name to {"loss": RankingLoss, "weight": float}."""

    def __init__(self, losses: dict):
        super().__init__()
        if not losses:
            raise ConfigError("loss.losses: give at least one loss")
        self.parts = nn.ModuleDict({name: spec["loss"] for name, spec in losses.items()})
        self.weights = {name: float(spec.get("weight", 1.0)) for name, spec in losses.items()}
        self.needs_teacher = any(p.needs_teacher for p in self.parts.values())
        self.last_parts: dict[str, float] = {}

    def forward(self, batch: ScoredBatch) -> torch.Tensor:
        total = 0.0
        for name, loss in self.parts.items():
            value = loss(batch)
            self.last_parts[name] = float(value.detach())
            total = total + self.weights[name] * value
        return total
