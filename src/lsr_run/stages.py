"""The six stages, each a function of the run's built components and its run directory.

Stages: inspect, train, encode, index, search, evaluate, in that order. A stage reads what an earlier one wrote
only through ``RunDir``'s accessors (the model folder, shards, indexes, run files, ``train_state.json``), never
through values held in memory, so a stage run alone in a later process sees exactly what a full run sees. Each
output is recorded under ``.done/`` with a provenance key computed from the config it reads and the content keys
of the artefacts it consumes; a stage is skipped only when the key it would compute now is the recorded one.
One index per corpus is built and reused by every query set on that corpus.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from . import distributed, interrupt
from . import provenance as prov
from . import run_dir as rd
from .components import Components, build, load_model_folder, load_spec
from .data import Dataset, read_trec_run, training_examples
from .encoding import encode_corpus, encode_queries, merge_stats, prune_corpus, read_query_vectors
from .errors import LsrError
from .evaluation import evaluate_run, remove_self_hits
from .impacts import top_k
from .models.backbone import load_backbone
from .models.splade import SpladeEncoder
from .run_dir import EncodedCorpus, RunDir

log = logging.getLogger(__name__)


class StageContext:
    """What the stages of one run directory share: the built components, the ``RunDir``, the process group, and
    caches of what is costly to load again (datasets, the encoder of the model being encoded)."""

    def __init__(self, parts: Components, root: Path):
        self.parts = parts
        self.cfg = parts.cfg
        self.run = RunDir(Path(root))
        self.dist = distributed.current()
        self.seconds: dict[str, float] = {}
        self._datasets: dict[str, Dataset] = {}
        self._encoder: tuple[str, SpladeEncoder] | None = None  # (model key, encoder)
        self._forced: set[tuple[str, str]] = set()

    def current(self, stage: str, key: str, provenance: str) -> bool:
        """True if ``stage`` (for ``key``) is done and was computed from the inputs it would use now."""
        done = self.run.stage_done(stage, key)
        if not done.exists():
            return False
        if self.cfg.get("force", False) and (stage, key) not in self._forced:
            self._forced.add((stage, key))  # force=true: computed again once in this run
            reason = "force=true"
        elif rd.read_json(done).get("provenance") == provenance:
            return True
        else:
            reason = "computed from other inputs"
        log.warning("%s%s: the output in %s is %s; computing it again", stage, f" {key}" if key else "",
                    self.run.root, "recomputed (force=true)" if reason == "force=true" else reason)
        if self.dist.is_main:
            done.unlink(missing_ok=True)
        return False

    def dataset(self, key: str) -> Dataset:
        if key not in self._datasets:
            self._datasets[key] = load_spec(self.parts.eval_sets[key], OmegaConf.select(self.cfg, "paths.data_dir"),
                                             OmegaConf.select(self.cfg, "paths.cache_dir"))
        return self._datasets[key]

    def fresh_encoder(self) -> SpladeEncoder:
        """The backbone as configured, head scaling applied, before any optimizer exists."""
        mlm, tokenizer, settings = load_backbone(self.parts.backbone, self.parts.seed)
        scaling = build(self.cfg.head_scaling, "head_scaling")
        record = scaling.apply(mlm, inflate=self.parts.backbone.head_inflate)
        settings["head_scaling"] = record
        rd.write_json(self.run.head_scaling, record)
        return SpladeEncoder(mlm, tokenizer, settings)

    def encoder(self) -> SpladeEncoder:
        """The model the encode stage uses, loaded from disk: ``model.path``, else the run's ``model/`` (what the
        train stage saved), else, without a train stage, the untrained backbone."""
        key = model_key(self)
        if self._encoder is None or self._encoder[0] != key:
            path = self.cfg.model.path
            if path:
                encoder = load_model_folder(Path(path), "model.path")
            elif self.run.model.exists():
                encoder = load_model_folder(self.run.model, "the run's model")
            elif "train" not in self.parts.stages:
                log.warning("no trained model (model.path unset, no %s): encoding with the untrained backbone",
                            self.run.model)
                encoder = self.fresh_encoder()
            else:
                raise LsrError(f"{self.run.model} missing after training")
            dtype = torch.bfloat16 if self.parts.encode.weights == "bf16" else None  # loaded to encode only
            self._encoder = (key, encoder.to(self.dist.device(), dtype=dtype))
        return self._encoder[1]

    @property
    def encoder_loaded(self) -> bool:
        return self._encoder is not None


# ---------------------------------------------------------------- provenance keys
def input_files(ctx: StageContext) -> dict[str, str]:
    """Content digests of the files the training config names (candidate runs, teacher scores)."""
    out = {}
    for section in ("candidates", "teacher"):
        for dotted, value in prov.flatten(ctx.parts.config.get(section) or {}).items():
            if isinstance(value, str) and value and Path(value).is_file():
                out[f"{section}.{dotted}"] = prov.file_digest(Path(value))
    return out


def train_inputs(ctx: StageContext) -> dict:
    spec = ctx.parts.train.data
    folder = Path(spec.path) if spec.path else Path(OmegaConf.select(ctx.cfg, "paths.data_dir") or ".") / spec.name
    files = [prov.corpus_file(folder), folder / "queries.jsonl", folder / "queries.jsonl.gz",
             folder / "qrels" / f"{spec.split}.tsv"]
    content = {f.name: prov.file_digest(f) for f in files if f is not None and f.is_file()} or \
        {"irds": spec.irds_id}
    inputs = prov.train_inputs(ctx.parts.config, prov.digest(content))
    inputs["files"] = input_files(ctx)
    return inputs


def model_key(ctx: StageContext) -> str:
    """Key of the model the encode stage uses: its tensors, or the untrained backbone's config."""
    path = ctx.cfg.model.path
    if path:
        return prov.model_key(Path(path))
    if ctx.run.model.exists():
        return prov.model_key(ctx.run.model)
    return prov.digest({"untrained": {k: ctx.parts.config.get(k) for k in ("backbone", "head_scaling", "seed")}})


