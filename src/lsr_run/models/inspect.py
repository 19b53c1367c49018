"""Head-scale diagnostics: decoder norms and SPLADE statistics on a fixed probe set at initialisation.

``lsr-run stages=[inspect] backbone=X`` reports, for the backbone as loaded and under every head-scaling
option in ``inspect.scalings``: Frobenius norm of the decoder weight, per-token row norms (mean/median/max),
the head LayerNorm gamma norm, decoder-bias statistics, and on the probe texts the mean and max pre-ReLU
logit, the fraction of positive logits, mean active terms and mean L1 of the SPLADE vectors.
"""

from __future__ import annotations

import logging

import torch
from hydra.utils import instantiate
from torch import nn

log = logging.getLogger(__name__)

PROBE_QUERIES = [
    "what causes muscle cramps during exercise",
    "effect of vitamin d supplementation on bone density",
    "how do vaccines train the immune system",
    "boundary layer transition at supersonic speeds",
]
PROBE_DOCS = [
    "Muscle cramps are sudden, involuntary contractions. Dehydration and electrolyte imbalance are common causes "
    "during prolonged exercise, although neuromuscular fatigue is now thought to play the larger role.",
    "In a randomised trial of 500 older adults, daily vitamin D supplementation did not change bone mineral "
    "density at the hip after two years compared with placebo.",
    "Vaccines expose the immune system to an antigen so that memory B and T cells form without disease; "
    "a later infection then meets a faster, stronger response.",
    "Measurements of heat transfer on a flat plate at Mach 3 show the boundary layer becomes turbulent at "
    "Reynolds numbers that depend strongly on surface roughness.",
]


def _layernorm_gamma(model: nn.Module) -> float | None:
    from .backbone import head_norm

    norm = head_norm(model)
    return float(norm.weight.detach().float().norm()) if norm is not None else None


@torch.no_grad()
def head_report(model: nn.Module) -> dict:
    decoder = model.get_output_embeddings()
    w = decoder.weight.detach().float()
    rows = w.norm(dim=1)
    report = {"decoder_frobenius": float(w.norm()), "row_norm_mean": float(rows.mean()),
              "row_norm_median": float(rows.median()), "row_norm_max": float(rows.max()),
              "layernorm_gamma_norm": _layernorm_gamma(model),
              "tied": decoder.weight is model.get_input_embeddings().weight}
    if decoder.bias is not None:
        b = decoder.bias.detach().float()
        report.update(bias_mean=float(b.mean()), bias_std=float(b.std()), bias_min=float(b.min()),
                      bias_max=float(b.max()))
    return report


@torch.no_grad()
def probe_report(encoder) -> dict:
    from .splade import splade_pool

    was_training = encoder.training
    encoder.eval()
    out = {}
    for name, texts, max_len in (("queries", PROBE_QUERIES, 64), ("docs", PROBE_DOCS, 256)):
        batch = encoder.tokenize(texts, max_len)
        logits = encoder.logits(batch["input_ids"], batch["attention_mask"]).float()
        mask = batch["attention_mask"].bool()
        real = logits[mask]  # (tokens, V)
        reps = splade_pool(logits, batch["attention_mask"])
        out[name] = {"logit_mean": float(real.mean()), "logit_max": float(real.max()),
                     "positive_fraction": float((real > 0).float().mean()),
                     "active_terms": float((reps > 0).sum(1).float().mean()), "l1": float(reps.sum(1).mean())}
    encoder.train(was_training)
    return out


def inspect_backbone(cfg, backbone_spec, seed: int) -> dict:
    """Report the backbone as loaded and under each configured head scaling (a fresh copy each)."""
    from .backbone import load_backbone
    from .splade import SpladeEncoder

    scalings = {"configured": cfg.head_scaling, **dict(cfg.get("inspect", {}).get("scalings", {}) or {})}
    report = {"backbone": backbone_spec.name, "model_id": backbone_spec.model_id, "inflate": backbone_spec.head_inflate,
              "options": {}}
    for name, scaling_cfg in scalings.items():
        mlm, tokenizer, settings = load_backbone(backbone_spec, seed)
        record = instantiate(scaling_cfg).apply(mlm, inflate=backbone_spec.head_inflate)
        encoder = SpladeEncoder(mlm, tokenizer, settings)
        report["options"][name] = {"scaling": record, "head": head_report(mlm), "probe": probe_report(encoder)}
    _print(report)
    return report


def _print(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"inspect {report['backbone']} ({report['model_id']}, inflate {report['inflate']})")
    for col in ("option", "|W|_F", "row mean", "row max", "LN gamma", "bias mean", "q logit mean", "q logit max",
                "q pos frac", "q terms", "d terms", "d L1"):
        table.add_column(col, justify="right")
    for name, r in report["options"].items():
        h, q, d = r["head"], r["probe"]["queries"], r["probe"]["docs"]
        gamma = h["layernorm_gamma_norm"]
        table.add_row(name, f"{h['decoder_frobenius']:.1f}", f"{h['row_norm_mean']:.3f}", f"{h['row_norm_max']:.3f}",
                      "-" if gamma is None else f"{gamma:.2f}", f"{h.get('bias_mean', 0):.3f}",
                      f"{q['logit_mean']:.2f}", f"{q['logit_max']:.2f}", f"{q['positive_fraction']:.3f}",
                      f"{q['active_terms']:.0f}", f"{d['active_terms']:.0f}", f"{d['l1']:.1f}")
    Console(width=200).print(table)
