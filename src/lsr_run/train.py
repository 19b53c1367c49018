"""The training loop: sampled groups -> SPLADE scores -> ranking loss + regularizer -> AdamW.

Everything a step needs is a function of the global step: the batch (query order is a seeded permutation per
epoch, negatives are sampled per (seed, epoch, query id)), the regularizer weights and the learning rate. A
resumed run therefore continues exactly where the checkpoint left it. Checkpoints hold model, optimizer,
scheduler, step and RNG states and are written atomically.

Collapse watch: every ``collapse.check_every`` steps the mean active terms of queries and documents are
checked; vectors nearly all active (> ``dense_fraction`` of the vocabulary) or all zero for ``patience``
consecutive checks, or a non-finite loss beyond ``max_nonfinite``, stop the run with ``collapsed: true``.
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import os
import random
import re
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import ConfigError, LsrError
from .losses import RankingLoss, ScoredBatch
from .models.splade import SpladeEncoder, resolve_bf16, switch
from .run_dir import RunDir, atomic_path
from .sampling import item_rng

FUSED_ADAMW_DEVICES = ("cuda", "cpu")
# freed blocks below this size stay in the process for reuse (glibc malloc; see keep_freed_memory)
KEEP_FREED_BYTES = 256 << 20


def keep_freed_memory(limit: int = KEEP_FREED_BYTES) -> bool:
    """Let glibc's malloc keep freed blocks of up to ``limit`` bytes for reuse; -> whether it applied (glibc only).

    By default glibc hands any freed block of 32 MB or more back to the OS at once, so a training step on a CPU
    page-faults its large buffers afresh every time: at MiniLM's vocabulary four 47 MB embedding gradients a
    step, about 12 ms each on 2 cores. Kept, they are reused: 5-20% less time a step there, the same peak memory.
    Process-wide, as an allocator choice (tcmalloc, jemalloc) would be.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    return bool(libc.mallopt(m_mmap_threshold, limit)) and bool(libc.mallopt(m_trim_threshold, 2 * limit))

log = logging.getLogger(__name__)


@dataclass
class CollapseSpec:
    check_every: int = 10
    patience: int = 3
    dense_fraction: float = 0.5
    min_terms: float = 1.0
    evaluate: bool = False  # also encode, index and score a collapsed model (dense vectors: slow, large index)


@dataclass
class TrainSpec:
    batch_size: int = 8
    grad_accum: int = 1
    max_steps: int = 200
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_steps: int = 20
    max_grad_norm: float = 1.0
    query_max_length: int = 64
    doc_max_length: int = 256
    bf16: str = "auto"
    dropout: float | None = None  # None keeps the backbone's; 0 turns dropout off (it is costly on CPU)
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% more time
    log_every: int = 10
    save_every: int = 50
    nonfinite: str = "skip"  # skip | stop
    max_nonfinite: int = 10
    # the next micro-batch sampled, read and tokenised in a thread while this one runs (the batches are the same
    # either way). auto: on with CUDA; on a CPU the thread competes with the model's threads
    prefetch: str = "auto"
    # torch.compile the encoder (in place: the weights' names stay as they are), with dynamic shapes since batch
    # lengths vary; the first steps pay the compilation (about a minute for a tiny model on 2 CPU cores)
    compile: bool = False
    collapse: CollapseSpec = field(default_factory=CollapseSpec)

    def validate(self) -> None:
        checks = {"batch_size": self.batch_size >= 1, "grad_accum": self.grad_accum >= 1,
                  "max_steps": self.max_steps >= 1, "lr": self.lr > 0, "warmup_steps": self.warmup_steps >= 0,
                  "weight_decay": self.weight_decay >= 0, "log_every": self.log_every >= 1,
                  "save_every": self.save_every >= 1, "nonfinite": self.nonfinite in ("skip", "stop")}
        for key, ok in checks.items():
            if not ok:
                raise ConfigError(f"train.{key}={getattr(self, key)}: out of range")
        for key in ("bf16", "prefetch"):
            switch(getattr(self, key), False, f"train.{key}")


