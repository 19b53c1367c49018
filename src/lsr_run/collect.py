"""Collect finished runs into one paper table (Markdown, CSV, LaTeX, bar chart) and check runs against
expected numbers.

Input is a Hydra multirun sweep directory (numbered job folders) or run directories (see ``run_dir.RunDir``).
Invariants:

- Every run directory given, or found in a sweep, becomes a row. A run that failed (``failed.json``), has no
  ``metrics.json`` yet, or collapsed during training is marked as such, never dropped.
- Table cells are the means a run wrote to its own ``metrics.json``. Significance is tested on the per-query
  values written beside them (``per_query/<dataset>.json``), so the test and the table see the same numbers
  and no dataset has to be loaded. Only with ``recompute=True`` is a metric absent from those files computed
  from ``runs/<dataset>.trec`` and the qrels named by the run's ``config.yaml``, through the same evaluator and
  the same dataset spec (``max_queries``, ``remove_self_hits``) the evaluate stage uses.
- Tests: ranx's paired Student t-test (what ``ranx.compare(stat_test="student")`` runs) or its Fisher
  randomisation test, on the queries both runs answered, two-sided, p < alpha; with Bonferroni, alpha is
  divided by the number of rows compared with the baseline in that column.
- With ``seeds=True``, runs whose configs differ only in ``seed`` become one row: each cell is the mean over the
  seeds with its sample standard deviation, and the test compares per-query values averaged over the seeds
  (on the queries every seed answered), so a query counts once whatever the number of seeds.
- Several baselines (e.g. top-K and random) test every row against each; with more than one, each baseline
  has a letter and a mark names it (``↑a``: significantly better than baseline a).
- Row labels are the config choices that differ between runs: the Hydra overrides
  (``.hydra/overrides.yaml``) when every run has them, else the differing keys of the resolved
  ``config.yaml``.

Expected numbers (``expected:`` in an experiment preset, or a YAML file holding that mapping) are checked cell
by cell with a tolerance, like Anserini's regressions: a dataset the run did not configure is skipped, one it
configured but did not score fails.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import LsrError
from .provenance import drop_inert, flatten
from .run_dir import RunDir

log = logging.getLogger(__name__)

# config keys that never change a run's results (and so never label it)
UNLABELLED_KEYS = ("hydra", "force", "expected", "inspect")
MAX_LABEL_KEYS = 4
STATUS_OK, STATUS_FAILED, STATUS_NO_METRICS = "ok", "failed", "no metrics"
BETTER, WORSE = "+", "-"
STAT_TESTS = ("student", "fisher")


# ---------------------------------------------------------------- reading run directories

@dataclass
class RunRecord:
    """One row's source: a run directory, or a baseline inside one (``baselines/<name>/``)."""

    path: Path
    status: str
    metrics: dict = field(default_factory=dict)  # dataset -> {metric: value}
    collapsed: bool | None = None  # None: the run has no training stage to collapse in
    error: str = ""
    overrides: list[str] | None = None
    choices: dict = field(default_factory=dict)  # Hydra's group choices (hydra.runtime.choices)
    config: dict | None = None  # resolved config.yaml (a baseline uses the one of its run)
    baseline_name: str | None = None
    parent: "RunRecord | None" = None
    label: str = ""
    members: list["RunRecord"] = field(default_factory=list)  # a row of several seeds: its runs
    stds: dict = field(default_factory=dict)  # dataset -> {metric: std over the seeds}

    @property
    def run(self) -> RunDir:
        return RunDir(self.path)

    def dataset_spec(self, dataset: str) -> dict | None:
        entry = ((self._config or {}).get("eval") or {}).get("datasets", {}).get(dataset)
        return dict(entry) if entry is not None else None

    @property
    def data_dir(self) -> str | None:
        """The ``paths.data_dir`` the run read its datasets from."""
        return ((self._config or {}).get("paths") or {}).get("data_dir")

    @property
    def _config(self) -> dict | None:
        return self.config if self.config is not None else (self.parent.config if self.parent else None)


def _read_yaml(path: Path):
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def is_run_dir(path: Path) -> bool:
    return any(p.exists() for p in RunDir(Path(path)).identifying_files)


def _sort_key(path: Path):
    return (0, int(path.name), "") if path.name.isdigit() else (1, 0, path.name)


def find_run_dirs(paths: list[Path]) -> list[Path]:
    """Each path is a run directory, or a sweep directory whose sub-folders are runs (job number order)."""
    found: list[Path] = []
    for path in map(Path, paths):
        if not path.is_dir():
            raise LsrError(f"{path}: not a directory")
        if is_run_dir(path):
            found.append(path)
            continue
        # hidden folders are never runs (e.g. a record copy that was interrupted: see keep_runs)
        jobs = sorted((p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".") and is_run_dir(p)),
                      key=_sort_key)
        if not jobs:
            names = ", ".join(str(p.relative_to(path)) for p in RunDir(path).identifying_files)
            raise LsrError(f"{path}: neither a run directory ({names}) nor a sweep directory holding any")
        found.extend(jobs)
    return found


def load_run(path: Path) -> RunRecord:
    run = RunDir(Path(path))
    overrides = None
    if run.hydra_overrides.exists():
        overrides = [str(o) for o in (_read_yaml(run.hydra_overrides) or [])]
    choices = {}
    if run.hydra_config.exists():
        hydra_cfg = (_read_yaml(run.hydra_config) or {}).get("hydra", {})
        choices = {k: v for k, v in ((hydra_cfg.get("runtime") or {}).get("choices") or {}).items()
                   if not k.startswith("hydra/")}
    config = _read_yaml(run.config) if run.config.exists() else None
    if isinstance(config, dict):  # keys added since some of the runs, at their defaults, neither split nor label
        drop_inert(config)
    record = RunRecord(path=run.root, status=STATUS_OK, overrides=overrides, choices=choices, config=config)
    failed = run.failed
    # a run re-launched after a failure keeps the old failed.json: the newer of the two files tells
    if failed.exists() and not (run.metrics.exists() and run.metrics.stat().st_mtime > failed.stat().st_mtime):
        info = json.loads(failed.read_text())
        record.status = STATUS_FAILED
        record.error = f"{info.get('type', 'error')}: {info.get('error', '')}".strip()
    elif not run.metrics.exists():
        record.status = STATUS_NO_METRICS
    else:
        _read_metrics(record)
    return record


