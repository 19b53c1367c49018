"""Side by side in one run: the max-logits backward as a gather/scatter-add over winning tokens (lsr-run now)
against the dense formulation it replaced (a (B, L, active V) one-hot gradient multiplied by the decoder, twice).

    python scripts/bench_backward.py [--batch 32] [--length 192] [--active 550] [--repeats 5]

Shapes default to the demo's documents (minilm_l6: H=384, V=30522; 192 tokens; about 550 active terms per
document after training, i.e. non-zero gradients per text). Prints seconds per backward for each, the ratio, the
largest gradient difference, the load average and the CPU (name it with every figure).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from lsr_run.models.max_logits import _forward


def dense_backward(hidden, weight, index, grad, chunk: int = 4096):
    """The replaced backward: per chunk of active entries, a (B, L, C) one-hot gradient times the decoder."""
    b, length, width = hidden.shape
    h = hidden.reshape(b * length, width)
    grad_hidden = torch.zeros(b, length, width)
    grad_weight = torch.zeros_like(weight)
    active = torch.nonzero((grad != 0).any(0)).squeeze(1)
    for start in range(0, active.numel(), chunk):
        cols = active[start:start + chunk]
        g = torch.zeros(b, length, cols.numel())
        g.scatter_(1, index[:, cols].unsqueeze(1), grad[:, cols].unsqueeze(1))
        grad_hidden += torch.matmul(g, weight[cols])
        grad_weight[cols] = g.reshape(b * length, -1).T @ h
    return grad_hidden, grad_weight


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--length", type=int, default=192)
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--vocab", type=int, default=30522)
    p.add_argument("--active", type=int, default=550, help="non-zero gradients per text")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.manual_seed(0)
    b, length = args.batch, args.length
    hidden = torch.randn(b, length, args.width)
    weight = torch.randn(args.vocab, args.width) * 0.05
    mask = torch.ones(b, length, dtype=torch.long)
    _, index = _forward(hidden, weight, mask, 4096, with_index=True)
    grad = torch.zeros(b, args.vocab)
    for row in range(b):
        grad[row, torch.randperm(args.vocab)[:args.active]] = torch.randn(args.active)

    from types import SimpleNamespace

    from lsr_run.models.max_logits import _MaxLogits

    # the autograd Function's backward called directly, with what its forward saved: the backward alone
    ctx = SimpleNamespace(saved_tensors=(hidden, weight, index), needs_input_grad=(True, True, False),
                          has_bias=False, chunk=4096, dtype=torch.float32)
    fns = {"sparse": lambda: _MaxLogits.backward(ctx, grad)[:2],
           "dense": lambda: dense_backward(hidden, weight, index, grad)}
    times = {"sparse": [], "dense": []}
    results = {}
    for _ in range(args.repeats):  # interleaved, so both see the same machine load
        for name, fn in fns.items():
            start = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - start)
    sparse_bwd = min(times["sparse"])
    diff = max(float((a - b_).abs().max()) for a, b_ in zip(results["sparse"], results["dense"]))
    out = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "load_average": os.getloadavg(),
           "shape": {"batch": b, "length": length, "width": args.width, "vocab": args.vocab,
                     "active_per_text": args.active},
           "backward_seconds": {"sparse": sparse_bwd, "dense": min(times["dense"])},
           "ratio_dense_over_sparse": min(times["dense"]) / sparse_bwd, "max_abs_grad_diff": diff}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
