"""Ranking losses over one positive and ``n`` sampled negatives per query.

Shapes: B queries, each with 1 + n documents (column 0 is the positive).
``group_scores`` (B, 1+n): student score of each query with its own documents.
``all_scores`` (B, B*(1+n)): each query against every document in the batch (in-batch negatives).
``teacher`` (B, 1+n) or None: teacher scores of the same pairs.

A loss declares in its type whether it needs teacher scores (``needs_teacher``), and ``evaluate`` returns its
value with its named parts (a weighted sum's parts, by name): the trainer logs whatever parts it is given.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

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


@dataclass
class LossValue:
    """A loss's value and its named parts (unweighted, detached floats), logged as ``loss_<name>``."""

    total: torch.Tensor
    parts: dict[str, float] = field(default_factory=dict)


class RankingLoss(nn.Module):
    needs_teacher: ClassVar[bool] = False  # True: the batch must carry teacher scores

    def forward(self, batch: ScoredBatch) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def evaluate(self, batch: ScoredBatch) -> LossValue:
        """The loss and its named parts; a single loss has no parts beside its total."""
        return LossValue(self(batch))


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

    needs_teacher: ClassVar[bool] = True

    def forward(self, batch: ScoredBatch) -> torch.Tensor:
        teacher = _require_teacher(batch, "margin_mse")
        student_margin = batch.group_scores[:, :1] - batch.group_scores[:, 1:]
        teacher_margin = teacher[:, :1] - teacher[:, 1:]
        return F.mse_loss(student_margin, teacher_margin)


class KLDivergence(RankingLoss):
    """Listwise distillation: KL(softmax(teacher / T) || softmax(student / T)) over each query's documents."""

    needs_teacher: ClassVar[bool] = True

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
    """sum_i w_i * loss_i; ``losses`` maps a name to {"loss": RankingLoss, "weight": float}. Its parts are the
    unweighted value of each loss, by name; it needs a teacher when one of its losses does."""

    def __init__(self, losses: dict):
        super().__init__()
        if not losses:
            raise ConfigError("loss.losses: give at least one loss")
        for name, spec in losses.items():
            if not isinstance(spec.get("loss"), RankingLoss):
                raise ConfigError(f"loss.losses.{name}.loss: expected a ranking loss (a _target_ in lsr_run.losses), "
                                  f"got {type(spec.get('loss')).__name__}")
        self.parts = nn.ModuleDict({name: spec["loss"] for name, spec in losses.items()})
        self.weights = {name: float(spec.get("weight", 1.0)) for name, spec in losses.items()}

    @property
    def needs_teacher(self) -> bool:  # type: ignore[override]  # derived from the parts, never assigned
        return any(p.needs_teacher for p in self.parts.values())

    def evaluate(self, batch: ScoredBatch) -> LossValue:
        total = 0.0
        parts: dict[str, float] = {}
        for name, loss in self.parts.items():
            value = loss(batch)
            parts[name] = float(value.detach())
            total = total + self.weights[name] * value
        return LossValue(total, parts)

    def forward(self, batch: ScoredBatch) -> torch.Tensor:
        return self.evaluate(batch).total
