"""A teacher measured as a reranker: BM25's top ``depth`` per test query, re-scored by the teacher, nDCG@10 of both.

A student distilled from a teacher's scores can hardly rank better than the teacher ranks the same candidates, so a
teacher is worth using only where it reranks BM25's candidates better than BM25 orders them. This prints, per
dataset, BM25's nDCG@10 and the teacher's over the same candidates (scored with ranx, as every lsr-run metric),
with a paired t-test of the teacher against BM25 over the queries, and writes them, per query too, to a JSON.
Teacher scores are cached under the JSON's folder by content, so a rerun costs only BM25's search.

    python scripts/rerank.py [--teacher bi_encoder] [--set KEY=VALUE] [--datasets scifact,cranfield,cisi] [--depth 100]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for key, value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                   "LSR_DATA_DIR": str(ROOT.parent / "shared" / "data")}.items():
    os.environ.setdefault(key, value)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="bi_encoder", help="a conf/teacher option (default: %(default)s)")
    p.add_argument("--datasets", default="scifact,cranfield,cisi")
    p.add_argument("--depth", type=int, default=100, help="BM25 candidates per query (default: %(default)s)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the teacher's config, e.g. --set model=outputs/teachers/ce (repeatable)")
    p.add_argument("--metrics", default="ndcg@10,recall@100")
    p.add_argument("--out", type=Path, default=None, help="JSON (default: outputs/rerank/<teacher>.json)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from lsr_run.backends.lucene import LuceneBm25Backend
    from lsr_run.collect import paired_test
    from lsr_run.evaluation import evaluate_run
    from lsr_run.components import EvalDataset, load_spec

    node = OmegaConf.load(ROOT / "conf" / "teacher" / f"{args.teacher}.yaml")
    node.cache_dir = None
    for item in args.set:
        key, sep, _ = item.partition("=")
        if not sep or key not in node:
            raise SystemExit(f"--set {item}: expected KEY=VALUE with KEY one of {', '.join(map(str, node))}")
    node = OmegaConf.merge(node, OmegaConf.from_dotlist(args.set))
    teacher = instantiate(node)
    metrics = args.metrics.split(",")
    out = args.out or ROOT / "outputs" / "rerank" / f"{args.teacher}.json"
    work = out.parent / "work"
    result = {"teacher": OmegaConf.to_container(node), "depth": args.depth, "datasets": {}}
    for name in args.datasets.split(","):
        ds = load_spec(EvalDataset(name=name, split="test"), os.environ["LSR_DATA_DIR"], None)
        queries = ds.judged_queries()
        run = LuceneBm25Backend(k1=0.9, b=0.4).top(ds, queries, args.depth, work)
        start = time.time()
        # scores cached by content (teacher, its weights, the pairs and their texts): a rerun costs nothing
        scores = teacher.score(queries, ds.corpus, {q: list(docs) for q, docs in run.items()}, work / "teacher-cache")
        seconds = time.time() - start
        (bm25_means, bm25_pq), (means, pq) = (evaluate_run(ds.qrels, r, metrics) for r in (run, scores))
        first = metrics[0]
        per_query = {"bm25": {q: v[first] for q, v in bm25_pq.items()}, "teacher": {q: v[first] for q, v in pq.items()}}
        p_value = paired_test(per_query["bm25"], per_query["teacher"])
        entry = {"queries": len(queries), "teacher_seconds": seconds, "bm25": bm25_means, "teacher": means,
                 f"p_value_vs_bm25_{first}": p_value, f"per_query_{first}": per_query}
        result["datasets"][name] = entry
        mark = "" if p_value is None or p_value >= 0.05 else (" ↑" if means[first] > bm25_means[first] else " ↓")
        p_text = "untestable" if p_value is None else f"{p_value:.4f}"
        print(f"{name}: BM25 {bm25_means[first]:.4f}, {args.teacher} over BM25's top {args.depth} "
              f"{means[first]:.4f}{mark} ({first}; paired t-test against BM25: p {p_text}; "
              f"{len(queries)} queries, {seconds:.0f} s)", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"figures: {out}")


if __name__ == "__main__":
    main()
