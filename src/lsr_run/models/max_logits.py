"""Max-pooled MLM logits without materialising (batch x length x vocabulary) for autograd.

SPLADE needs, per text and vocabulary entry, max_t (h_t . E_v + b_v) over real tokens. The naive way builds the
(B, L, V) logits tensor and keeps it for backward (30k-50k wide per token). ``max_logits`` computes the
projection in vocabulary chunks, keeps only the running max and the winning token per (text, entry), and in
backward scatters the gradient back onto the winning tokens only, for the vocabulary entries that
received a gradient: two matmuls per chunk, peak memory
O(B * L * chunk) instead of O(B * L * V). Output equals ``(h @ E.T + b).masked_fill(pad, -inf).amax(1)``.
"""

from __future__ import annotations

import torch


def _compute_dtype(device_type: str, dtype: torch.dtype) -> torch.dtype:
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return dtype


class _MaxLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, mask, chunk, dtype):
        b, length, _ = hidden.shape
        vocab = weight.shape[0]
        h = hidden.to(dtype)
        pad = ~mask.bool().unsqueeze(-1)
        values = torch.empty(b, vocab, dtype=torch.float32, device=hidden.device)
        index = torch.empty(b, vocab, dtype=torch.long, device=hidden.device)
        for start in range(0, vocab, chunk):
            end = min(start + chunk, vocab)
            logits = torch.matmul(h, weight[start:end].to(dtype).T)  # (B, L, C)
            logits.masked_fill_(pad, float("-inf"))
            v, i = logits.max(dim=1)
            values[:, start:end] = v.float()
            index[:, start:end] = i
        if bias is not None:
            values += bias.float()
        ctx.save_for_backward(hidden, weight, index)
        ctx.has_bias = bias is not None
        ctx.chunk, ctx.dtype = chunk, dtype
        return values

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, index = ctx.saved_tensors
        b, length, width = hidden.shape
        vocab = weight.shape[0]
        dtype = ctx.dtype
        h = hidden.to(dtype).reshape(b * length, width)
        grad_hidden = torch.zeros(b, length, width, dtype=torch.float32, device=hidden.device)
        grad_weight = torch.zeros(vocab, width, dtype=torch.float32, device=hidden.device) \
            if ctx.needs_input_grad[1] else None
        # relu zeroes the gradient of every entry whose max logit is <= 0: only entries active somewhere in
        # the batch need the two backward matmuls (a few thousand of 30k once training has sparsified)
        active = torch.nonzero((grad != 0).any(0)).squeeze(1)
        for start in range(0, active.numel(), ctx.chunk):
            cols = active[start:start + ctx.chunk]
            g = torch.zeros(b, length, cols.numel(), dtype=dtype, device=hidden.device)
            g.scatter_(1, index[:, cols].unsqueeze(1), grad[:, cols].to(dtype).unsqueeze(1))
            w = weight[cols].to(dtype)
            grad_hidden += torch.matmul(g, w).float()
            if grad_weight is not None:
                grad_weight[cols] = (g.reshape(b * length, -1).T @ h).float()
        grad_bias = grad.sum(0).to(weight.dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return (grad_hidden.to(hidden.dtype), None if grad_weight is None else grad_weight.to(weight.dtype),
                grad_bias, None, None, None)


def max_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, mask: torch.Tensor,
               chunk: int = 4096) -> torch.Tensor:
    """(B, L, H) hidden, (V, H) decoder weight, (V,) bias, (B, L) mask -> (B, V) float32 max logits."""
    dtype = _compute_dtype(hidden.device.type, hidden.dtype)
    with torch.autocast(hidden.device.type, enabled=False):
        return _MaxLogits.apply(hidden, weight, bias, mask, chunk, dtype)