def _read_metrics(record: RunRecord) -> None:
    """Datasets from metrics.json; whether training collapsed from status.json (older runs: from metrics.json)."""
    metrics = json.loads(record.run.metrics.read_text())
    record.metrics = {k: v for k, v in metrics.items() if isinstance(v, dict) and k != "collapse"}
    status = record.run.status
    if status.exists() and "collapsed" in (outcome := json.loads(status.read_text())):
        record.collapsed = bool(outcome["collapsed"])
    elif "collapsed" in metrics:
        record.collapsed = bool(metrics["collapsed"])


def load_baselines(record: RunRecord) -> list[RunRecord]:
    """The baselines a run evaluated beside itself (``baselines/<name>/``), in name order."""
    folder = record.run.baselines
    if not folder.is_dir():
        return []
    out = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        base = RunRecord(path=sub, status=STATUS_OK, baseline_name=sub.name, parent=record)
        if RunDir(sub).metrics.exists():
            _read_metrics(base)
        else:
            base.status = STATUS_NO_METRICS
        out.append(base)
    return out


def load_records(paths: list[Path], include_baselines: bool = False, label_from: str = "auto",
                 seeds: bool = False) -> list[RunRecord]:
    """Run records in the given order; baselines first (one row per distinct baseline result); with ``seeds``,
    one record per set of runs that differ only in their seed (``group_seeds``)."""
    runs = [load_run(p) for p in find_run_dirs(paths)]
    if seeds:
        runs = group_seeds(runs)
    baselines: list[RunRecord] = []
    if include_baselines:
        seen = set()
        for run in runs:
            for base in load_baselines(run):
                key = (base.baseline_name, json.dumps(base.metrics, sort_keys=True))
                if base.status == STATUS_OK and key in seen:
                    continue  # the same baseline evaluated by several runs of a sweep: one row
                seen.add(key)
                baselines.append(base)
    records = baselines + runs
    assign_labels(records, label_from)
    return records


SEED_SUFFIX = re.compile(r"_s\d+$")


# keys that name the run directories of other runs, one seed each (an evaluation of a run's model, a fusion of
# runs): compared without the folders' seed suffix, so that the seeds of such runs form one row as well
RUN_PATH_KEYS = ("model.path", "fusion.runs")
SEED_IN_PATH = re.compile(r"_s\d+(?=/|$)")


def _without_seed(config: dict | None) -> str:
    """A config's identity apart from its seed (and its run name, which names the output folder only); paths to
    other runs (``RUN_PATH_KEYS``) without their ``_s<seed>`` folder suffix."""
    flat = {k: v for k, v in flatten(config or {}).items()
            if k not in ("seed", "run_name") and k.split(".")[0] not in UNLABELLED_KEYS}
    for key in RUN_PATH_KEYS:
        if key in flat:
            value = flat[key]
            flat[key] = [SEED_IN_PATH.sub("_s*", str(v)) for v in value] if isinstance(value, list) else \
                None if value is None else SEED_IN_PATH.sub("_s*", str(value))
    return json.dumps(flat, sort_keys=True, default=str)


