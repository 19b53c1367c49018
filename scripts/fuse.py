#!/usr/bin/env python
"""Fuse the runs of finished run directories into a hybrid run directory (ranx fusion), scored like a run:

    scripts/fuse.py outputs/tables/ood_cpu/bm25 outputs/tables/ood_cpu/demo_s42 --out outputs/fused/bm25+demo
    scripts/fuse.py RUN_A RUN_B --method rrf --out outputs/fused/rrf

Every dataset the runs share is fused (per query: each run's scores normalised, then combined) and scored on the
first run's judgements. `scripts/collect.py` reads the output folder like any run (its config gains `fusion`).
The logic lives in lsr_run.fusion.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lsr_run.errors import LsrError
from lsr_run.fusion import METHODS, fuse_runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished run directories (two or more)")
    parser.add_argument("--out", type=Path, required=True, help="the fused run directory to write")
    parser.add_argument("--method", choices=METHODS, default="wsum", help="ranx fusion method (default wsum)")
    parser.add_argument("--norm", default="min-max", help="ranx score normalisation (default min-max)")
    parser.add_argument("--weights", type=float, nargs="+", help="wsum: one weight per run (default equal)")
    parser.add_argument("--k", type=int, help="results kept per query (default: the first run's eval.k)")
    args = parser.parse_args(argv)
    try:
        metrics = fuse_runs(args.runs, args.out, args.method, args.norm, args.weights, args.k)
    except LsrError as e:
        print(f"fuse: {e}", file=sys.stderr)
        return 2
    print(json.dumps(metrics, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
