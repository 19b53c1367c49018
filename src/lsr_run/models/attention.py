"""Attention for training in bf16 on a CPU.

PyTorch's CPU flash-attention kernel is slow in bf16 with a gradient: at MiniLM's shapes (16 texts, 12 heads of 32
dimensions, 256 tokens) its backward takes about twice as long in bf16 as in fp32, and attention becomes a third of
a bf16 training step although it holds a few percent of the step's FLOPs. ``lsr_run_sdpa`` is PyTorch's
scaled-dot-product attention, as transformers calls it, except that on a CPU, under a gradient, bf16 (or fp16) query,
key and value are attended in fp32 and the output is cast back. That is faster there and closer to exact than the
bf16 kernel. Everything else (inference, CUDA, fp32) goes to transformers' ``sdpa`` unchanged.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations import sdpa_attention as _sdpa
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "lsr_run_sdpa"
_LOW_PRECISION = (torch.bfloat16, torch.float16)


def upcast_needed(query: torch.Tensor) -> bool:
    return (query.device.type == "cpu" and query.dtype in _LOW_PRECISION and torch.is_grad_enabled()
            and query.requires_grad)


def sdpa_fp32_backward(module, query, key, value, attention_mask, *args, **kwargs):
    """transformers' ``sdpa_attention_forward``, run in fp32 when ``upcast_needed``; -> (output, None)."""
    if not upcast_needed(query):
        return _sdpa.sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)
    dtype = query.dtype
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    bias = kwargs.get("position_bias")
    if bias is not None and bias.is_floating_point():
        kwargs["position_bias"] = bias.float()
    with torch.autocast("cpu", enabled=False):
        out, weights = _sdpa.sdpa_attention_forward(module, query.float(), key.float(), value.float(),
                                                    attention_mask, *args, **kwargs)
    return out.to(dtype), weights


def register() -> str:
    """Make ``NAME`` known to transformers, with sdpa's masks (idempotent); -> NAME.

    Without a mask function of its own, transformers builds no mask for an implementation it does not know, and
    padding would be attended.
    """
    AttentionInterface.register(NAME, sdpa_fp32_backward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME


def use_fp32_backward_attention(mlm: torch.nn.Module) -> bool:
    """Switch a masked LM that attends with ``sdpa`` to ``NAME``; -> whether it was switched.

    The name is not written to a saved config (transformers keeps the implementation out of config.json), so a
    saved model loads anywhere with plain ``sdpa``.
    """
    config = getattr(mlm, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    register()
    mlm.set_attn_implementation(NAME)
    return True
