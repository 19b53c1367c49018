"""Sweeps stored as YAML: named runs x grid x seeds, each an ``lsr-run`` invocation in its own directory.

A sweep file holds ``base`` (overrides shared by every run), ``runs`` (name -> overrides), optional ``grid``
(key -> list of values, crossed with every run) and ``seeds``. Runs are launched one after another as
subprocesses into ``<out>/<run name>[_<grid values>][_s<seed>]``; a finished run is skipped (its stages skip
themselves), so re-launching a killed sweep resumes it. A failed run is recorded (``failed.json``) and the
sweep goes on. Hydra's own multirun (``lsr-run -m ...``) works as well; this file form keeps a paper table's
exact list of runs in one reviewed place.

An override may name ``{out}`` (the sweep's output folder) and ``{seed}`` (the run's seed), so that a run can
evaluate the model of an earlier run of the same seed: ``model.path={out}/demo_s{seed}/model``. Runs go in the
file's order, every seed of a run before the next run.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from .errors import ConfigError
from .run_dir import RunDir, write_json


@dataclass
class PlannedRun:
    name: str
    overrides: list[str]


def plan(sweep_file: Path, extra: list[str] | None = None, only: list[str] | None = None,
         seeds: list[int] | None = None, out: Path | None = None) -> list[PlannedRun]:
    """The sweep's runs in order; ``only`` keeps the named runs (``runs:`` keys), ``seeds`` replaces the file's
    seeds (a first pass with one seed, the rest later: finished runs are skipped on the next launch); ``{out}``
    and ``{seed}`` in an override become ``out`` and the run's seed."""
    spec = OmegaConf.to_container(OmegaConf.load(sweep_file), resolve=True)
    unknown = set(spec) - {"base", "runs", "grid", "seeds", "description"}
    if unknown:
        raise ConfigError(f"{sweep_file}: unknown keys {sorted(unknown)}; allowed base, runs, grid, seeds, description")
    base = list(spec.get("base") or []) + list(extra or [])
    runs = spec.get("runs") or {"run": []}
    if only:
        missing = [name for name in only if name not in runs]
        if missing:
            raise ConfigError(f"--runs {','.join(missing)}: not in {sweep_file} (its runs: {', '.join(runs)})")
        runs = {name: runs[name] for name in runs if name in only}
    grid = spec.get("grid") or {}
    seeds = seeds or spec.get("seeds") or [None]
    planned = []
    for (name, overrides), values, seed in itertools.product(runs.items(), itertools.product(*grid.values()), seeds):
        label = name
        cells = [f"{k}={v}" for k, v in zip(grid, values)]
        if cells:
            label += "_" + "_".join(str(v).replace("/", "-") for v in values)
        if seed is not None:
            label += f"_s{seed}"
            cells.append(f"seed={seed}")
        planned.append(PlannedRun(label, [fill(o, label, out, seed, sweep_file) for o in base + list(overrides or [])]
                                  + cells))
    return planned


def fill(override: str, label: str, out: Path | None, seed: int | None, sweep_file: Path) -> str:
    """``override`` with ``{out}`` and ``{seed}`` replaced (plain text replacement: Hydra's ``${...}`` and dict
    values such as ``{name: adi}`` pass through); naming one the sweep lacks is an error naming the run."""
    for name, value in (("{out}", out), ("{seed}", seed)):
        if name in override:
            if value is None:
                raise ConfigError(f"{sweep_file}: run {label}: {override!r} names {name}, but the sweep has "
                                  f"{'no output folder' if name == '{out}' else 'no seeds'}")
            override = override.replace(name, str(value))
    return override


def launch(sweep_file: Path, out: Path, extra: list[str] | None = None, dry_run: bool = False,
           only: list[str] | None = None, seeds: list[int] | None = None) -> list[dict]:
    out = Path(out)
    results = []
    for run in plan(sweep_file, extra, only, seeds, out):
        run_dir = out / run.name
        cmd = [sys.executable, "-m", "lsr_run.cli", *run.overrides, f"hydra.run.dir={run_dir}"]
        print(f"[sweep] {run.name}: lsr-run {' '.join(run.overrides)}", flush=True)
        if dry_run:
            results.append({"name": run.name, "overrides": run.overrides})
            continue
        status = RunDir(run_dir).status
        if status.exists() and json.loads(status.read_text()).get("state") == "done":
            print(f"[sweep] {run.name}: finished already", flush=True)
            results.append({"name": run.name, "status": "done"})
            continue
        start = time.time()
        proc = subprocess.run(cmd, env=dict(os.environ))
        status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        failed = RunDir(run_dir).failed
        if proc.returncode != 0 and not failed.exists():
            write_json(failed, {"error": status, "overrides": run.overrides})  # atomic, like every run file
        results.append({"name": run.name, "status": status, "seconds": time.time() - start})
        print(f"[sweep] {run.name}: {status} in {time.time() - start:.0f}s", flush=True)
    return results


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="run a sweep YAML (conf/sweep/*.yaml) run by run")
    parser.add_argument("sweep", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--runs", type=lambda text: [n for n in text.split(",") if n],
                        help="comma-separated names of the runs to launch (default: all)")
    parser.add_argument("--seeds", type=lambda text: [int(n) for n in text.split(",") if n],
                        help="comma-separated seeds instead of the file's (e.g. one seed first)")
    parser.add_argument("overrides", nargs="*", help="extra overrides appended to every run")
    args = parser.parse_args(argv)
    try:
        launch(args.sweep, args.out, args.overrides, args.dry_run, args.runs, args.seeds)
    except ConfigError as e:
        parser.exit(2, f"sweep: {e}\n")


if __name__ == "__main__":
    main()
