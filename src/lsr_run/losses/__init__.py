"""Ranking losses and regularizers, as small composable modules.

A ranking loss maps a ``ScoredBatch`` to a scalar; ``WeightedSum`` combines several. Regularizers are separate
(their own config group) and compose with any loss; their weight schedules are computed from the global step,
so they continue correctly after a resume.
"""

from .ranking import InfoNCE, KLDivergence, MarginMSE, RankingLoss, ScoredBatch, WeightedSum
from .regularizers import FlopsRegularizer, NoRegularizer

__all__ = ["FlopsRegularizer", "InfoNCE", "KLDivergence", "MarginMSE", "NoRegularizer", "RankingLoss",
           "ScoredBatch", "WeightedSum"]