def _std(values: list[float]) -> float | None:
    if len(values) < 2:
        return None
    m = sum(values) / len(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def group_seeds(records: list[RunRecord]) -> list[RunRecord]:
    """One record per set of runs whose configs differ only in ``seed`` (or ``run_name``); baselines and runs
    without a config stay as they are. Sets come in the order of their first runs. A set's metrics are the means
    over its finished runs, ``stds`` their sample standard deviations; it has results if any of its runs has."""
    groups: dict[str, list[RunRecord]] = {}
    out: list[RunRecord | str] = []
    for record in records:
        if record.baseline_name is not None or record.config is None:
            out.append(record)
            continue
        key = _without_seed(record.config)
        if key not in groups:
            groups[key] = []
            out.append(key)
        groups[key].append(record)
    return [_seed_group(groups[item]) if isinstance(item, str) else item for item in out]


def _seed_group(runs: list[RunRecord]) -> RunRecord:
    first = runs[0]
    done = [r for r in runs if r.status == STATUS_OK]
    config = {k: v for k, v in (first.config or {}).items() if k != "seed"}
    overrides = None if first.overrides is None else [o for o in first.overrides if _override_key_value(o)[0] != "seed"]
    group = RunRecord(path=first.path.parent / SEED_SUFFIX.sub("", first.path.name), status=first.status,
                      overrides=overrides, choices=first.choices, config=config, members=runs)
    if done:
        group.status = STATUS_OK
        for d in dict.fromkeys(d for r in done for d in r.metrics):
            keys = dict.fromkeys(k for r in done for k in r.metrics.get(d, {}))
            for k in keys:
                values = [r.metrics[d][k] for r in done if isinstance(r.metrics.get(d, {}).get(k), (int, float))]
                if values:
                    group.metrics.setdefault(d, {})[k] = sum(values) / len(values)
                    group.stds.setdefault(d, {})[k] = _std(values)
    flags = [r.collapsed for r in runs if r.collapsed is not None]
    group.collapsed = any(flags) if flags else None
    group.error = "; ".join(f"{r.path.name}: {describe_status(r.status, r.error, width=None)}"
                            for r in runs if r.status != STATUS_OK)
    return group


# ---------------------------------------------------------------- labels

def _override_key_value(override: str) -> tuple[str, str]:
    key, _, value = override.partition("=")
    if key.startswith("~"):
        return key[1:], "(deleted)"
    return key.lstrip("+"), value


def _lookup(config: dict | None, dotted: str):
    node = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _short(value) -> str:
    if isinstance(value, str) and re.fullmatch(r"[\w.]+\.[A-Z]\w*", value):
        return value.rsplit(".", 1)[1]  # a _target_ class path: the class name says enough
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def override_labels(runs: list[RunRecord]) -> list[str]:
    """``key=value`` for every override key whose value differs between runs. A run without an override for
    that key shows its group choice or resolved config value, or nothing if it has neither."""
    parsed = [dict(_override_key_value(o) for o in (r.overrides or [])) for r in runs]
    keys: list[str] = []
    for overrides in parsed:
        keys.extend(k for k in overrides if k not in keys and k.split(".")[0] not in UNLABELLED_KEYS)

    def value(run: RunRecord, overrides: dict, key: str) -> str | None:
        if key in overrides:
            return overrides[key]
        if run.choices.get(key) is not None:
            return _short(run.choices[key])
        found = _lookup(run.config, key)
        return None if found is None or isinstance(found, dict) else _short(found)

    table = [[value(r, o, k) for k in keys] for r, o in zip(runs, parsed)]
    differing = [i for i in range(len(keys)) if len({row[i] for row in table}) > 1]
    return [" ".join(f"{keys[i]}={row[i]}" for i in differing if row[i] is not None) for row in table]


def config_labels(runs: list[RunRecord]) -> list[str]:
    """``key=value`` for the resolved config keys that differ between runs (at most ``MAX_LABEL_KEYS``). A
    group whose ``_target_`` differs is shown as ``group=Class`` instead of leaf by leaf."""
    flat = [{k: v for k, v in flatten(r.config or {}).items() if k.split(".")[0] not in UNLABELLED_KEYS}
            for r in runs]
    keys: list[str] = []
    for f in flat:
        keys.extend(k for k in f if k not in keys)
    differing = [k for k in keys if len({json.dumps(f.get(k), default=str) for f in flat}) > 1]
    swapped = {k[: -len("._target_")] for k in differing if k.endswith("._target_")}
    shown = []
    for k in differing:
        group = next((g for g in swapped if k.startswith(g + ".")), None)
        if group is not None and k != f"{group}._target_":
            continue
        shown.append(k)
    shown.sort(key=lambda k: (k != "run_name", keys.index(k)))
    labels = []
    for f in flat:
        parts = [f"{k.removesuffix('._target_')}={_short(f[k])}" for k in shown if f.get(k) is not None]
        extra = len(parts) - MAX_LABEL_KEYS
        labels.append(" ".join(parts[:MAX_LABEL_KEYS]) + (f" (+{extra} more)" if extra > 0 else ""))
    return labels


LABEL_SOURCES = ("auto", "overrides", "config", "folder")


def assign_labels(records: list[RunRecord], label_from: str = "auto") -> None:
    """Label runs from their overrides (``auto``: when every run has them), their configs, or their folder
    names; a baseline is labelled by its name, with its run's label when several runs have one."""
    if label_from not in LABEL_SOURCES:
        raise LsrError(f"unknown label source '{label_from}'; choose from {', '.join(LABEL_SOURCES)}")
    runs = [r for r in records if r.baseline_name is None]
    if runs:
        if label_from == "auto":
            label_from = "overrides" if all(r.overrides is not None for r in runs) else "config"
        if label_from == "overrides":
            labels = override_labels(runs)
        elif label_from == "config":
            labels = config_labels(runs)
        else:
            labels = [r.path.name for r in runs]  # a seed group's path is its first run's, without "_s<seed>"
        for run, label in zip(runs, labels):
            run.label = label or run.path.name
    baselines = [r for r in records if r.baseline_name is not None]
    names = [b.baseline_name for b in baselines]
    for base in baselines:
        unique = names.count(base.baseline_name) == 1
        base.label = base.baseline_name if unique else f"{base.baseline_name} ({base.parent.label})"
    seen: dict[str, int] = {}
    for record in records:
        seen[record.label] = seen.get(record.label, 0) + 1
    for record in records:
        if seen[record.label] > 1:  # e.g. repeated runs of one config: the folder tells them apart
            record.label = f"{record.label} [{record.path.name}]"


# ---------------------------------------------------------------- per-query scores and significance

class QrelsCache:
    """Datasets loaded for recomputation, keyed by their spec (a sweep shares them across runs)."""

    def __init__(self):
        self._loaded: dict[str, object] = {}

    def dataset(self, key: str, spec: dict, data_dir: str | None = None):
        """``data_dir``: the run's ``paths.data_dir``, where a spec without a ``path`` finds its folder."""
        from .components import EvalDataset, load_spec, structured

        cache_key = json.dumps([spec, data_dir], sort_keys=True)
        if cache_key not in self._loaded:
            self._loaded[cache_key] = load_spec(structured(EvalDataset, spec, f"eval.datasets.{key}"), data_dir)
        return self._loaded[cache_key]


def per_query_scores(record: RunRecord, dataset: str, metric: str, recompute: bool = False,
                     cache: QrelsCache | None = None) -> dict[str, float] | None:
    """{query id: value} from ``per_query/<dataset>.json``; if the metric is not stored there and
    ``recompute``, scored from ``runs/<dataset>.trec`` against the run's qrels. None if neither is possible.
    A seed group's values are its finished runs' means per query, over the queries every one of them scored."""
    if record.members:
        parts = [per_query_scores(m, dataset, metric, recompute, cache) for m in record.members
                 if m.status == STATUS_OK and dataset in m.metrics]
        if not parts or any(p is None for p in parts):
            return None
        common = set.intersection(*(set(p) for p in parts))
        return {q: sum(p[q] for p in parts) / len(parts) for q in common}
    path = record.run.per_query(dataset)
    if path.exists():
        stored = json.loads(path.read_text())
        if stored and all(metric in v for v in stored.values()):
            return {q: float(v[metric]) for q, v in stored.items()}
    if not recompute or not record.run.run_file(dataset).exists():
        return None
    spec = record.dataset_spec(dataset)
    if spec is None:
        return None
    from .data import read_trec_run
    from .evaluation import evaluate_run, remove_self_hits

    ds = (cache or QrelsCache()).dataset(dataset, spec, record.data_dir)
    run = read_trec_run(record.run.run_file(dataset))
    if spec.get("remove_self_hits"):
        run = remove_self_hits(run)
    _, per_query = evaluate_run(ds.qrels, run, [metric])
    return {q: v[metric] for q, v in per_query.items()}


def paired_test(control: dict[str, float], treatment: dict[str, float], test: str = "student",
                seed: int = 42) -> float | None:
    """Two-sided p-value of ranx's paired test over the queries both runs scored; None if untestable."""
    import numpy as np

    from .evaluation import _ranx

    _ranx()  # sets NUMBA_CACHE_DIR before ranx's numba functions load
    from ranx.statistical_tests import fisher_randomization_test, paired_student_t_test

    common = sorted(set(control) & set(treatment))
    if len(common) < 2:
        return None
    a = np.array([control[q] for q in common], dtype=np.float64)
    b = np.array([treatment[q] for q in common], dtype=np.float64)
    if np.array_equal(a, b):
        return 1.0  # identical rankings of the metric: no difference to test (the t statistic is 0/0)
    if test == "student":
        p, _ = paired_student_t_test(a, b, 1.0)
    elif test == "fisher":
        p, _ = fisher_randomization_test(a, b, 1000, 1.0, seed)
    else:
        raise LsrError(f"unknown test '{test}'; choose from {', '.join(STAT_TESTS)}")
    p = float(p)
    return None if math.isnan(p) else p


# ---------------------------------------------------------------- the table

@dataclass
class Row:
    label: str
    status: str
    path: Path
    error: str = ""
    collapsed: bool | None = None
    values: dict[str, float | None] = field(default_factory=dict)
    mean: float | None = None
    query_terms: float | None = None
    doc_terms: float | None = None
    p_values: dict[str, float] = field(default_factory=dict)
    marks: dict[str, str] = field(default_factory=dict)  # dataset -> BETTER / WORSE than the (first) baseline
    extras: dict[str, float] = field(default_factory=dict)  # columns from other JSON files of the run
    stds: dict[str, float | None] = field(default_factory=dict)  # a seed group: dataset -> std over its seeds
    mean_std: float | None = None
    seeds: str = ""  # a seed group: "3", or "2/3" when one of three runs has no results
    sources: list[Path] = field(default_factory=list)  # the run directories behind the row
    p_by: dict[int, dict[str, float]] = field(default_factory=dict)  # baseline row -> dataset -> p
    marks_by: dict[int, dict[str, str]] = field(default_factory=dict)  # baseline row -> dataset -> mark


@dataclass
class Table:
    metric: str
    datasets: list[str]
    mean_over: list[str]
    rows: list[Row]
    baseline: int | None = None  # the first of ``baselines``
    baselines: list[int] = field(default_factory=list)
    alpha: float = 0.05
    test: str = "student"
    bonferroni: bool = False
    notes: list[str] = field(default_factory=list)  # what could not be tested, and why
    extra_columns: list[str] = field(default_factory=list)

    @property
    def grouped(self) -> bool:
        return any(r.seeds for r in self.rows)

    def letter(self, baseline: int) -> str:
        """The letter naming a baseline in marks; empty when there is one baseline."""
        return "" if len(self.baselines) < 2 else "abcdefghijklmnopqrstuvwxyz"[self.baselines.index(baseline)]


def read_extras(record: RunRecord, extras: list[str]) -> dict[str, float]:
    """Numbers from other JSON files of a run: ``name`` (every top-level number of ``<run>/<name>.json``) or
    ``name:key1,key2`` (those keys only; a dotted key reaches into nested objects: ``init_report:head.row_norm_mean``).
    A seed group's numbers are its runs' means."""
    if record.members:
        parts = [read_extras(m, extras) for m in record.members if m.status == STATUS_OK]
        keys = dict.fromkeys(k for p in parts for k in p)
        return {k: _mean(p.get(k) for p in parts) for k in keys}
    out: dict[str, float] = {}
    for extra in extras:
        name, _, keys = extra.partition(":")
        path = record.run.extra_json(name)
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        wanted = [k for k in keys.split(",") if k] or list(data)
        for key in wanted:
            value = _lookup(data, key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[key] = float(value)
    return out


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def resolve_baseline(rows: list[Row], choice: str | int | None) -> int | None:
    """A row index, an exact label, or a run folder name -> the index of the baseline row."""
    if choice is None:
        return None
    text = str(choice)
    if text.isdigit() and int(text) < len(rows):
        index = int(text)
    else:
        matches = [i for i, r in enumerate(rows) if r.label == text] or \
                  [i for i, r in enumerate(rows) if r.path.name == text or str(r.path) == text]
        if len(matches) != 1:
            labels = "; ".join(f"{i}: {r.label}" for i, r in enumerate(rows))
            raise LsrError(f"--baseline {text}: {'no' if not matches else 'several'} rows match ({labels})")
        index = matches[0]
    if rows[index].status != STATUS_OK:
        raise LsrError(f"baseline row '{rows[index].label}' has no results ({rows[index].status})")
    return index


def build_table(records: list[RunRecord], metric: str = "ndcg@10",
                baseline: str | int | list[str | int] | tuple | None = None,
                alpha: float = 0.05, bonferroni: bool = False, test: str = "student",
                recompute: bool = False, extras: list[str] | None = None) -> Table:
    if test not in STAT_TESTS:
        raise LsrError(f"unknown test '{test}'; choose from {', '.join(STAT_TESTS)}")
    datasets: list[str] = []
    for record in records:
        datasets.extend(d for d in record.metrics if d not in datasets)
    cache = QrelsCache()
    scores: dict[tuple[int, str], dict[str, float] | None] = {}
    rows = []
    for i, record in enumerate(records):
        row = Row(label=record.label, status=record.status, path=record.path, error=record.error,
                  collapsed=record.collapsed, sources=[m.path for m in record.members] or [record.path])
        for d in datasets:
            value = record.metrics.get(d, {}).get(metric)
            if value is None and recompute and d in record.metrics:
                scores[i, d] = per_query_scores(record, d, metric, recompute, cache)
                value = _mean(scores[i, d].values()) if scores[i, d] else None
            row.values[d] = value
            if record.members:
                row.stds[d] = record.stds.get(d, {}).get(metric)
        if record.members:
            row.seeds = str(len(record.members)) if record.status == STATUS_OK and not record.error else \
                f"{sum(m.status == STATUS_OK for m in record.members)}/{len(record.members)}"
        row.query_terms = _mean(record.metrics.get(d, {}).get("query_terms") for d in datasets)
        row.doc_terms = _mean(record.metrics.get(d, {}).get("doc_terms") for d in datasets)
        row.extras = read_extras(record, extras or [])
        rows.append(row)
    scored = [r for r in rows if any(v is not None for v in r.values.values())]
    mean_over = [d for d in datasets if scored and all(r.values.get(d) is not None for r in scored)]
    for row, record in zip(rows, records):
        if mean_over and all(row.values.get(d) is not None for d in mean_over):
            row.mean = _mean(row.values[d] for d in mean_over)
            per_seed = [[m.metrics.get(d, {}).get(metric) for d in mean_over] for m in record.members]
            row.mean_std = _std([_mean(v) for v in per_seed if all(x is not None for x in v)])
    table = Table(metric=metric, datasets=datasets, mean_over=mean_over, rows=rows, alpha=alpha, test=test,
                  bonferroni=bonferroni)
    for row in rows:
        table.extra_columns.extend(k for k in row.extras if k not in table.extra_columns)
    choices = list(baseline) if isinstance(baseline, (list, tuple)) else [] if baseline is None else [baseline]
    table.baselines = list(dict.fromkeys(resolve_baseline(rows, c) for c in choices))
    table.baseline = table.baselines[0] if table.baselines else None
    for b in table.baselines:
        _mark_significance(table, b, records, scores, recompute, cache)
    if table.baseline is not None:
        for row in rows:
            row.p_values, row.marks = row.p_by.get(table.baseline, {}), row.marks_by.get(table.baseline, {})
    return table


def _mark_significance(table: Table, b: int, records: list[RunRecord], scores: dict, recompute: bool,
                       cache: QrelsCache) -> None:
    name = f"the baseline '{table.rows[b].label}'" if len(table.baselines) > 1 else "the baseline"

    def get(i: int, d: str):
        if (i, d) not in scores:
            scores[i, d] = per_query_scores(records[i], d, table.metric, recompute, cache)
        return scores[i, d]

    for d in table.datasets:
        if table.rows[b].values.get(d) is None:
            table.notes.append(f"{d}: {name} has no {table.metric} for it; not tested.")
            continue
        if get(b, d) is None:
            table.notes.append(f"{d}: {name} has no per-query {table.metric} values; not tested.")
            continue
        with_values = [i for i, row in enumerate(table.rows) if i != b and row.values.get(d) is not None]
        compared = [i for i in with_values if get(i, d) is not None]
        missing = [table.rows[i].label for i in with_values if i not in compared]
        note = f"{d}: no per-query {table.metric} values for {', '.join(missing)}; not tested."
        if missing and note not in table.notes:
            table.notes.append(note)
        threshold = table.alpha / len(compared) if table.bonferroni and compared else table.alpha
        for i in compared:
            p = paired_test(get(b, d), get(i, d), table.test)
            if p is None:
                continue
            row = table.rows[i]
            row.p_by.setdefault(b, {})[d] = p
            if p < threshold:
                row.marks_by.setdefault(b, {})[d] = BETTER if row.values[d] > table.rows[b].values[d] else WORSE


# ---------------------------------------------------------------- rendering

NA = "–"
MD_MARKS = {BETTER: "↑", WORSE: "↓"}
TEX_ARROWS = {BETTER: r"\uparrow ", WORSE: r"\downarrow "}


def _marks(table: Table, row: Row, column: str, arrows: dict[str, str] = MD_MARKS) -> str:
    """A cell's marks: an arrow per baseline it differs from significantly, with the baseline's letter when the
    table has several."""
    return "".join(arrows[row.marks_by[b][column]] + table.letter(b) for b in table.baselines
                   if column in row.marks_by.get(b, {}))


def _tex_marks(table: Table, row: Row, column: str) -> str:
    marks = _marks(table, row, column, TEX_ARROWS).strip()
    return f"$^{{{marks}}}$" if marks else ""


def _baseline_tag(table: Table, i: int) -> str:
    if i not in table.baselines:
        return ""
    return f" (baseline {table.letter(i)})" if table.letter(i) else " (baseline)"


def _with_std(text: str, std: float | None, digits: int = 4, pm: str = " ± ") -> str:
    return text if std is None else f"{text}{pm}{std:.{digits}f}"


def _fmt(value: float | None, digits: int = 4) -> str:
    return NA if value is None else f"{value:.{digits}f}"


def _terms(value: float | None) -> str:
    return NA if value is None else f"{value:.1f}"


def _number(value: float | None) -> str:
    return NA if value is None else f"{value:.4g}"


def _collapsed(value: bool | None) -> str:
    return NA if value is None else ("yes" if value else "no")


def describe_status(status: str, error: str = "", width: int | None = 60) -> str:
    if status != STATUS_FAILED or not error:
        return status
    text = f"failed ({error})"
    return text if width is None or len(text) <= width else text[: width - 1] + "…"


def _best(table: Table, column: str) -> float | None:
    values = [r.mean if column == "mean" else r.values.get(column) for r in table.rows]
    values = [v for v in values if v is not None]
    return max(values) if values else None


def _caption(table: Table, escape=lambda text: text, marks: str = "↑/↓") -> list[str]:
    lines = [escape(f"Metric: {table.metric}. Mean over: {', '.join(table.mean_over) or 'no dataset every run has'}. "
                    f"Terms: mean non-zero terms per query / document over the datasets.")]
    if any(row.seeds not in ("", "1") for row in table.rows):
        lines.append(escape("A row of several seeds shows the mean over its seeds ± the sample standard deviation; "
                            "its per-query values for the tests are means over the seeds."))
    if table.baselines:
        alpha = f"p < {table.alpha:g}" + (" with Bonferroni correction" if table.bonferroni else "")
        test = "paired t-test" if table.test == "student" else "Fisher randomisation test"
        if len(table.baselines) == 1:
            against = f"'{table.rows[table.baseline].label}'"
        else:
            against = "baseline x (" + ", ".join(f"{table.letter(b)}: '{table.rows[b].label}'"
                                                 for b in table.baselines) + ")"
            marks = marks.replace("/", "x/") + "x"
        lines.append(marks + escape(f": significantly better/worse than {against} ({test}, {alpha})."))
    lines += [escape(note) for note in table.notes]
    return lines


def to_markdown(table: Table) -> str:
    seeds = ["seeds"] if table.grouped else []
    header = ["run", *seeds, *table.datasets, "mean", "q terms", "d terms", *table.extra_columns, "collapsed",
              "status"]
    best = {c: _best(table, c) for c in [*table.datasets, "mean"]}
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join([":---", *["---:"] * (len(header) - 3), ":---:", ":---"]) + "|"]
    for i, row in enumerate(table.rows):
        cells = [row.label.replace("|", "\\|") + _baseline_tag(table, i)] + ([row.seeds or "1"] if seeds else [])
        for d in table.datasets:
            text = _with_std(_fmt(row.values.get(d)), row.stds.get(d)) + _marks(table, row, d)
            cells.append(f"**{text}**" if row.values.get(d) is not None and row.values[d] == best[d] else text)
        mean = _with_std(_fmt(row.mean), row.mean_std)
        cells.append(f"**{mean}**" if row.mean is not None and row.mean == best["mean"] else mean)
        cells += [_terms(row.query_terms), _terms(row.doc_terms),
                  *(_number(row.extras.get(c)) for c in table.extra_columns), _collapsed(row.collapsed),
                  describe_status(row.status, row.error).replace("|", "\\|")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + [""] + _caption(table)) + "\n"


def to_csv(table: Table) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    grouped = table.grouped

    def number(value: float | None, fmt: str = ".6f") -> str:
        return "" if value is None else f"{value:{fmt}}"

    def tested(b: int | None, i: int, d: str, value: float | None) -> list[str]:
        if b is None:
            return ["", ""]
        return [number(table.rows[i].p_by.get(b, {}).get(d), ".3g"),
                "baseline" if i == b and value is not None else table.rows[i].marks_by.get(b, {}).get(d, "")]

    header = ["run", "status", "collapsed"] + (["seeds"] if grouped else [])
    for d in table.datasets:
        header += [d] + ([f"{d} std"] if grouped else []) + [f"{d} p", f"{d} sig"]
        header += [f"{d} {kind} ({table.letter(b)})" for b in table.baselines[1:] for kind in ("p", "sig")]
    header += ["mean"] + (["mean std"] if grouped else []) + ["query_terms", "doc_terms", *table.extra_columns,
                                                               "path"]
    writer.writerow(header)
    for i, row in enumerate(table.rows):
        cells = [row.label, describe_status(row.status, row.error, width=None),
                 _collapsed(row.collapsed).replace(NA, "")] + ([row.seeds or "1"] if grouped else [])
        for d in table.datasets:
            value = row.values.get(d)
            cells += [number(value)] + ([number(row.stds.get(d))] if grouped else [])
            cells += tested(table.baseline, i, d, value)
            for b in table.baselines[1:]:
                cells += tested(b, i, d, value)
        cells += [number(row.mean)] + ([number(row.mean_std)] if grouped else [])
        cells += [
                  "" if row.query_terms is None else f"{row.query_terms:.2f}",
                  "" if row.doc_terms is None else f"{row.doc_terms:.2f}",
                  *("" if row.extras.get(c) is None else f"{row.extras[c]:.6g}" for c in table.extra_columns),
                  "; ".join(map(str, row.sources or [row.path]))]
        writer.writerow(cells)
    return out.getvalue()


def latex_escape(text: str) -> str:
    replacements = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                    "–": "--", "…": r"\ldots{}"}
    return "".join(replacements.get(c, c) for c in text)