def corpus_id(ds: Dataset) -> str:
    """Folder name of a corpus's encodings and index: its name and a digest of its content."""
    return f"{ds.corpus_key}-{prov.corpus_digest(ds)[:10]}"


# encode.* settings applied after encoding (static pruning): in the index and search keys, not the encodings'
PRUNING = ("doc_top_k", "query_top_k")


def encode_settings(ctx: StageContext) -> dict:
    """The encode config as keys see it: settings added later are left out at their default (``INERT_DEFAULTS``),
    so the keys of earlier runs stay as they were; pruning is left out (the encodings keep every term)."""
    settings = prov.drop_inert(dict(ctx.parts.config.get("encode") or {}), "encode")
    for key in PRUNING:
        settings.pop(key, None)
    return settings


def encode_key(ctx: StageContext, ds: Dataset) -> str:
    return prov.digest({"model": model_key(ctx), "encode": encode_settings(ctx), "corpus": prov.corpus_digest(ds)})


def queries_key(ctx: StageContext, ds: Dataset) -> str:
    texts = prov.texts_digest(ds.judged_queries())
    if not ctx.parts.vectors:
        return texts
    return prov.digest({"model": model_key(ctx), "encode": encode_settings(ctx), "queries": texts})


def index_key(ctx: StageContext, ds: Dataset) -> str:
    source = encode_key(ctx, ds) if ctx.parts.vectors else prov.corpus_digest(ds)
    key = {"source": source, "index": ctx.parts.config.get("index")}
    if ctx.parts.vectors and ctx.parts.encode.doc_top_k is not None:  # absent at null: earlier keys unchanged
        key["doc_top_k"] = ctx.parts.encode.doc_top_k
    return prov.digest(key)


def search_key(ctx: StageContext, ds: Dataset) -> str:
    key = {"index": index_key(ctx, ds), "queries": queries_key(ctx, ds), "k": ctx.parts.config["eval"].get("k")}
    if ctx.parts.vectors and ctx.parts.encode.query_top_k is not None:
        key["query_top_k"] = ctx.parts.encode.query_top_k
    return prov.digest(key)


def evaluate_key(ctx: StageContext) -> str:
    """Key of metrics.json: per dataset, the search key, the relevance judgements and the metrics asked for."""
    metrics = list(ctx.cfg.eval.metrics)
    return prov.digest({key: {"search": search_key(ctx, ctx.dataset(key)), "qrels": prov.digest(ctx.dataset(key).qrels),
                              "metrics": spec.metrics or metrics, "remove_self_hits": spec.remove_self_hits}
                        for key, spec in ctx.parts.eval_sets.items()})


# ---------------------------------------------------------------- stages
def inspect(ctx: StageContext) -> None:
    from .models.inspect import inspect_backbone

    rd.write_json(ctx.run.inspect, inspect_backbone(ctx.cfg, ctx.parts.backbone, ctx.parts.seed))