@dataclass
class TrainingData:
    """Per training query: text, positives, ranked candidate pool and (optional) teacher scores."""

    queries: dict[str, str]
    positives: dict[str, list[str]]
    pools: dict[str, list[str]]
    corpus: object
    teacher: dict[str, dict[str, float]] | None = None

    def __post_init__(self) -> None:
        self.qids = sorted(q for q in self.positives if q in self.pools)
        if self.teacher is not None:
            # keep only candidates and positives that the teacher scored
            for q in self.qids:
                scored = self.teacher.get(q, {})
                self.pools[q] = [d for d in self.pools[q] if d in scored]
                self.positives[q] = [d for d in self.positives[q] if d in scored]
            self.qids = [q for q in self.qids if self.pools[q] and self.positives[q]]
        if not self.qids:
            raise LsrError("no training query has both a positive and a candidate (check data and teacher)")

    def group(self, qid: str, sampler, seed: int, epoch: int) -> tuple[list[str], list[float] | None]:
        """[positive, negatives...] and their teacher scores, pure in (seed, epoch, qid)."""
        rng = item_rng(seed, epoch, qid)
        pos = self.positives[qid][int(rng.integers(len(self.positives[qid])))]
        pool = self.pools[qid]
        scores = None
        if self.teacher is not None:
            scores = np.array([self.teacher[qid][d] for d in pool])
        negs = sampler.sample(pool, scores, rng)
        docs = [pos] + negs
        teacher = [self.teacher[qid][d] for d in docs] if self.teacher is not None else None
        return docs, teacher


def epoch_order(qids: list[str], seed: int, epoch: int) -> list[str]:
    rng = np.random.default_rng([int(seed), int(epoch), 7])
    return [qids[i] for i in rng.permutation(len(qids))]


def batch_at(data: TrainingData, sampler, seed: int, micro_index: int, batch_size: int):
    """The micro-batch number ``micro_index`` of the whole run (epochs chained; last partial batch dropped)."""
    per_epoch = max(1, len(data.qids) // batch_size)
    epoch, pos = divmod(micro_index, per_epoch)
    order = epoch_order(data.qids, seed, epoch)
    qids = order[pos * batch_size:(pos + 1) * batch_size]
    groups = [data.group(q, sampler, seed, epoch) for q in qids]
    return epoch, qids, groups


class DualEncode(torch.nn.Module):
    """One forward call for queries and documents (so DDP sees a single forward per backward)."""

    def __init__(self, encoder: SpladeEncoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, q_ids, q_mask, d_ids, d_mask):
        return self.encoder(q_ids, q_mask), self.encoder(d_ids, d_mask)


def scores_of(q: torch.Tensor, d: torch.Tensor):
    """(B, V) queries, (B*(1+n), V) documents -> all scores (B, B*(1+n)) and own-group scores (B, 1+n)."""
    all_scores = q @ d.T
    b = q.shape[0]
    group = all_scores.view(b, b, -1)[torch.arange(b), torch.arange(b)]
    return all_scores, group


def score_batch(encoder: SpladeEncoder, queries: list[str], docs: list[str], spec: TrainSpec, model=None):
    """Encode a batch and score it; ``model`` (a DualEncode, possibly DDP-wrapped) runs the forward."""
    qb = encoder.tokenize(queries, spec.query_max_length)
    db = encoder.tokenize(docs, spec.doc_max_length)
    return score_tokens(encoder, qb, db, model)


def score_tokens(encoder: SpladeEncoder, qb: dict, db: dict, model=None):
    """``score_batch`` on batches already tokenised (on any device: they are moved to the encoder's)."""
    model = model or DualEncode(encoder)
    device = encoder.device
    qb, db = ({k: v.to(device, non_blocking=True) for k, v in b.items()} for b in (qb, db))
    q, d = model(qb["input_ids"], qb["attention_mask"], db["input_ids"], db["attention_mask"])
    all_scores, group = scores_of(q, d)
    return q, d, all_scores, group


def to_host(values: dict) -> dict[str, float]:
    """Named scalars (tensors or numbers) -> floats, with one device-to-host copy for all the tensors."""
    names = [k for k, v in values.items() if isinstance(v, torch.Tensor)]
    out = {k: float(v) for k, v in values.items() if not isinstance(v, torch.Tensor)}
    if names:
        host = torch.stack([values[k].detach().float().reshape(()) for k in names]).cpu().tolist()
        out.update(zip(names, host))
    return {k: out[k] for k in values}


def rss_gb() -> float:
    """Resident memory of this process (Linux), for the training log."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (OSError, ValueError):
        return float("nan")


def _rng_state() -> dict:
    """RNG states as tensors, lists and numbers only, so a checkpoint loads with ``weights_only=True``."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(mt), gauss],
            "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "torch": torch.get_rng_state()}


def _set_rng_state(state: dict) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    npy = state["numpy"]
    if isinstance(npy, dict):
        np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                             npy["cached_gaussian"]))
    else:  # checkpoints written before the RNG state was stored as tensors: numpy's own tuple
        np.random.set_state(npy)
    torch.set_rng_state(state["torch"])