def to_latex(table: Table) -> str:
    """A booktabs tabular (needs \\usepackage{booktabs}); best value per column in bold."""
    columns = [*table.datasets, "Mean", "Q terms", "D terms", *table.extra_columns, "Collapsed"]
    best = {c: _best(table, c) for c in [*table.datasets, "mean"]}
    lines = [r"\begin{tabular}{l" + "r" * (len(columns) - 1) + "c}", r"\toprule",
             " & ".join(["Run", *(latex_escape(c) for c in columns)]) + r" \\", r"\midrule"]
    for i, row in enumerate(table.rows):
        label = latex_escape(row.label + _baseline_tag(table, i))
        if row.status != STATUS_OK:
            label += " (" + latex_escape(row.status) + ")"
        cells = [label]
        for d in table.datasets:
            value = row.values.get(d)
            text = _with_std(latex_escape(_fmt(value, 3)), row.stds.get(d), 3, r" $\pm$ ")
            if value is not None and value == best[d]:
                text = rf"\textbf{{{text}}}"
            cells.append(text + _tex_marks(table, row, d))
        mean = _with_std(latex_escape(_fmt(row.mean, 3)), row.mean_std, 3, r" $\pm$ ")
        cells.append(rf"\textbf{{{mean}}}" if row.mean is not None and row.mean == best["mean"] else mean)
        cells += [latex_escape(_terms(row.query_terms)), latex_escape(_terms(row.doc_terms)),
                  *(latex_escape(_number(row.extras.get(c))) for c in table.extra_columns),
                  latex_escape(_collapsed(row.collapsed))]
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    caption = _caption(table, latex_escape, r"$\uparrow$/$\downarrow$")
    return "\n".join([f"% {line}" for line in caption] + lines) + "\n"


