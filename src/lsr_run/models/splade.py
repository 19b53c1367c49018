"""The SPLADE encoder: max over tokens of log(1 + relu(MLM logits)), padding masked.

relu and log1p are monotone, so the max is taken over the raw logits first (same output, one activation per
vocabulary entry instead of one per token and entry). ``SpladeEncoder`` also owns saving and reloading: the
model folder holds the weights, the tokenizer and ``lsr_run.json`` with the settings a reload needs (identity
head, head scaling record), so a reloaded model scores exactly as the saved one.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn


log = logging.getLogger(__name__)


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:  # native bf16 on CPU (AVX512-BF16 / AMX)
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def is_auto(setting) -> bool:
    return setting is None or str(setting).lower() == "auto"


def switch(setting, auto: bool, key: str = "setting") -> bool:
    """An ``auto | true | false`` setting -> bool: a bool, or its text in any case (a config's ``false`` reaches a
    ``str`` field as ``"False"``, which ``bool()`` would read as true); ``auto`` gives ``auto``."""
    if is_auto(setting):
        return auto
    text = str(setting).lower()
    if text not in ("true", "false"):
        from ..errors import ConfigError

        raise ConfigError(f"{key}={setting}: allowed auto, true, false")
    return text == "true"


def resolve_bf16(setting, device: torch.device, key: str = "bf16") -> bool:
    """bf16 autocast on or off: ``auto`` is on where the device computes bf16 natively (CUDA, AMX/AVX512-BF16)."""
    return bf16_supported(device) if is_auto(setting) else switch(setting, False, key)


def splade_pool(logits: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L, V) logits, (B, L) mask -> (B, V) weights = max_t log(1 + relu(logit_t)) over real tokens."""
    masked = logits.masked_fill(~attention_mask.bool().unsqueeze(-1), float("-inf"))
    return torch.log1p(torch.relu(masked.amax(dim=1)))


