#!/usr/bin/env python
"""Mean terms per document of what finished vector runs retrieve, beside the corpus and the relevant documents:

    scripts/term_bias.py outputs/tables/ood_prune/demo_s2 outputs/tables/ood_prune/doc_top256_s2

A run whose top results carry many more terms than the relevant documents ranks by term count as much as by
match (a length bias of the dot product). Prints a Markdown table; `--json FILE` writes the figures. The logic
lives in lsr_run.term_bias.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lsr_run.errors import LsrError
from lsr_run.term_bias import markdown, term_bias


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished run directories of a vector backend")
    parser.add_argument("--depth", type=int, default=10, help="results counted per query (default 10)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    try:
        results = {str(run): term_bias(run, args.depth) for run in args.runs}
    except LsrError as e:
        print(f"term_bias: {e}", file=sys.stderr)
        return 2
    print(markdown(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
