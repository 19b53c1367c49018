"""MLM-head scaling: correct the head's scale once, after loading and before the optimizer exists.

SPLADE weights come straight from MLM logits and relevance is an unnormalised dot product, so a head with a
large L2 norm (ModernBERT, Ettin) gives huge, mostly positive logits and training degrades or collapses
("Rescaling MLM-Head for Neural Sparse Retrieval", arXiv 2606.18811). The fix multiplies the head projection by
a constant factor (1/k, k=16 reported) at initialisation.

Tied weights are a trap: in BERT and ModernBERT the decoder weight *is* the input embedding matrix, so scaling
it in place also scales the encoder's input. ``tie: untie`` gives the decoder its own copy first; ``tie: keep``
scales the shared tensor (harmless for ModernBERT, whose embeddings pass a LayerNorm first; not for BERT, where
the scaled word embeddings are summed with unscaled position embeddings). Every applied change is returned as a
record (tensor names, factor, norms before and after) that the run directory keeps.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError

log = logging.getLogger(__name__)

TARGETS = ("weight", "weight_and_bias")
TIES = ("keep", "untie")


def decoder_of(model: nn.Module) -> nn.Linear:
    return model.get_output_embeddings()


def is_tied(model: nn.Module) -> bool:
    return decoder_of(model).weight is model.get_input_embeddings().weight


def untie(model: nn.Module) -> bool:
    """Give the decoder its own weight tensor; True if it was tied. Survives save/reload via the config."""
    decoder = decoder_of(model)
    was_tied = is_tied(model)
    if was_tied:
        decoder.weight = nn.Parameter(decoder.weight.detach().clone())
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False
    return was_tied


def _names_of(model: nn.Module, tensor: torch.Tensor) -> list[str]:
    return [name for name, p in model.named_parameters(remove_duplicate=False) if p is tensor]


@torch.no_grad()
def _scale(model: nn.Module, factor: float, target: str) -> list[dict]:
    decoder = decoder_of(model)
    tensors = [decoder.weight] + ([decoder.bias] if target == "weight_and_bias" and decoder.bias is not None else [])
    records = []
    for tensor in tensors:
        before = float(tensor.float().norm())
        tensor.mul_(factor)
        records.append({"tensors": _names_of(model, tensor), "factor": factor,
                        "norm_before": before, "norm_after": float(tensor.float().norm())})
    return records


@dataclass
class HeadScaling:
    """Base: multiply the decoder (and optionally its bias) by ``factor(model)``.

    ``target``: ``weight`` scales the projection only; ``weight_and_bias`` scales both, which scales every initial
    logit by exactly the factor without changing which terms are positive.
    """

    target: str = "weight"
    tie: str = "untie"

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ConfigError(f"head_scaling.target={self.target}: allowed {', '.join(TARGETS)}")
        if self.tie not in TIES:
            raise ConfigError(f"head_scaling.tie={self.tie}: allowed {', '.join(TIES)}")

    def factor(self, model: nn.Module) -> float:
        return 1.0

    def apply(self, model: nn.Module, inflate: float = 1.0) -> dict:
        """Inflate (emulation of a large-norm head) then correct; returns the record of what changed."""
        record: dict = {"method": type(self).__name__, "target": self.target, "tie": self.tie,
                        "tied_before": is_tied(model), "inflate": inflate, "steps": []}
        if inflate != 1.0 or self.tie == "untie":
            # an inflated head emulates a backbone whose *head* is large: never inflate the input embeddings
            record["untied"] = untie(model)
        if inflate != 1.0:
            record["steps"].append({"step": "inflate", "records": _scale(model, inflate, self.target)})
        factor = self.factor(model)
        if factor != 1.0:
            record["steps"].append({"step": "correct", "records": _scale(model, factor, self.target)})
        record["factor"] = factor
        record["tied_after"] = is_tied(model)
        record["decoder_norm"] = float(decoder_of(model).weight.detach().float().norm())
        return record


@dataclass
class NoScaling(HeadScaling):
    """Leave the head as loaded (tie kept)."""

    tie: str = "keep"


@dataclass
class ConstantScaling(HeadScaling):
    """Divide the head projection by ``k`` (the paper's setting: k=16)."""

    k: float = 16.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.k > 0:
            raise ConfigError(f"head_scaling.k={self.k}: must be > 0")

    def factor(self, model: nn.Module) -> float:
        return 1.0 / self.k


@dataclass
class MatchNorm(HeadScaling):
    """Scale so the decoder weight's Frobenius norm equals ``reference_norm`` (e.g. bert-base-uncased's)."""

    reference_norm: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.reference_norm > 0:
            raise ConfigError(f"head_scaling.reference_norm={self.reference_norm}: must be > 0 "
                              "(measure it with `lsr-run stages=[inspect] backbone=bert_base_uncased`)")

    def factor(self, model: nn.Module) -> float:
        return self.reference_norm / float(decoder_of(model).weight.detach().float().norm())