def check_checkpoint(ctx: StageContext, inputs: dict) -> None:
    """A checkpoint made from other training inputs is refused (or, with force=true, dropped)."""
    ckpt, record = ctx.run.checkpoint, ctx.run.checkpoint_inputs
    if not ckpt.exists():
        return
    old = rd.read_json(record) if record.exists() else None
    force = ctx.cfg.get("force", False)
    if old is not None and old.get("provenance") == prov.digest(inputs) and not force:
        return
    diff = prov.differences(old.get("inputs", {}), inputs) if old else ["(the checkpoint records no inputs)"]
    if not force:
        raise LsrError(f"checkpoint {ckpt} was made from other training inputs (differs in: {', '.join(diff)}); "
                       f"resume it with its own config, or pass force=true to train again from step 0")
    log.warning("force=true: dropping checkpoint %s (differs in: %s); training from step 0", ckpt,
                ", ".join(diff) or "nothing")
    shutil.rmtree(ctx.run.checkpoints)


def train(ctx: StageContext) -> None:
    run, dist, parts = ctx.run, ctx.dist, ctx.parts.train
    inputs = train_inputs(ctx)
    key = prov.digest(inputs)
    if ctx.current("train", "", key) and run.model.exists():
        log.info("train: done already, from the same inputs (%s)", run.train_state)
        return
    if dist.is_main:
        check_checkpoint(ctx, inputs)
        rd.write_json(run.checkpoint_inputs, {"provenance": key, "inputs": inputs})
    dist.barrier()
    from .models.inspect import head_report, probe_report
    from .train import Trainer, TrainingData

    dataset = load_spec(parts.data, OmegaConf.select(ctx.cfg, "paths.data_dir"),
                        OmegaConf.select(ctx.cfg, "paths.cache_dir"))
    positives = training_examples(dataset)
    pools = parts.candidates.pools(dataset, positives, run.candidates)
    scores = None
    if parts.teacher.enabled:
        pairs = {q: positives[q] + pools[q] for q in positives if q in pools}
        scores = parts.teacher.score(dataset.queries, dataset.corpus, pairs, run.teacher)
    data = TrainingData(dataset.queries, positives, pools, dataset.corpus, scores)
    if scores is not None:
        from .sampling_stats import record_sampling_stats

        record_sampling_stats(data, parts.sampler, ctx.parts.seed, run)
    encoder = ctx.fresh_encoder().to(dist.device())
    init = {"head": head_report(encoder.mlm), "probe": probe_report(encoder)}
    rd.write_json(run.init_report, init)
    log.info("head at init: |W|_F %.1f, row norm mean %.3f, bias mean %s; probe queries: %.0f active terms, "
             "%.3f positive logits; docs: %.0f active terms, L1 %.1f", init["head"]["decoder_frobenius"],
             init["head"]["row_norm_mean"], init["head"].get("bias_mean"),
             init["probe"]["queries"]["active_terms"], init["probe"]["queries"]["positive_fraction"],
             init["probe"]["docs"]["active_terms"], init["probe"]["docs"]["l1"])
    trainer = Trainer(encoder, data, parts.sampler, parts.loss, parts.regularizer, parts.spec, run, ctx.parts.seed)
    result = trainer.train()
    result["train_queries"] = len(data.qids)
    result["processes"] = dist.world
    if not dist.is_main:
        dist.barrier()
        return
    with rd.atomic_path(run.model) as tmp:
        encoder.save(tmp, max_length=ctx.parts.encode.doc_max_length)
    rd.write_json(run.train_state, result)
    rd.mark_done(run, "train", info={"provenance": key, "inputs": inputs, "model": prov.model_key(run.model)})
    dist.barrier()
    try:
        from .plots import plot_training

        plot_training(run)
    except Exception as e:  # a plot must never cost a finished run
        log.warning("training plot failed: %s", e)


def reuse_encoding(ctx: StageContext, cid: str, corpus_key: str) -> bool:
    """With ``model.path`` inside another run (``<run>/model``), take that run's encodings of the corpus when they
    were computed from the same key (model, encode settings, corpus): linked, not copied, where the filesystem
    allows. Evaluating a finished run's model under other index or pruning settings then never encodes again."""
    path = ctx.cfg.model.path
    if not path or ctx.dist.world > 1 or ctx.cfg.get("force", False):
        return False
    source = RunDir(Path(path).parent)
    if source.root.resolve() == ctx.run.root.resolve():
        return False
    info = done_info(source, "encode", cid)
    src = source.encoded_corpus(cid)
    if info.get("provenance") != corpus_key or not EncodedCorpus(src).stats.exists():
        return False
    dst = ctx.run.encoded_corpus(cid)
    with rd.atomic_path(dst) as tmp:
        shutil.copytree(src, tmp, copy_function=link_or_copy)
    rd.mark_done(ctx.run, "encode", cid, {**info, "reused_from": str(src.resolve())})
    log.info("encode %s: the encodings of %s, made from the same model, settings and corpus", cid, src)
    return True


