"""fp32 linear layers on a CPU through oneDNN where MKL's fp32 GEMM is slow.

PyTorch's CPU wheels run fp32 ``F.linear`` / ``matmul`` through MKL's sgemm, and MKL picks its fastest kernels for
Intel CPUs only: on an AMD EPYC Zen 5 (AVX-512) it reaches 126-143 GFLOP/s on MiniLM's GEMM shapes, where oneDNN
(bundled with the same wheels, and dispatching by instruction set rather than vendor) reaches 220-375 GFLOP/s
(2 cores, measured side by side). ``linear`` sends fp32 CPU linear layers to oneDNN's ``_linear_pointwise`` when
the backend is ``onednn``: the same products summed in another order (a few ulps apart, as with another thread
count), with a backward whose grad-input GEMM is oneDNN's too. bf16/autocast, CUDA and ``torch.compile`` go to ``F.linear``
unchanged (bf16 already runs on oneDNN).

The backend is process-wide (``encode.cpu_gemm``, set once per run): ``auto`` is ``onednn`` on x86 CPUs whose
vendor is not Intel, ``mkl`` elsewhere; ``onednn`` / ``mkl`` force either.
"""

from __future__ import annotations

import logging
import platform

import torch
from torch import nn
from torch.nn import functional as F

log = logging.getLogger(__name__)

CHOICES = ("auto", "onednn", "mkl")
_setting = "auto"
_resolved: bool | None = None


def cpu_vendor(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The x86 vendor string (``GenuineIntel``, ``AuthenticAMD``, ...), or '' where it cannot be read."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _op_available() -> bool:
    try:
        x, w = torch.ones(2, 3), torch.ones(4, 3)
        return bool(torch.equal(torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""), x @ w.T))
    except (AttributeError, RuntimeError):
        return False


def check(setting, key: str = "encode.cpu_gemm") -> str:
    """A backend setting in lower case, or a ConfigError that names ``key``."""
    text = str(setting).lower()
    if text not in CHOICES:
        from ..errors import ConfigError

        raise ConfigError(f"{key}={setting}: allowed {', '.join(CHOICES)}")
    return text


def set_backend(setting: str = "auto", key: str = "encode.cpu_gemm") -> bool:
    """Choose the fp32 CPU GEMM backend for this process; -> whether oneDNN is used."""
    global _setting, _resolved
    _setting, _resolved = check(setting, key), None
    return onednn()


def onednn() -> bool:
    """Whether fp32 CPU linear layers go to oneDNN (resolved once per setting)."""
    global _resolved
    if _resolved is None:
        if _setting == "mkl":
            _resolved = False
        else:
            x86 = platform.machine().lower() in ("x86_64", "amd64")
            wanted = _setting == "onednn" or (x86 and cpu_vendor() not in ("", "GenuineIntel"))
            _resolved = wanted and torch.backends.mkldnn.is_available() and _op_available()
            if wanted and not _resolved:
                log.warning("encode.cpu_gemm=%s: oneDNN's linear is not available in this torch build; fp32 "
                            "linear layers use the default BLAS", _setting)
    return _resolved


def _dense(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T + bias by oneDNN (fp32, CPU, any leading dimensions of x)."""
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight.contiguous(), bias, "none", [], "")


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _dense(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        flat = grad.reshape(-1, grad.shape[-1])
        if ctx.needs_input_grad[0]:
            grad_x = _dense(grad, weight.t(), None)  # grad @ W
        if ctx.needs_input_grad[1]:
            # grad.T @ x by the default BLAS: oneDNN would need grad transposed into a copy, which costs more
            # than the GEMM saves (a (6144 x 1536) transpose: 26 ms, the GEMM 41 ms by MKL, 18 ms by oneDNN)
            grad_w = torch.mm(flat.t(), x.reshape(-1, x.shape[-1]))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = flat.sum(0)
        return grad_x, grad_w, grad_b


def applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.dtype == torch.float32 and weight.dtype == torch.float32 and x.device.type == "cpu"
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling() and onednn())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, through oneDNN for fp32 on a CPU when the backend says so."""
    if not applies(x, weight) or (bias is not None and bias.dtype != torch.float32):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return _Linear.apply(x, weight, bias)
    return _dense(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` whose forward is ``linear``: same parameters, state dict and saved form."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def use_cpu_gemm(module: nn.Module) -> int:
    """Make every plain ``nn.Linear`` inside ``module`` a ``Linear`` (in place, parameters kept); -> how many."""
    count = 0
    for sub in module.modules():
        if type(sub) is nn.Linear:
            sub.__class__ = Linear
            count += 1
    return count
