"""PNG plots for run directories (training curves) and collected tables (bar charts), via matplotlib."""

from __future__ import annotations

import json
from pathlib import Path

from .run_dir import RunDir


def read_train_log(path: Path) -> list[dict]:
    """Records by step; a step logged twice (before and after a resume) keeps its last record."""
    by_step: dict[int, dict] = {}
    if Path(path).exists():
        for line in Path(path).read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                by_step[rec["step"]] = rec
    return [by_step[s] for s in sorted(by_step)]


def plot_training(run: RunDir) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_train_log(run.train_log)
    if not records:
        return None
    steps = [r["step"] for r in records]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for key in ("loss", "rank_loss", "reg"):
        axes[0].plot(steps, [r[key] for r in records], label=key)
    for key in [k for k in records[-1] if k.startswith("loss_")]:
        axes[0].plot(steps, [r.get(key) for r in records], label=key, linestyle="--")
    axes[0].set_title("loss")
    axes[0].legend(fontsize=7)
    weights = [k for k in records[-1] if k.startswith("lambda_")]  # logged by a regularizer with weights
    for key in weights:
        axes[1].plot(steps, [r.get(key) for r in records], label=key)
    axes[1].set_title("regularizer weight" if weights else "no regularizer")
    if weights:
        axes[1].legend(fontsize=7)
    axes[2].plot(steps, [r["query_terms"] for r in records], label="query")
    axes[2].plot(steps, [r["doc_terms"] for r in records], label="document")
    axes[2].set_yscale("log")
    axes[2].set_title("active terms")
    axes[2].legend(fontsize=7)
    for ax in axes:
        ax.set_xlabel("step")
    fig.tight_layout()
    out = run.training_plot
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