def link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(src, dst)


def encode(ctx: StageContext) -> None:
    if not ctx.parts.vectors:
        return
    run, dist = ctx.run, ctx.dist
    for key in ctx.parts.eval_sets:
        ds = ctx.dataset(key)
        cid = corpus_id(ds)
        corpus_dir = run.encoded_corpus(cid)
        corpus_key = encode_key(ctx, ds)
        if not ctx.current("encode", cid, corpus_key) and not reuse_encoding(ctx, cid, corpus_key):
            if dist.is_main and corpus_dir.exists():  # shards of an interrupted attempt: start over
                shutil.rmtree(corpus_dir)
            dist.barrier()
            encode_corpus(ctx.encoder(), ds.corpus, corpus_dir, ctx.parts.encode, dist.rank, dist.world,
                          min_shards=ctx.parts.backend.indexing_threads)
            dist.barrier()
            if dist.is_main:
                stats = merge_stats(corpus_dir)
                rd.mark_done(run, "encode", cid, {**stats, "provenance": corpus_key})
                log.info("encoded %s: %d docs, %.1f terms/doc, %.1f docs/s", cid, stats["docs"],
                         stats["doc_terms"], stats["docs_per_second"])
        qkey = queries_key(ctx, ds)
        if dist.is_main and not ctx.current("encode-queries", key, qkey):
            stats = encode_queries(ctx.encoder(), ds.judged_queries(), run.encoded_queries(key), ctx.parts.encode)
            rd.write_json(run.encoded_queries_stats(key), stats)
            rd.mark_done(run, "encode-queries", key, {"provenance": qkey})


def index(ctx: StageContext) -> None:
    run, backend = ctx.run, ctx.parts.backend
    for key in ctx.parts.eval_sets:
        ds = ctx.dataset(key)
        cid = corpus_id(ds)
        provenance = index_key(ctx, ds)
        if ctx.current("index", cid, provenance):
            continue
        start = time.time()
        k = ctx.parts.encode.doc_top_k
        if ctx.parts.vectors and k is not None:  # pruned shards beside the encodings, deleted once indexed
            with tempfile.TemporaryDirectory(dir=run.encoded_corpus(cid).parent, prefix=f".top{k}-") as tmp:
                pruned = prune_corpus(run.encoded_corpus(cid), Path(tmp), k, backend.indexing_threads)
                log.info("%s: each document cut to its %d highest impacts (%.1f terms a document)", cid, k,
                         pruned["doc_terms"])
                stats = {**(backend.build(Path(tmp), run.index(cid)) or {}), "doc_top_k": k,
                         "doc_terms": pruned["doc_terms"]}
        elif ctx.parts.vectors:
            stats = backend.build(run.encoded_corpus(cid), run.index(cid))
        else:
            stats = backend.build_from_corpus(ds.corpus, run.index(cid))
        stats = {"seconds": time.time() - start, **(stats or {})}  # the backend's own figures, kept where made
        rd.mark_done(run, "index", cid, {**stats, "provenance": provenance})
        log.info("indexed %s in %.1f s", cid, stats["seconds"])


def search(ctx: StageContext) -> None:
    run, backend = ctx.run, ctx.parts.backend
    k = int(ctx.cfg.eval.k)
    for key in ctx.parts.eval_sets:
        ds = ctx.dataset(key)
        run_path = run.run_file(key)
        provenance = search_key(ctx, ds)
        if run_path.exists() and ctx.current("search", key, provenance):
            continue
        index_dir = run.index(corpus_id(ds))
        info = {"provenance": provenance}
        if ctx.parts.vectors:
            queries = read_query_vectors(run.encoded_queries(key))
            top = ctx.parts.encode.query_top_k
            if top is not None:
                queries = {qid: top_k(vec, top) for qid, vec in queries.items()}
                info.update(query_top_k=top, query_terms=sum(map(len, queries.values())) / max(1, len(queries)))
            backend.search(index_dir, queries, k, run_path)
        else:
            backend.search_text(index_dir, ds.judged_queries(), k, run_path)
        rd.mark_done(run, "search", key, info)


