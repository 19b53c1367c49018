#!/usr/bin/env python
"""Check a run's metrics against expected numbers, cell by cell: OK / FAIL / SKIP, like Anserini's regressions.

    scripts/check_expected.py outputs/bm25-local conf/experiment/bm25.yaml
    scripts/check_expected.py outputs/bm25-beir          # the `expected:` saved in the run's own config.yaml

The expected file is an experiment preset (or any YAML) with an `expected:` mapping:
    expected: {tolerance: 0.005, source: ..., datasets: {scifact: {ndcg@10: 0.6789}}}
A cell may carry its own tolerance: {ndcg@10: {value: 0.6789, tolerance: 0.01}}. Exits 1 on any FAIL, or
when no cell could be checked.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lsr_run.collect import CELL_FAIL, CELL_OK, CELL_SKIP, check_expected, expected_passed, load_expected
from lsr_run.errors import LsrError
from lsr_run.run_dir import RunDir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run directory (with metrics.json)")
    parser.add_argument("expected", type=Path, nargs="?",
                        help="YAML with an `expected:` mapping (default: the run's config.yaml)")
    args = parser.parse_args(argv)
    source = args.expected or RunDir(args.run_dir).config
    try:
        spec = load_expected(source)
        cells = check_expected(args.run_dir, spec)
    except (LsrError, OSError) as e:
        print(f"check_expected: {e}", file=sys.stderr)
        return 2
    print(f"{args.run_dir} against {source}" + (f" ({spec['source']})" if spec.get("source") else ""))
    for cell in cells:
        print(cell.line())
    passed = expected_passed(cells)
    counts = {status: sum(c.status == status for c in cells) for status in (CELL_OK, CELL_FAIL, CELL_SKIP)}
    print(("PASS" if passed else "FAIL") + ": " + ", ".join(f"{n} {status}" for status, n in counts.items()))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