def _checkpoint_globals() -> list:
    """What ``weights_only`` loading admits beyond tensors and plain containers: numpy's array reconstruction,
    for the RNG state of checkpoints written before it was stored as tensors (data only, no code)."""
    core = getattr(np, "_core", None) or np.core
    names = [core.multiarray._reconstruct, np.ndarray, np.dtype]
    dtype_class = getattr(getattr(np, "dtypes", None), "UInt32DType", None)
    return names + ([dtype_class] if dtype_class is not None else [])


def load_checkpoint(path: Path, device) -> dict:
    """A checkpoint loaded with ``weights_only=True`` (nothing in it can run code); a truncated, foreign or
    malicious file is one LsrError naming it and what to do."""
    what_to_do = (f"delete it to restart training from step 0 (rm {path}), or keep it and give this run another "
                  f"hydra.run.dir")
    try:
        with torch.serialization.safe_globals(_checkpoint_globals()):
            state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for bad files
        text = str(e)
        refused = re.search(r"GLOBAL ([\w.]+)", text)  # a global outside the allow-list: a payload or foreign file
        if refused:
            reason = f"refused global {refused.group(1)}"
        else:
            reason = (text.strip().splitlines() or [type(e).__name__])[0][:200]
        raise LsrError(f"checkpoint {path} cannot be loaded ({reason}); {what_to_do}") from None
    missing = [k for k in ("model", "optimizer", "scheduler", "step", "nonfinite", "bad_checks", "rng")
               if not isinstance(state, dict) or k not in state]
    if missing:
        raise LsrError(f"checkpoint {path} is not an lsr-run checkpoint (missing {', '.join(missing)}); {what_to_do}")
    return state