def plot_table(table: Table, path: Path) -> None:
    """Grouped bars: one group per dataset (and the mean), one bar per row with results."""
    from matplotlib.figure import Figure

    rows = [r for r in table.rows if any(v is not None for v in r.values.values())]
    columns = table.datasets + (["mean"] if table.mean_over else [])
    fig = Figure(figsize=(max(6.0, 1.5 + len(columns) * (0.5 + 0.25 * len(rows))), 4.0))
    ax = fig.subplots()
    width = 0.8 / max(1, len(rows))
    for k, row in enumerate(rows):
        values = [row.mean if c == "mean" else row.values.get(c) for c in columns]
        xs = [j + (k - (len(rows) - 1) / 2) * width for j in range(len(columns))]
        label = row.label + (" (collapsed)" if row.collapsed else "")
        errors = [row.mean_std if c == "mean" else row.stds.get(c) for c in columns]
        bars = ax.bar(xs, [v if v is not None else 0.0 for v in values], width, label=label,
                      yerr=[e or 0.0 for e in errors] if any(errors) else None, capsize=2)
        for x, c, bar in zip(xs, columns, bars):
            mark = _marks(table, row, c)
            if mark:
                ax.text(x, bar.get_height(), mark, ha="center", va="bottom", fontsize=9)
    ax.set_xticks(range(len(columns)), columns, rotation=30, ha="right")
    ax.set_ylabel(table.metric)
    ax.set_ylim(0, 1.1 * max([1e-9] + [v for r in rows for v in [*r.values.values(), r.mean] if v is not None]))
    if rows:
        title = None
        if len(table.baselines) == 1:
            title = f"↑/↓ significantly better/worse than {table.rows[table.baseline].label}"
        elif table.baselines:
            title = "↑x/↓x significantly better/worse than " + ", ".join(
                f"{table.letter(b)}: {table.rows[b].label}" for b in table.baselines)
        ax.legend(fontsize=7, title=title, title_fontsize=7, loc="upper left", bbox_to_anchor=(0.0, -0.22))
    fig.savefig(path, dpi=150, bbox_inches="tight")


