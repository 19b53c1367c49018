"""What a sampler does to the teacher-score distribution of the training groups.

Over one epoch of sampled groups (positive + negatives), records the mean per-query variance of the teacher
scores and the mean entropy of their softmax, and a histogram of sampled negatives' teacher scores (PNG).
"""

from __future__ import annotations

import logging

import numpy as np

from .run_dir import RunDir, write_json
from .sampling import softmax_entropy

log = logging.getLogger(__name__)


def sampled_score_stats(data, sampler, seed: int, epoch: int = 0) -> dict:
    variances, entropies, negatives, short = [], [], [], 0
    for qid in data.qids:
        docs, teacher = data.group(qid, sampler, seed, epoch)
        t = np.asarray(teacher, dtype=np.float64)
        variances.append(float(t.var()))
        entropies.append(softmax_entropy(t))
        negatives.extend(t[1:].tolist())
        short += len(data.pools[qid]) < sampler.num_negatives
    return {"queries": len(data.qids), "teacher_variance": float(np.mean(variances)),
            "teacher_entropy": float(np.mean(entropies)), "negative_score_mean": float(np.mean(negatives)),
            "queries_with_short_pool": short, "negative_scores": negatives}


def record_sampling_stats(data, sampler, seed: int, run: RunDir) -> dict:
    stats = sampled_score_stats(data, sampler, seed)
    scores = stats.pop("negative_scores")
    stats["sampler"] = type(sampler).__name__
    write_json(run.sampling_stats, stats)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.hist(scores, bins=40, color="#4477aa")
        ax.set_xlabel("teacher score of sampled negatives")
        ax.set_ylabel("count")
        ax.set_title(f"{stats['sampler']}: var {stats['teacher_variance']:.4f}, H {stats['teacher_entropy']:.3f}")
        fig.tight_layout()
        run.sampling_plot.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(run.sampling_plot, dpi=120)
        plt.close(fig)
    except Exception as e:  # the numbers above are what matter; a plot failure must not stop training
        log.warning("sampling histogram failed: %s", e)
    log.info("sampling %s: teacher variance %.4f, entropy %.3f", stats["sampler"], stats["teacher_variance"],
             stats["teacher_entropy"])
    return stats
