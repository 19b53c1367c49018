"""One run: its directory guarded and locked, its stages executed, its baselines run, its status recorded.

The stages themselves are in ``lsr_run.stages``; what they are built from, in ``lsr_run.components``. A run
directory holds one config: re-launching the same config resumes it (each stage skips an output computed from
the same inputs), a different one is refused unless ``force=true``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from . import distributed, interrupt
from .models import cpu_gemm
from . import provenance as prov
from . import run_dir as rd
from . import stages
from .errors import LsrError, RunDirBusy
from .run_dir import RunDir

log = logging.getLogger(__name__)

STAGES = ("inspect", "train", "encode", "index", "search", "evaluate")


IGNORED_FOR_IDENTITY = ("stages", "force", "model", "expected", "paths", "inspect")  # paths: content is keyed instead;
# inspect: the options a report shows, not what a run computes


def _identity(cfg: DictConfig) -> dict:
    """The part of a config that defines a run's results (stage lists and output-only keys left out)."""
    data = OmegaConf.to_container(cfg, resolve=True)
    for key in IGNORED_FOR_IDENTITY:
        data.pop(key, None)
    for key in prov.TRAIN_NEUTRAL:  # cadence and prefetch: a run made with other values has the same results
        prov.drop(data, f"train.{key}")
    return prov.drop_inert(data)  # keys newer than the run, at the value it ran with


def guard_run_dir(cfg: DictConfig, run: RunDir) -> None:
    """Refuse to overwrite a finished run made with a different config, unless force=true."""
    if not run.config.exists():
        return
    old = OmegaConf.load(run.config)
    if _identity(old) == _identity(cfg):
        return
    if not run.metrics.exists() and not rd.is_done(run, "train"):
        return  # nothing finished yet
    if cfg.get("force", False):
        log.warning("force=true: overwriting the finished run in %s", run.root)
        return
    diff = prov.differences(_identity(old), _identity(cfg))  # dotted keys: encode.doc_top_k, not encode
    raise LsrError(f"{run.root} holds a finished run with a different config (differs in: {', '.join(diff)}); "
                   f"choose another hydra.run.dir or pass force=true to overwrite")


def print_table(metrics: dict, baselines: dict[str, dict], metric: str = "ndcg@10") -> str:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{metric} (terms per query / document)")
    table.add_column("dataset")
    table.add_column("model", justify="right")
    for name in baselines:
        table.add_column(name, justify="right")
    table.add_column("q terms", justify="right")
    table.add_column("d terms", justify="right")
    header = ["dataset", "model", *baselines, "q terms", "d terms"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for key, entry in metrics.items():
        if not isinstance(entry, dict) or metric not in entry:
            continue
        cells = [f"{entry[metric]:.4f}"] + [f"{b.get(key, {}).get(metric, float('nan')):.4f}" for b in baselines.values()]
        terms = [f"{entry.get('query_terms') or 0:.1f}", f"{entry.get('doc_terms') or 0:.1f}"]
        table.add_row(key, *cells, *terms)
        lines.append(f"| {key} | " + " | ".join(cells + terms) + " |")
    Console(width=160).print(table)
    return "\n".join(lines)


_LOCKS: dict[str, object] = {}


def lock_run_dir(root: Path) -> None:
    """One process per run directory: an advisory lock held until the process ends (or ``unlock_run_dir``)."""
    import fcntl

    path = RunDir(Path(root)).lock
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise RunDirBusy(f"{root} is in use by another lsr-run process (pid {holder}); wait for it to finish, or "
                       f"choose another hydra.run.dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    _LOCKS[str(Path(root).resolve())] = handle


def unlock_run_dir(root: Path) -> None:
    handle = _LOCKS.pop(str(Path(root).resolve()), None)
    if handle is not None:
        handle.close()  # closing the file releases the lock


def run(cfg: DictConfig, root: Path) -> dict:
    group = distributed.init()
    run_dir = RunDir(Path(root))
    torch.manual_seed(int(cfg.seed))
    ctx = stages.prepare(cfg, run_dir.root)  # validates everything before any file (or the lock) is written
    cpu_gemm.set_backend(ctx.parts.encode.cpu_gemm)
    if group.is_main:
        run_dir.root.mkdir(parents=True, exist_ok=True)
        lock_run_dir(run_dir.root)
    try:
        return _run_locked(cfg, run_dir, group, ctx)
    finally:
        if group.is_main:
            unlock_run_dir(run_dir.root)


BASELINE_STAGES = ("index", "search", "evaluate")  # a baseline is a text backend: nothing is trained or encoded


def baseline_config(cfg: DictConfig, name: str) -> DictConfig:
    """Baseline ``name``'s own config, composed from the run's: every section but ``index`` and ``stages``, then
    the baseline's index node (``eval.baselines.<name>``) as its index and the stages a baseline runs. The run's
    config is left as it is; the result is written to ``baselines/<name>/config.yaml``."""
    composed = OmegaConf.masked_copy(cfg, [k for k in cfg if k not in ("index", "stages")])
    OmegaConf.set_struct(composed, False)
    composed = OmegaConf.merge(composed, {"index": cfg.eval.baselines[name], "stages": list(BASELINE_STAGES)})
    OmegaConf.set_struct(composed, True)
    return composed


def _run_locked(cfg: DictConfig, run_dir: RunDir, group, ctx: stages.StageContext) -> dict:
    if group.is_main:
        guard_run_dir(cfg, run_dir)
    if group.is_main:
        rd.write_text(run_dir.config, OmegaConf.to_yaml(cfg, resolve=True))
        from .environment import lock_record

        meta = rd.run_metadata(int(cfg.seed))
        meta["lock"] = lock_record()
        meta["paths"] = OmegaConf.to_container(cfg.paths, resolve=True) if "paths" in cfg else None
        meta["processes"] = group.world
        meta["cpu_gemm"] = "onednn" if cpu_gemm.onednn() else "default"  # fp32 CPU linear layers (encode.cpu_gemm)
        rd.write_json(run_dir.meta, meta)
        rd.write_json(run_dir.status, {"state": "running", "pid": os.getpid()})
    group.barrier()
    metrics = stages.execute(ctx)
    if not group.is_main:
        return {}
    baselines = {}
    for name in cfg.eval.get("baselines") or {}:
        bcfg = baseline_config(cfg, name)
        base_dir = run_dir.baseline(name)
        log.info("baseline %s", name)
        base_dir.root.mkdir(parents=True, exist_ok=True)
        rd.write_text(base_dir.config, OmegaConf.to_yaml(bcfg, resolve=True))
        baselines[name] = stages.execute(stages.prepare(bcfg, base_dir.root))
    if metrics and "evaluate" in ctx.parts.stages:
        if run_dir.model.is_dir() and not cfg.model.path:
            from .models.persist import write_model_card

            write_model_card(run_dir.model, OmegaConf.to_container(cfg, resolve=True),
                             rd.read_json(run_dir.train_state) if run_dir.train_state.exists() else None,
                             metrics, rd.read_json(run_dir.meta))
        table = print_table(metrics, baselines)
        rd.write_text(run_dir.table, table + "\n")
    interrupt.check()
    rd.write_json(run_dir.status, {"state": "done", **stages.training_outcome(run_dir)})
    return metrics