def source_note(records: list[RunRecord], command: str) -> str:
    """Where a table came from: the command, the commit it was collected at, and the commits, machines and dates
    its runs were made at (from each run's meta.json)."""
    import datetime

    from .run_dir import describe_cpu, git_state, read_json

    def commit(git: dict) -> str:
        return f"{(git.get('sha') or 'unknown')[:12]}{' (uncommitted changes)' if git.get('dirty') else ''}"

    runs = [m for r in records for m in (r.members or [r]) if r.baseline_name is None]
    commits, machines = {}, {}
    for run in runs:
        meta = read_json(run.run.meta) if run.run.meta.exists() else {}
        commits[commit(meta.get("git") or {})] = None
        hw = meta.get("hardware") or {}
        machines[f"{describe_cpu(hw)}, {hw.get('cpus', '?')} cores"
                 + (f", {', '.join(hw['gpus'])}" if hw.get("gpus") else "")] = None
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return "\n".join(["# Source of this table", "", f"- Command: `{command}`",
                       f"- Collected at commit {commit(git_state())}, {now}.",
                       f"- {len(runs)} run directories, made at commit(s): {', '.join(commits) or 'none'}.",
                       f"- Machines (from the runs' meta.json): {'; '.join(machines) or 'none'}.", ""])


# A run's record: what collect reads to rebuild the run's row, and what says how and where the run was made.
# Models, encodings, indexes, run files and checkpoints stay behind (kilobytes a run instead of gigabytes).
RECORD_FILES = ("config.yaml", "meta.json", "status.json", "metrics.json", "failed.json", "sampling_stats.json",
                "head_scaling.json", "init_report.json", "train_log.jsonl")