class SpladeEncoder(nn.Module):
    """SPLADE over any masked LM. ``forward`` -> (B, V) non-negative term weights.

    ``chunk`` > 0 computes the vocabulary projection in chunks (``max_logits``): same output, peak memory
    independent of the vocabulary size, faster backward. It applies to architectures whose head transform is a
    module (BERT, ModernBERT); others use the full logits.
    """

    def __init__(self, mlm: nn.Module, tokenizer, settings: dict | None = None, chunk: int = 4096):
        super().__init__()
        self.mlm = mlm
        self.tokenizer = tokenizer
        self.settings = dict(settings or {})
        self.chunk = chunk
        # fp32 on a CPU with native bf16: the head screened through bf16 (max_logits); None: where it pays
        self.screen: bool | None = None
        from .attention import use_fp32_backward_attention
        from .backbone import head_transform_path
        from .cpu_gemm import use_cpu_gemm

        use_fp32_backward_attention(mlm)  # bf16 training on a CPU attends in fp32: faster there, and closer to exact
        use_cpu_gemm(mlm)  # fp32 linear layers on a CPU through oneDNN where the backend says so (encode.cpu_gemm)
        path = head_transform_path(mlm)
        self._transform_path = path if path and chunk > 0 else None

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def vocab_size(self) -> int:
        return self.mlm.get_output_embeddings().weight.shape[0]

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.mlm(input_ids=input_ids, attention_mask=attention_mask).logits

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self._transform_path is None:
            return splade_pool(self.logits(input_ids, attention_mask), attention_mask).float()
        from .max_logits import max_logits

        hidden = self.mlm.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        transform = self.mlm.get_submodule(self._transform_path)
        decoder = self.mlm.get_output_embeddings()
        top = max_logits(transform(hidden), decoder.weight, decoder.bias, attention_mask, self.chunk,
                         relu_follows=True, screen=self.screen)
        return torch.log1p(torch.relu(top))

    def tokenize(self, texts: Sequence[str], max_length: int, device="model") -> dict[str, torch.Tensor]:
        """Padded ``input_ids`` and ``attention_mask`` on the model's device (``device=None``: left on the CPU)."""
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=max_length,
                             return_tensors="pt", return_token_type_ids=False)
        if device is None:
            return dict(enc)
        return {k: v.to(self.device if device == "model" else device) for k, v in enc.items()}

    def encode_batch(self, texts: Sequence[str], max_length: int) -> torch.Tensor:
        batch = self.tokenize(texts, max_length)
        return self(batch["input_ids"], batch["attention_mask"])

    def token_batches(self, texts: Sequence[str], max_length: int, batch_size: int,
                      max_tokens: int) -> tuple[list[list[int]], list[list[int]]]:
        """-> (batches of positions, token ids per text). Texts sorted by token count, longest first; each batch
        takes as many as fit ``max_tokens`` padded tokens (batch size x its longest text), at most ``batch_size``,
        at least one: short texts go in large batches, long ones in small."""
        if not texts:
            return [], []
        ids = self.tokenizer(list(texts), truncation=True, max_length=max_length, return_attention_mask=False,
                             return_token_type_ids=False)["input_ids"]
        order = sorted(range(len(texts)), key=lambda i: -len(ids[i]))
        batches, start = [], 0
        while start < len(order):
            n = max(1, min(batch_size, max_tokens // max(1, len(ids[order[start]]))))
            batches.append(order[start:start + n])
            start += n
        return batches, ids

    def collate(self, ids: list[list[int]]) -> dict[str, torch.Tensor]:
        """Right-padded ``input_ids`` and ``attention_mask`` (on the CPU) from token ids, as ``tokenize`` pads."""
        longest = max(len(row) for row in ids)
        input_ids = torch.full((len(ids), longest), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(ids), longest), dtype=torch.long)
        for i, row in enumerate(ids):
            input_ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, :len(row)] = 1
        return {"input_ids": input_ids, "attention_mask": mask}

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], max_length: int, batch_size: int = 32, bf16="auto",
               progress: str | None = None, prefetch: bool | None = None,
               max_tokens: int | None = None) -> Iterator[tuple[list[int], torch.Tensor]]:
        """Yield (positions, weights) per batch; batches hold texts of similar length (fewer pad tokens).

        ``max_tokens``: batches formed by a token budget (``token_batches``) over texts tokenised once, rather
        than ``batch_size`` texts each. ``prefetch`` (default: on with CUDA) prepares the next batch in a thread,
        into pinned memory, while the device computes this one; the batches and the weights are the same either
        way."""
        from tqdm.auto import tqdm

        was_training = self.training
        self.eval()
        if max_tokens:
            batches, ids = self.token_batches(texts, max_length, batch_size, max_tokens)
        else:
            lengths = [len(t) for t in texts]
            order = sorted(range(len(texts)), key=lambda i: -lengths[i])
            batches, ids = [order[start:start + batch_size] for start in range(0, len(order), batch_size)], None
        use_bf16 = resolve_bf16(bf16, self.device)
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()
        cuda = self.device.type == "cuda"

        def tokens(positions: list[int]) -> dict[str, torch.Tensor]:
            if ids is None:
                enc = self.tokenize([texts[i] for i in positions], max_length, device=None)
            else:
                enc = self.collate([ids[i] for i in positions])
            return {k: v.pin_memory() for k, v in enc.items()} if cuda else enc

        pool = None
        if (cuda if prefetch is None else prefetch) and len(batches) > 1:
            from concurrent.futures import ThreadPoolExecutor

            pool = ThreadPoolExecutor(1, thread_name_prefix="lsr-run-tokenize")
        bar = tqdm(total=len(texts), desc=progress, unit="text", disable=progress is None, mininterval=2)
        try:
            ahead = pool.submit(tokens, batches[0]) if pool else None
            for k, positions in enumerate(batches):
                enc = ahead.result() if pool else tokens(positions)
                if pool and k + 1 < len(batches):
                    ahead = pool.submit(tokens, batches[k + 1])
                enc = {key: v.to(self.device, non_blocking=True) for key, v in enc.items()}
                with autocast:
                    weights = self(enc["input_ids"], enc["attention_mask"])
                yield positions, weights.float()
                bar.update(len(positions))
        finally:
            bar.close()
            if pool:
                pool.shutdown(wait=True, cancel_futures=True)
            self.train(was_training)

    # ------------------------------------------------------------ persistence
    def save(self, path: Path, max_length: int = 256) -> None:
        """Weights (every tensor, checked on load), tokenizer, ``lsr_run.json``, sentence-transformers config."""
        from .persist import save_model

        save_model(self.mlm, self.tokenizer, self.settings, Path(path), max_length)

    @classmethod
    def load(cls, path: Path) -> "SpladeEncoder":
        from .persist import load_model

        mlm, tokenizer, settings = load_model(Path(path))
        return cls(mlm, tokenizer, settings)
