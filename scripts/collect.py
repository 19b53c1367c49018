#!/usr/bin/env python
"""Collect a sweep (or run directories) into one table: table.md, table.csv, table.tex, table.png and source.md
(the command, the commit and the runs' commits and machines).

    scripts/collect.py outputs/sweeps/demo/2026-01-01_00-00-00 --baseline 0
    scripts/collect.py outputs/bm25-local outputs/demo-try1 --include-baselines --baseline bm25 --out tables/
    scripts/collect.py outputs/tables/sampling_cpu --seeds --baseline topk_kl_div --baseline random_kl_div

Rows are labelled by the config choices that differ between runs; failed, unfinished and collapsed runs stay
in the table, marked. The logic lives in lsr_run.collect.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from lsr_run.collect import (LABEL_SOURCES, STAT_TESTS, build_table, keep_runs, load_records, source_note,
                             to_markdown, with_kept_runs, write_outputs)
from lsr_run.errors import LsrError
from lsr_run.run_dir import write_text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path, help="a Hydra multirun directory, or run directories")
    parser.add_argument("--out", type=Path, help="output folder (default: <path>/collected for one path)")
    parser.add_argument("--metric", default="ndcg@10", help="ranx metric name shown per dataset (default ndcg@10)")
    parser.add_argument("--baseline", action="append",
                        help="row to test the others against: its index, label or folder name; repeatable (each "
                             "baseline then has a letter, and marks name it)")
    parser.add_argument("--seeds", action="store_true",
                        help="one row per set of runs that differ only in their seed: mean ± standard deviation, "
                             "tested on per-query values averaged over the seeds")
    parser.add_argument("--alpha", type=float, default=0.05, help="significance level (default 0.05)")
    parser.add_argument("--bonferroni", action="store_true",
                        help="divide alpha by the number of rows compared with the baseline")
    parser.add_argument("--test", choices=STAT_TESTS, default="student",
                        help="paired t-test (default) or Fisher randomisation test, both from ranx")
    parser.add_argument("--include-baselines", action="store_true",
                        help="add the baselines each run evaluated (baselines/<name>/) as rows")
    parser.add_argument("--extra", action="append", default=[], metavar="NAME[:KEY,...]",
                        help="add the numbers of <run>/NAME.json as columns (e.g. sampling_stats); repeatable")
    parser.add_argument("--label-from", choices=LABEL_SOURCES, default="auto",
                        help="row labels: differing overrides (auto: when every run has .hydra/overrides.yaml, "
                             "else differing config keys), or the run folder names")
    parser.add_argument("--keep-runs", action="store_true",
                        help="copy each run's record (config, meta, metrics, per-query values, stats; no models or "
                             "indexes) to <out>/runs/, and add the records kept there before whose runs are not "
                             "given: a table re-collected on another machine keeps its earlier seeds")
    parser.add_argument("--recompute", action="store_true",
                        help="score a metric missing from metrics.json from runs/*.trec and the qrels "
                             "(loads each dataset)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.out is None:
        if len(args.paths) != 1:
            print("collect: give --out when collecting several paths", file=sys.stderr)
            return 2
        args.out = args.paths[0] / "collected"
    try:
        run_paths = with_kept_runs(args.paths, args.out / "runs") if args.keep_runs else args.paths
        records = load_records(run_paths, include_baselines=args.include_baselines, label_from=args.label_from,
                               seeds=args.seeds)
        table = build_table(records, metric=args.metric, baseline=args.baseline, alpha=args.alpha,
                            bonferroni=args.bonferroni, test=args.test, recompute=args.recompute,
                            extras=args.extra)
        # the source note first: the table's own new files would make the checkout read as changed
        note = source_note(records, " ".join(["scripts/collect.py", *map(shlex.quote, argv)]))
        if args.keep_runs:
            keep_runs(records, args.out / "runs")
        paths = write_outputs(table, args.out)
        paths["source"] = args.out / "source.md"
        write_text(paths["source"], note)
    except LsrError as e:
        print(f"collect: {e}", file=sys.stderr)
        return 2
    print(to_markdown(table))
    print("rows (for --baseline): " + "; ".join(f"{i}: {row.label}" for i, row in enumerate(table.rows)))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