def evaluate(ctx: StageContext) -> None:
    """metrics.json: per dataset, the mean metrics, the number of queries and (vector backends) the mean query and
    document terms; per-query values beside it."""
    run = ctx.run
    provenance = evaluate_key(ctx)
    if run.metrics.exists() and ctx.current("evaluate", "", provenance):
        log.info("evaluate: done already, from the same runs and judgements (%s)", run.metrics)
        return
    metrics_cfg = list(ctx.cfg.eval.metrics)
    out: dict = {}
    for key, spec in ctx.parts.eval_sets.items():
        ds = ctx.dataset(key)
        ranking = read_trec_run(run.run_file(key)) if run.run_file(key).exists() else {}
        if spec.remove_self_hits:
            ranking = remove_self_hits(ranking)
        means, per_query = evaluate_run(ds.qrels, ranking, spec.metrics or metrics_cfg)
        rd.write_json(run.per_query(key), per_query)
        entry = dict(means)
        if ctx.parts.vectors:
            qstats = run.encoded_queries_stats(key)
            dstats = run.encoded_corpus_stats(corpus_id(ds))
            # pruned runs: the terms searched and indexed, as their stages recorded them
            searched = done_info(run, "search", key) if ctx.parts.encode.query_top_k else {}
            indexed = done_info(run, "index", corpus_id(ds)) if ctx.parts.encode.doc_top_k else {}
            if "query_terms" not in searched:
                searched = rd.read_json(qstats) if qstats.exists() else {}
            if "doc_terms" not in indexed:
                indexed = rd.read_json(dstats) if dstats.exists() else {}
            entry["query_terms"] = searched.get("query_terms")
            entry["doc_terms"] = indexed.get("doc_terms")
        entry["queries"] = len(per_query)
        out[key] = entry
    rd.write_json(run.metrics, out)
    rd.mark_done(run, "evaluate", "", {"provenance": provenance})


def done_info(run: RunDir, stage: str, key: str) -> dict:
    """What a finished stage recorded beside its output ({} if it did not finish)."""
    path = run.stage_done(stage, key)
    return rd.read_json(path) if path.exists() else {}


def record_collapse(ctx: StageContext) -> None:
    """metrics.json of a collapsed run: every dataset marked as not scored (the collapse is in status.json)."""
    ctx.run.stage_done("evaluate").unlink(missing_ok=True)  # the metrics it recorded are gone
    rd.write_json(ctx.run.metrics, {key: {"scored": False} for key in ctx.parts.eval_sets})


def training_outcome(run: RunDir) -> dict:
    """{collapsed, collapse: {step, reason, ...}} of the run's training (``train_state.json``), {} without one."""
    if not run.train_state.exists():
        return {}
    result = rd.read_json(run.train_state)
    out = {"collapsed": bool(result.get("collapsed", False))}
    if out["collapsed"]:
        out["collapse"] = {k: result.get(k) for k in ("step", "reason", "query_terms", "doc_terms")}
    return out


# ---------------------------------------------------------------- driver
def execute(ctx: StageContext) -> dict:
    """Run the configured stages in order; -> metrics.json's content ({} when no evaluate stage wrote one)."""
    functions = {"inspect": inspect, "train": train, "encode": encode, "index": index, "search": search,
                 "evaluate": evaluate}  # looked up per call: tests replace a stage by patching this module
    for stage in ctx.parts.stages:
        if not ctx.dist.is_main and stage not in ("train", "encode"):
            continue  # other ranks help with training and encoding; rank 0 indexes, searches, evaluates
        if stage in ("encode", "index", "search", "evaluate") and "train" in ctx.parts.stages and \
                training_outcome(ctx.run).get("collapsed") and not ctx.cfg.train.collapse.get("evaluate", False):
            if stage == "evaluate":
                record_collapse(ctx)
            log.warning("%s: skipped, training collapsed (train.collapse.evaluate=true scores it anyway)", stage)
            continue
        interrupt.set_stage(stage)
        start = time.time()
        log.info("stage %s", stage)
        functions[stage](ctx)
        ctx.seconds[stage] = ctx.seconds.get(stage, 0.0) + time.time() - start
        rd.write_json(ctx.run.timings, ctx.seconds)
    return rd.read_json(ctx.run.metrics) if ctx.run.metrics.exists() else {}


def prepare(cfg, root: Path) -> StageContext:
    """Check and build everything ``cfg`` describes (``Components.from_config``), for the run directory ``root``."""
    return StageContext(Components.from_config(cfg), root)