RECORD_DIRS = ("per_query", ".hydra")


def _copy_record(src: Path, dst: Path) -> None:
    import shutil

    dst.mkdir(parents=True, exist_ok=True)
    for name in RECORD_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    for name in RECORD_DIRS:
        if (src / name).is_dir():
            shutil.copytree(src / name, dst / name)


def with_kept_runs(paths: list[Path], kept: Path) -> list[Path]:
    """The run directories of ``paths``, plus each run record kept in ``kept`` (by ``keep_runs``, perhaps on
    another machine) whose folder name none of them has: seeds made elsewhere join the table."""
    runs = find_run_dirs(paths)
    names = {p.name for p in runs}
    if not kept.is_dir() or not any(is_run_dir(p) for p in kept.iterdir() if not p.name.startswith(".")):
        return runs
    return runs + [p for p in find_run_dirs([kept]) if p.name not in names]


def keep_runs(records: list[RunRecord], dest: Path) -> list[Path]:
    """Copy the record of every run behind a table (each seed of a seeds row, with its ``baselines/<name>/``) to
    ``dest/<run folder name>``: folders collect reads as the runs themselves, on any machine, after the runs'
    outputs are gone. Two different runs with one folder name are refused before anything is written. A run that
    has not ended (no metrics, no failure: still running, or stopped) is not kept: its record would be a stale
    snapshot, collected as that run long after it finished elsewhere."""
    import shutil

    sources: dict[str, Path] = {}
    for run in (m for r in records for m in (r.members or [r]) if r.baseline_name is None):
        if run.status == STATUS_NO_METRICS:
            log.warning("keep runs: %s has not ended (no metrics.json, no failed.json): not kept", run.path)
            continue
        name, src = run.path.name, run.path.resolve()
        if sources.setdefault(name, src) != src:
            raise LsrError(f"keep runs: two runs are named {name} ({sources[name]}, {src}); rename one")
    kept = []
    for name, src in sources.items():
        target = Path(dest) / name
        if target.resolve() != src:  # else it is a kept record collected again: already there
            tmp = target.with_name(f".{name}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            _copy_record(src, tmp)
            baselines = src / "baselines"
            for sub in sorted(p for p in baselines.iterdir() if p.is_dir()) if baselines.is_dir() else []:
                _copy_record(sub, tmp / "baselines" / sub.name)
            shutil.rmtree(target, ignore_errors=True)
            tmp.rename(target)
        kept.append(target)
    return kept


def write_outputs(table: Table, out_dir: Path, stem: str = "table") -> dict[str, Path]:
    from .run_dir import write_text

    out_dir = Path(out_dir)
    paths = {"markdown": out_dir / f"{stem}.md", "csv": out_dir / f"{stem}.csv", "latex": out_dir / f"{stem}.tex",
             "chart": out_dir / f"{stem}.png"}
    write_text(paths["markdown"], to_markdown(table))
    write_text(paths["csv"], to_csv(table))
    write_text(paths["latex"], to_latex(table))
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_table(table, paths["chart"])
    return paths


# ---------------------------------------------------------------- expected numbers

DEFAULT_TOLERANCE = 0.005
CELL_OK, CELL_FAIL, CELL_SKIP = "OK", "FAIL", "SKIP"


@dataclass
class ExpectedCell:
    dataset: str
    metric: str
    expected: float
    tolerance: float
    actual: float | None = None
    status: str = CELL_FAIL
    reason: str = ""

    def line(self) -> str:
        actual = NA if self.actual is None else f"{self.actual:.4f}"
        text = (f"{'[' + self.status + ']':<6} {self.dataset:<18} {self.metric:<16} expected {self.expected:.4f}  "
                f"actual {actual}  (tolerance {self.tolerance:g})")
        return text + (f"  {self.reason}" if self.reason else "")


def load_expected(path: Path) -> dict:
    """An expected-numbers mapping: the ``expected:`` key of a preset or run config, or a file holding only
    that mapping (``{tolerance, source, datasets: {dataset: {metric: value | {value, tolerance}}}}``)."""
    data = _read_yaml(Path(path)) or {}
    spec = data.get("expected", data) if isinstance(data, dict) else None
    if not isinstance(spec, dict) or not isinstance(spec.get("datasets"), dict) or not spec["datasets"]:
        raise LsrError(f"{path}: no expected numbers (an 'expected:' mapping with 'datasets: {{name: {{metric: "
                       f"value}}}}')")
    return spec


def check_expected(run_path: Path, spec: dict) -> list[ExpectedCell]:
    """One cell per (dataset, metric) of ``spec``: OK within tolerance, FAIL outside it or when the run
    configured the dataset but has no number for it, SKIP when the run did not configure the dataset."""
    record = load_run(Path(run_path))
    default_tol = float(spec.get("tolerance", DEFAULT_TOLERANCE))
    configured = set(((record.config or {}).get("eval") or {}).get("datasets") or {})
    cells = []
    for dataset, metrics in spec["datasets"].items():
        for metric, target in metrics.items():
            value, tol = (target.get("value"), target.get("tolerance", default_tol)) if isinstance(target, dict) \
                else (target, default_tol)
            cell = ExpectedCell(dataset, metric, float(value), float(tol))
            if record.status != STATUS_OK:
                cell.reason = describe_status(record.status, record.error, width=None)
            elif record.config is not None and dataset not in configured:
                cell.status, cell.reason = CELL_SKIP, "dataset not evaluated by this run"
            else:
                cell.actual = record.metrics.get(dataset, {}).get(metric)
                if cell.actual is None:
                    cell.reason = "missing from metrics.json"
                elif abs(cell.actual - cell.expected) <= cell.tolerance + 1e-12:
                    cell.status = CELL_OK
            cells.append(cell)
    return cells


def expected_passed(cells: list[ExpectedCell]) -> bool:
    """True if no cell failed and at least one was checked."""
    return any(c.status == CELL_OK for c in cells) and not any(c.status == CELL_FAIL for c in cells)
