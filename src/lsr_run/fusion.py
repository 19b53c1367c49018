"""Hybrid retrieval from finished runs: the runs of two (or more) run directories fused per dataset with ranx's
``fuse`` (score normalisation, then a fusion method), written as a run directory of its own that ``collect``
reads like any other (``runs/``, ``per_query/``, ``metrics.json``, ``config.yaml`` with a ``fusion`` section).

Every dataset the runs share is fused, scored against the first run's judgements, and the fusion is refused where
the runs were scored on different judgements. Nothing is tuned: the weights are what the caller gives.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from .collect import QrelsCache
from .data import read_trec_run, write_trec_run
from .errors import LsrError
from .evaluation import evaluate_run, numba_quiet, remove_self_hits, trec_order, trec_ranking
from .run_dir import RunDir, read_json, write_json, write_text

METHODS = ("wsum", "rrf", "combsum", "combmnz")  # ranx fusion methods that need no training


def _config(run: RunDir) -> dict:
    if not run.config.exists() or not run.metrics.exists():
        raise LsrError(f"{run.root}: not a finished run directory (config.yaml and metrics.json are needed)")
    return yaml.safe_load(run.config.read_text()) or {}


def _dataset_spec(config: dict, dataset: str) -> dict | None:
    return ((config.get("eval") or {}).get("datasets") or {}).get(dataset)


def fuse_runs(sources: list[Path], out: Path, method: str = "wsum", norm: str = "min-max",
              weights: list[float] | None = None, k: int | None = None) -> dict:
    """Fuse the runs of ``sources`` (run directories) per shared dataset into the run directory ``out``;
    -> its metrics ({dataset: means}). ``weights``: one per source (wsum; default equal); ``k``: results kept per
    query (default the first run's eval.k)."""
    from .evaluation import _ranx

    ranx = _ranx()
    if len(sources) < 2:
        raise LsrError("fusion: give at least two run directories")
    if method not in METHODS:
        raise LsrError(f"fusion method {method!r}: choose one of {', '.join(METHODS)}")
    runs = [RunDir(Path(p)) for p in sources]
    configs = [_config(r) for r in runs]
    if weights is None:
        weights = [1.0 / len(runs)] * len(runs)
    if len(weights) != len(runs):
        raise LsrError(f"fusion: {len(weights)} weights for {len(runs)} runs")
    metrics_cfg = list((configs[0].get("eval") or {}).get("metrics") or ["ndcg@10"])
    k = k or int((configs[0].get("eval") or {}).get("k") or 1000)
    stored = [read_json(r.metrics) for r in runs]
    shared = [d for d in stored[0] if isinstance(stored[0][d], dict) and stored[0][d].get("scored", True)
              and all(d in s for s in stored[1:]) and all(r.run_file(d).exists() for r in runs)]
    if not shared:
        raise LsrError(f"fusion: the runs share no scored dataset ({', '.join(str(p) for p in sources)})")
    cache = QrelsCache()
    target = RunDir(Path(out))
    specs = {}
    for dataset in shared:  # every input checked before anything is written
        spec = specs[dataset] = _dataset_spec(configs[0], dataset)
        if spec is None:
            raise LsrError(f"{runs[0].config}: eval.datasets.{dataset} is missing (needed for its judgements)")
        judged = {key: spec.get(key) for key in ("name", "split", "path", "irds_id")}
        for run, config in zip(runs[1:], configs[1:]):
            other = _dataset_spec(config, dataset) or {}
            if {key: other.get(key) for key in judged} != judged:
                raise LsrError(f"fusion: {dataset} was scored on other judgements in {run.config} "
                               f"({json.dumps(other, sort_keys=True)} vs {json.dumps(spec, sort_keys=True)})")
    results: dict = {}
    for dataset, spec in specs.items():
        rankings = []
        for run in runs:
            ranking = read_trec_run(run.run_file(dataset))
            ranking = remove_self_hits(ranking) if spec.get("remove_self_hits") else ranking
            # rank-based fusion sees each run's ties broken as trec_eval breaks them (not by ranx's sort)
            rankings.append({q: trec_order(h) if method == "rrf" else dict(h) for q, h in ranking.items() if h})
        params = {"weights": list(weights)} if method == "wsum" else None
        with numba_quiet():
            fused = ranx.fuse([ranx.Run(r, name=f"run{i}") for i, r in enumerate(rankings)],
                              norm=norm, method=method, params=params).to_dict()
        # the fused scores as the run file holds them (6 decimals), in the order trec_eval ranks them (ties by
        # document id, descending), top k: metrics.json is what scoring the file gives
        top = {q: trec_ranking({d: round(s, 6) for d, s in docs.items()})[:k] for q, docs in fused.items()}
        write_trec_run(target.run_file(dataset), top)
        ds = cache.dataset(dataset, spec, (configs[0].get("paths") or {}).get("data_dir"))
        means, per_query = evaluate_run(ds.qrels, {q: dict(h) for q, h in top.items()},
                                        spec.get("metrics") or metrics_cfg)
        write_json(target.per_query(dataset), per_query)
        results[dataset] = {**means, "queries": len(per_query)}
    config = dict(configs[0])
    config["fusion"] = {"runs": [str(r.root.resolve()) for r in runs], "method": method, "norm": norm,
                        "weights": list(weights) if method == "wsum" else None, "k": k}
    write_text(target.config, yaml.safe_dump(config, sort_keys=False))
    if runs[0].meta.exists():
        shutil.copyfile(runs[0].meta, target.meta)  # the machine and commit that made the fused runs' first part
    write_json(target.metrics, results)
    return results