class Trainer:
    def __init__(self, encoder: SpladeEncoder, data: TrainingData, sampler, loss, regularizer, spec: TrainSpec,
                 run: RunDir, seed: int):
        from . import distributed

        spec.validate()
        self.dist = distributed.current()
        if spec.batch_size % self.dist.world:
            raise ConfigError(f"train.batch_size={spec.batch_size}: must be divisible by the number of processes "
                              f"({self.dist.world})")
        if not isinstance(loss, RankingLoss):
            raise ConfigError(f"loss: expected a ranking loss (lsr_run.losses), got {type(loss).__name__}")
        if loss.needs_teacher and data.teacher is None:
            raise ConfigError("loss needs teacher scores but teacher=none; choose teacher=bi_encoder|cross_encoder|file")
        self.encoder, self.data, self.sampler, self.loss, self.reg = encoder, data, sampler, loss, regularizer
        self.spec, self.run, self.seed = spec, run, seed
        self.vocab = encoder.vocab_size
        if spec.dropout is not None:
            for module in encoder.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = spec.dropout
        from transformers import get_linear_schedule_with_warmup

        if spec.gradient_checkpointing:
            encoder.mlm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if spec.compile:
            encoder.compile(dynamic=True)
        self.model = DualEncode(encoder)
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.dist.local_rank] if encoder.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.model, device_ids=ids)
        # AdamW's fused kernel (every parameter in one pass) on CUDA and CPU, as transformers' Trainer defaults to;
        # on a 2-core CPU it takes a quarter of the per-parameter loop's time (MiniLM: 22 ms against 87 ms a step)
        self.optimizer = torch.optim.AdamW(encoder.parameters(), lr=spec.lr, weight_decay=spec.weight_decay,
                                           fused=encoder.device.type in FUSED_ADAMW_DEVICES or None)
        if encoder.device.type == "cpu" and keep_freed_memory():
            log.debug("malloc keeps freed blocks below %d MB for reuse", KEEP_FREED_BYTES >> 20)
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, spec.warmup_steps, spec.max_steps)
        self.bf16 = resolve_bf16(spec.bf16, encoder.device, "train.bf16")
        self.step = 0
        self.nonfinite = 0
        self.bad_checks = 0
        self.collapsed: dict | None = None
        self._prefetch = None
        if switch(spec.prefetch, encoder.device.type == "cuda", "train.prefetch"):
            from concurrent.futures import ThreadPoolExecutor

            self._prefetch = ThreadPoolExecutor(1, thread_name_prefix="lsr-run-batches")
        self._pending: dict = {}

    # ---------------------------------------------------------------- checkpoints
    @property
    def ckpt_path(self) -> Path:
        return self.run.checkpoint

    def save_checkpoint(self) -> None:
        from . import interrupt

        interrupt.check()  # a signal whose exception was swallowed stops training here (last checkpoint kept)
        if not self.dist.is_main:
            self.dist.barrier()
            return
        state = {"model": self.encoder.mlm.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "step": self.step, "nonfinite": self.nonfinite,
                 "bad_checks": self.bad_checks, "rng": _rng_state(),
                 "settings": json.loads(json.dumps(self.encoder.settings, default=str))}  # plain data only
        with atomic_path(self.ckpt_path) as tmp:
            torch.save(state, tmp)
        self.dist.barrier()

    def maybe_resume(self) -> bool:
        if not self.ckpt_path.exists():
            return False
        state = load_checkpoint(self.ckpt_path, self.encoder.device)
        try:
            self.encoder.mlm.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise LsrError(f"checkpoint {self.ckpt_path} does not fit this model or optimizer "
                           f"({str(e).splitlines()[0][:200]}); delete it to restart training from step 0") from None
        self.step, self.nonfinite, self.bad_checks = state["step"], state["nonfinite"], state["bad_checks"]
        _set_rng_state(state["rng"])
        log.info("resumed training from %s at step %d", self.ckpt_path, self.step)
        return True

    # ---------------------------------------------------------------- logging
    def _log(self, record: dict) -> None:
        if not self.dist.is_main:
            return
        self.run.train_log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.run.train_log, "a") as f:
            f.write(json.dumps(record) + "\n")

    def _check_collapse(self, q_terms: float, d_terms: float) -> None:
        c = self.spec.collapse
        dense = max(q_terms, d_terms) > c.dense_fraction * self.vocab
        empty = min(q_terms, d_terms) < c.min_terms
        self.bad_checks = self.bad_checks + 1 if (dense or empty) else 0
        if self.bad_checks >= c.patience:
            reason = "vectors nearly all active" if dense else "vectors all zero"
            self.collapsed = {"collapsed": True, "step": self.step, "reason": reason,
                              "query_terms": q_terms, "doc_terms": d_terms}

    # ---------------------------------------------------------------- loop
    def prepare(self, micro_index: int) -> dict:
        """The host's share of a micro-step: sampling, reading the texts, tokenising (CPU tensors, pinned for an
        asynchronous copy on CUDA). Pure in ``micro_index``, so it may run ahead in the prefetch thread."""
        spec = self.spec
        epoch, qids, groups = batch_at(self.data, self.sampler, self.seed, micro_index, spec.batch_size)
        teacher = None
        if self.data.teacher is not None:  # sampling is pure: every rank knows the whole global batch
            teacher = torch.tensor([t for _, t in groups], dtype=torch.float32)
        mine = self.dist.slice(len(qids))
        q_texts = [self.data.queries[q] for q in qids[mine]]
        d_ids = [d for docs, _ in groups[mine] for d in docs]
        d_texts = self.data.corpus.many(d_ids)  # a TextTable reads a batch of rows at once
        qb = self.encoder.tokenize(q_texts, spec.query_max_length, device=None)
        db = self.encoder.tokenize(d_texts, spec.doc_max_length, device=None)
        if self.encoder.device.type == "cuda":
            qb, db = ({k: v.pin_memory() for k, v in b.items()} for b in (qb, db))
            teacher = teacher.pin_memory() if teacher is not None else None
        return {"epoch": epoch, "teacher": teacher, "queries": qb, "docs": db}

    def batch(self, micro_index: int) -> dict:
        """``prepare(micro_index)``; with prefetch, taken from the thread, which starts on the next one."""
        if self._prefetch is None:
            return self.prepare(micro_index)
        future = self._pending.pop(micro_index, None) or self._prefetch.submit(self.prepare, micro_index)
        self._pending = {}  # a skipped or resumed index leaves nothing stale behind
        if micro_index + 1 < self.spec.max_steps * self.spec.grad_accum:
            self._pending[micro_index + 1] = self._prefetch.submit(self.prepare, micro_index + 1)
        return future.result()

    def micro_step(self, micro_index: int) -> dict:
        prepared = self.batch(micro_index)
        device = self.encoder.device
        teacher = prepared["teacher"]
        teacher = teacher.to(device, non_blocking=True) if teacher is not None else None
        ctx = torch.autocast(device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()
        with ctx:
            q, d, _, _ = score_tokens(self.encoder, prepared["queries"], prepared["docs"], self.model)
        q, d = self.dist.gather(q.float()), self.dist.gather(d.float())  # the global batch
        all_scores, group = scores_of(q, d)
        rank = self.loss.evaluate(ScoredBatch(group, all_scores, teacher))
        reg = self.reg(q.float(), d.float(), self.step)  # {"reg": the term to add, ...: what it logs}
        total = rank.total + reg["reg"]
        with torch.no_grad():  # reduced on the device, copied to the host once
            active = d > 0
            stats = to_host({"loss": total, "rank_loss": rank.total, **reg,
                             "query_terms": (q > 0).sum(1).float().mean(),
                             "doc_terms": active.sum(1).float().mean(),
                             "doc_weight_mean": d.sum() / active.sum().clamp(min=1),
                             "doc_weight_max": d.max(),
                             "score_gap": (group[:, 0] - group[:, 1:].mean(1)).mean()})
        stats = {"epoch": prepared["epoch"], **stats, **{f"loss_{name}": value for name, value in rank.parts.items()}}
        return {"total": total, "stats": stats}

    def train(self) -> dict:
        from tqdm.auto import tqdm

        spec = self.spec
        resumed = self.maybe_resume()
        self.encoder.train()
        start_time = time.time()
        bar = tqdm(total=spec.max_steps, initial=self.step, desc="train", unit="step", mininterval=1,
                   disable=not self.dist.is_main)
        last_stats: dict = {}
        while self.step < spec.max_steps and self.collapsed is None:
            self.optimizer.zero_grad(set_to_none=True)
            finite = True
            acc: dict[str, float] = {}
            for micro in range(spec.grad_accum):
                out = self.micro_step(self.step * spec.grad_accum + micro)
                if not math.isfinite(out["stats"]["loss"]):
                    finite = False
                    break
                (out["total"] / spec.grad_accum).backward()
                for k, v in out["stats"].items():
                    acc[k] = acc.get(k, 0.0) + v / spec.grad_accum
            if finite:
                grad_norm = torch.nn.utils.clip_grad_norm_(self.encoder.parameters(), spec.max_grad_norm)
                finite = bool(torch.isfinite(grad_norm))
                acc["grad_norm"] = float(grad_norm)
            if not finite:
                self.nonfinite += 1
                self.optimizer.zero_grad(set_to_none=True)
                log.warning("non-finite loss or gradient at step %d (%d so far)", self.step, self.nonfinite)
                if spec.nonfinite == "stop" or self.nonfinite > spec.max_nonfinite:
                    self.collapsed = {"collapsed": True, "step": self.step, "reason": "non-finite loss or gradients"}
                    break
            else:
                self.optimizer.step()
            self.scheduler.step()
            self.step += 1
            if finite:
                last_stats = acc
                bar.set_postfix(loss=f"{acc['loss']:.3f}", q_terms=f"{acc['query_terms']:.0f}",
                                d_terms=f"{acc['doc_terms']:.0f}", refresh=False)
                if self.step % spec.log_every == 0 or self.step == spec.max_steps:
                    self._log({"step": self.step, "lr": self.scheduler.get_last_lr()[0], "rss_gb": rss_gb(), **acc})
                if self.step % spec.collapse.check_every == 0:
                    self._check_collapse(acc["query_terms"], acc["doc_terms"])
            bar.update(1)
            if self.step % spec.save_every == 0 or self.collapsed is not None:
                self.save_checkpoint()
        bar.close()
        if self._prefetch is not None:
            self._prefetch.shutdown(wait=True, cancel_futures=True)
            self._pending = {}
        if self.collapsed is not None:
            self.save_checkpoint()
            log.error("training collapsed at step %d: %s (checkpoint kept at %s)", self.collapsed["step"],
                      self.collapsed["reason"], self.ckpt_path)
        elif self.step % spec.save_every != 0:
            self.save_checkpoint()
        return {"steps": self.step, "resumed": resumed, "nonfinite_steps": self.nonfinite,
                "seconds": time.time() - start_time, "last": last_stats,
                **(self.collapsed or {"collapsed": False})}
