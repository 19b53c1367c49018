"""The closed table of stages and their order, run inside one run directory.

Stages: inspect, train, encode, index, search, evaluate. Each stage skips itself when its output is complete
(a ``.done`` marker written after the output), so re-launching a run or a sweep resumes it. One index per
corpus is built and reused by every query set on that corpus.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from . import run_dir as rd
from .data import Dataset, load_dataset, read_trec_run, training_examples
from . import distributed, interrupt
from . import provenance as prov
from .backends import Backend, TextBackend, VectorBackend
from .encoding import EncodeSpec, encode_corpus, encode_queries, merge_stats, read_query_vectors
from .errors import ConfigError, LsrError, RunDirBusy
from .evaluation import evaluate_run, remove_self_hits
from .losses import RankingLoss
from .models.backbone import BackboneSpec, load_backbone
from .models.splade import SpladeEncoder
from .run_dir import RunDir

log = logging.getLogger(__name__)

STAGES = ("inspect", "train", "encode", "index", "search", "evaluate")


def structured(cls, node, key: str):
    """Check a plain-data config section against its dataclass schema (unknown keys, wrong types)."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        if OmegaConf.is_config(node):  # resolved in place: interpolations such as ${encode.bf16} need the root
            node = OmegaConf.to_container(node, resolve=True)
        merged = OmegaConf.merge(OmegaConf.structured(cls), node)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        msg = str(e).splitlines()[0]
        where = f"{key}.{e.full_key}" if getattr(e, "full_key", None) else key
        raise ConfigError(f"{where}: {msg}") from None


@dataclass
class EvalDataset:
    name: str
    split: str = "test"
    irds_id: str | None = None
    hf_id: str | None = None  # a BEIR-style Hugging Face Hub dataset (BeIR/scifact): configs corpus, queries; <id>-qrels
    path: str | None = None
    remove_self_hits: bool = False
    max_queries: int | None = None  # keep the first N judged queries (by id): quick slices for tests
    metrics: list[str] | None = None  # this dataset's metrics, when they differ from eval.metrics


def load_model_folder(path: Path, what: str) -> SpladeEncoder:
    """``SpladeEncoder.load`` with a missing, truncated or foreign model folder as one LsrError."""
    if not path.is_dir():
        raise LsrError(f"{what}={path}: no such model folder; point it at a folder written by a train stage")
    try:
        return SpladeEncoder.load(path)
    except LsrError:
        raise
    except Exception as e:  # OSError, safetensors' errors, json errors, ... from a damaged folder
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        weights = [p.name for p in path.glob("*.safetensors")] + [p.name for p in path.glob("*.bin")]
        raise LsrError(f"{what}={path}: cannot be loaded ({type(e).__name__}: {reason}; weights present: "
                       f"{', '.join(weights) or 'none'}); the folder is incomplete or damaged: point model.path at a "
                       f"complete model folder, or retrain") from None


def load_spec(spec: EvalDataset, data_dir: str | None = None, cache_dir: str | None = None) -> Dataset:
    """An explicit ``path``, else ``<paths.data_dir>/<name>`` when that folder exists, else the Hub id, else the
    ir_datasets id; text converted to Arrow once under ``<paths.cache_dir>/data`` (``lsr_run.store``)."""
    path = spec.path
    if path is None and data_dir and (Path(data_dir) / spec.name).is_dir():
        path = str(Path(data_dir) / spec.name)
    ds = load_dataset(spec.name, spec.split, spec.irds_id, path, cache_dir, spec.hf_id)
    if spec.max_queries is not None:
        keep = sorted(ds.qrels)[: spec.max_queries]
        ds.qrels = {q: ds.qrels[q] for q in keep}
    return ds


@dataclass
class Timer:
    seconds: dict = field(default_factory=dict)

    def add(self, stage: str, value: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + value


def build(node, key: str):
    """``instantiate`` with errors named by config key (Hydra wraps constructor errors)."""
    from hydra.errors import InstantiationException

    from omegaconf.errors import OmegaConfBaseException

    try:
        return instantiate(node)
    except InstantiationException as e:
        cause = e.__cause__ or e
        if isinstance(cause, LsrError):
            raise type(cause)(str(cause)) from None
        raise ConfigError(f"{key}: {str(cause).splitlines()[0]}") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{key}: {str(e).splitlines()[0]}") from None


def build_backend(node, key: str) -> Backend:
    """The retrieval backend a config node describes; anything that is not a vector or a text backend is a
    ConfigError naming ``key``."""
    backend = build(node, key)
    if not isinstance(backend, (VectorBackend, TextBackend)):
        raise ConfigError(f"{key}: {type(backend).__name__} is not a retrieval backend (a VectorBackend or "
                          f"TextBackend from lsr_run.backends)")
    return backend


def check_names(cfg: DictConfig, eval_sets: dict[str, "EvalDataset"]) -> None:
    """Config values that become file names in the run directory must not leave it (ConfigError)."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        run_name = cfg.get("run_name")
    except OmegaConfBaseException:  # ${hydra:...} outside a Hydra run (compose API)
        run_name = None
    if run_name is not None:
        rd.check_name(run_name, "run_name")
    for key, spec in eval_sets.items():
        rd.check_name(key, f"eval.datasets.{key}")
        rd.check_name(spec.name, f"eval.datasets.{key}.name")
        rd.check_name(spec.split, f"eval.datasets.{key}.split")
    for name in cfg.eval.get("baselines") or {}:
        rd.check_name(name, f"eval.baselines.{name}")


class Experiment:
    """Holds the composed config, the run directory and lazily built pieces (encoder, datasets, backend).

    Everything the config describes is validated here, before any stage runs: schemas of plain-data sections
    (unknown keys, wrong types), every ``_target_`` built once (out-of-range values), and cross-key rules.
    """

    def __init__(self, cfg: DictConfig, root: Path):
        from .train import TrainSpec

        self.cfg = cfg
        self.run = RunDir(Path(root))
        self.seed = int(cfg.seed)
        self.dist = distributed.current()
        stages = list(cfg.stages)
        unknown = [s for s in stages if s not in STAGES]
        if unknown:
            raise ConfigError(f"stages: unknown {unknown}; allowed {list(STAGES)}")
        self.stages = [s for s in STAGES if s in stages]
        self.backbone = structured(BackboneSpec, cfg.backbone, "backbone")
        self.encode_spec = structured(EncodeSpec, cfg.encode, "encode")
        self.backend = build_backend(cfg.index, "index")
        self.eval_sets = {key: structured(EvalDataset, node, f"eval.datasets.{key}")
                          for key, node in (cfg.eval.datasets or {}).items()}
        check_names(cfg, self.eval_sets)
        for name, node in (cfg.eval.get("baselines") or {}).items():
            baseline = build_backend(node, f"eval.baselines.{name}")
            if not isinstance(baseline, TextBackend):  # baselines run index, search, evaluate: nothing is encoded
                raise ConfigError(f"eval.baselines.{name}: {type(baseline).__name__} searches encoded vectors; a "
                                  f"baseline is evaluated without a model and must be a text backend "
                                  f"(lsr_run.backends.lucene.LuceneBm25Backend)")
        build(cfg.head_scaling, "head_scaling")
        if "train" in self.stages:
            self.train_spec = structured(TrainSpec, cfg.train, "train")
            self.train_spec.validate()
            self.data_spec = structured(EvalDataset, cfg.data.train, "data.train")
            rd.check_name(self.data_spec.name, "data.train.name")
            rd.check_name(self.data_spec.split, "data.train.split")
            self.candidates = build(cfg.candidates, "candidates")
            self.teacher = build(cfg.teacher, "teacher")
            self.sampler = build(cfg.sampling, "sampling")
            self.loss = build(cfg.loss, "loss")
            self.regularizer = build(cfg.regularizer, "regularizer")
            if not isinstance(self.loss, RankingLoss):
                raise ConfigError(f"loss: {cfg.loss.get('_target_')} is not a ranking loss (lsr_run.losses)")
            if self.loss.needs_teacher and not self.teacher.enabled:
                raise ConfigError(f"loss={cfg.loss._target_.rsplit('.', 1)[-1]} needs teacher scores but teacher=none; "
                                  "choose teacher=bi_encoder|cross_encoder|file or a loss without teacher (infonce)")
            size = getattr(self.candidates, "size", None)
            if size is not None and self.sampler.num_negatives > size:
                raise ConfigError(f"sampling.num_negatives={self.sampler.num_negatives} is larger than the candidate "
                                  f"pool (candidates.depth={self.candidates.depth} + "
                                  f"candidates.random={self.candidates.random})")
        self.timer = Timer()
        self._encoder: SpladeEncoder | None = None
        self._datasets: dict[str, Dataset] = {}
        self.train_result: dict | None = None
        self._config: dict | None = None
        self._forced: set[tuple[str, str]] = set()

    @property
    def vectors(self) -> bool:
        """True when the backend indexes encoded vectors (the encode stage runs), False for a text backend."""
        return isinstance(self.backend, VectorBackend)

    # ---------------------------------------------------------------- provenance
    @property
    def config(self) -> dict:
        if self._config is None:
            self._config = OmegaConf.to_container(self.cfg, resolve=True)
        return self._config

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

    def input_files(self) -> dict[str, str]:
        """Content digests of the files the training config names (candidate runs, teacher scores)."""
        out = {}
        for section in ("candidates", "teacher"):
            for dotted, value in prov.flatten(self.config.get(section) or {}).items():
                if isinstance(value, str) and value and Path(value).is_file():
                    out[f"{section}.{dotted}"] = prov.file_digest(Path(value))
        return out

    def train_inputs(self) -> dict:
        spec = self.data_spec
        folder = Path(spec.path) if spec.path else Path(OmegaConf.select(self.cfg, "paths.data_dir") or ".") / spec.name
        files = [prov.corpus_file(folder), folder / "queries.jsonl", folder / "queries.jsonl.gz",
                 folder / "qrels" / f"{spec.split}.tsv"]
        content = {f.name: prov.file_digest(f) for f in files if f is not None and f.is_file()} or \
            {"irds": spec.irds_id}
        inputs = prov.train_inputs(self.config, prov.digest(content))
        inputs["files"] = self.input_files()
        return inputs

    def model_key(self) -> str:
        """Key of the model the encode stage uses: its tensors, or the untrained backbone's config."""
        path = self.cfg.model.path
        if path:
            return prov.model_key(Path(path))
        if self.run.model.exists():
            return prov.model_key(self.run.model)
        return prov.digest({"untrained": {k: self.config.get(k) for k in ("backbone", "head_scaling", "seed")}})

    def corpus_id(self, ds: Dataset) -> str:
        """Folder name of a corpus's encodings and index: its name and a digest of its content."""
        return f"{ds.corpus_key}-{prov.corpus_digest(ds)[:10]}"

    def encode_key(self, ds: Dataset) -> str:
        return prov.digest({"model": self.model_key(), "encode": self.config.get("encode"),
                            "corpus": prov.corpus_digest(ds)})

    def queries_key(self, ds: Dataset) -> str:
        texts = prov.texts_digest(ds.judged_queries())
        if not self.vectors:
            return texts
        return prov.digest({"model": self.model_key(), "encode": self.config.get("encode"), "queries": texts})

    def index_key(self, ds: Dataset) -> str:
        source = self.encode_key(ds) if self.vectors else prov.corpus_digest(ds)
        return prov.digest({"source": source, "index": self.config.get("index")})

    def search_key(self, ds: Dataset) -> str:
        return prov.digest({"index": self.index_key(ds), "queries": self.queries_key(ds),
                            "k": self.config["eval"].get("k")})

    # ---------------------------------------------------------------- pieces
    def dataset(self, key: str) -> Dataset:
        if key not in self._datasets:
            self._datasets[key] = load_spec(self.eval_sets[key], OmegaConf.select(self.cfg, "paths.data_dir"),
                                             OmegaConf.select(self.cfg, "paths.cache_dir"))
        return self._datasets[key]

    def fresh_encoder(self) -> SpladeEncoder:
        """The backbone as configured, head scaling applied, before any optimizer exists."""
        mlm, tokenizer, settings = load_backbone(self.backbone, self.seed)
        scaling = build(self.cfg.head_scaling, "head_scaling")
        record = scaling.apply(mlm, inflate=self.backbone.head_inflate)
        settings["head_scaling"] = record
        rd.write_json(self.run.head_scaling, record)
        return SpladeEncoder(mlm, tokenizer, settings)

    def encoder(self) -> SpladeEncoder:
        if self._encoder is None:
            path = self.cfg.model.path
            if path:
                self._encoder = load_model_folder(Path(path), "model.path")
            elif self.run.model.exists():
                self._encoder = load_model_folder(self.run.model, "the run's model")
            elif "train" not in self.stages:
                log.warning("no trained model (model.path unset, no %s): encoding with the untrained backbone",
                            self.run.model)
                self._encoder = self.fresh_encoder()
            else:
                raise LsrError(f"{self.run.model} missing after training")
            self._encoder.to(self.dist.device())
        return self._encoder

    # ---------------------------------------------------------------- stages
    def stage_inspect(self) -> None:
        from .models.inspect import inspect_backbone

        report = inspect_backbone(self.cfg, self.backbone, self.seed)
        rd.write_json(self.run.inspect, report)

    def check_checkpoint(self, inputs: dict) -> None:
        """A checkpoint made from other training inputs is refused (or, with force=true, dropped)."""
        ckpt, record = self.run.checkpoint, self.run.checkpoint_inputs
        if not ckpt.exists():
            return
        old = rd.read_json(record) if record.exists() else None
        force = self.cfg.get("force", False)
        if old is not None and old.get("provenance") == prov.digest(inputs) and not force:
            return
        diff = prov.differences(old.get("inputs", {}), inputs) if old else ["(the checkpoint records no inputs)"]
        if not force:
            raise LsrError(f"checkpoint {ckpt} was made from other training inputs (differs in: {', '.join(diff)}); "
                           f"resume it with its own config, or pass force=true to train again from step 0")
        log.warning("force=true: dropping checkpoint %s (differs in: %s); training from step 0", ckpt,
                    ", ".join(diff) or "nothing")
        import shutil

        shutil.rmtree(self.run.checkpoints)

    def stage_train(self) -> None:
        inputs = self.train_inputs()
        key = prov.digest(inputs)
        if self.current("train", "", key) and self.run.model.exists():
            self.train_result = rd.read_json(self.run.train_state)
            log.info("train: done already, from the same inputs (%s)", self.run.train_state)
            return
        if self.dist.is_main:
            self.check_checkpoint(inputs)
            rd.write_json(self.run.checkpoint_inputs, {"provenance": key, "inputs": inputs})
        self.dist.barrier()
        from .train import Trainer, TrainingData

        spec = self.train_spec
        dataset = load_spec(self.data_spec, OmegaConf.select(self.cfg, "paths.data_dir"),
                            OmegaConf.select(self.cfg, "paths.cache_dir"))
        positives = training_examples(dataset)
        pools = self.candidates.pools(dataset, positives, self.run.candidates)
        scores = None
        if self.teacher.enabled:
            pairs = {q: positives[q] + pools[q] for q in positives if q in pools}
            scores = self.teacher.score(dataset.queries, dataset.corpus, pairs, self.run.teacher)
        sampler = self.sampler
        data = TrainingData(dataset.queries, positives, pools, dataset.corpus, scores)
        if scores is not None:
            from .sampling_stats import record_sampling_stats

            record_sampling_stats(data, sampler, self.seed, self.run)
        encoder = self.fresh_encoder().to(self.dist.device())
        from .models.inspect import head_report, probe_report

        init = {"head": head_report(encoder.mlm), "probe": probe_report(encoder)}
        rd.write_json(self.run.init_report, init)
        log.info("head at init: |W|_F %.1f, row norm mean %.3f, bias mean %s; probe queries: %.0f active terms, "
                 "%.3f positive logits; docs: %.0f active terms, L1 %.1f", init["head"]["decoder_frobenius"],
                 init["head"]["row_norm_mean"], init["head"].get("bias_mean"),
                 init["probe"]["queries"]["active_terms"], init["probe"]["queries"]["positive_fraction"],
                 init["probe"]["docs"]["active_terms"], init["probe"]["docs"]["l1"])
        trainer = Trainer(encoder, data, sampler, self.loss, self.regularizer, spec, self.run, self.seed)
        result = trainer.train()
        result["train_queries"] = len(data.qids)
        result["processes"] = self.dist.world
        self.train_result = result
        self._encoder = encoder
        if not self.dist.is_main:
            self.dist.barrier()
            return
        with rd.atomic_path(self.run.model) as tmp:
            encoder.save(tmp, max_length=self.encode_spec.doc_max_length)
        rd.write_json(self.run.train_state, result)
        rd.mark_done(self.run, "train", info={"provenance": key, "inputs": inputs,
                                             "model": prov.model_key(self.run.model)})
        self.dist.barrier()
        try:
            from .plots import plot_training

            plot_training(self.run)
        except Exception as e:  # a plot must never cost a finished run
            log.warning("training plot failed: %s", e)

    def stage_encode(self) -> None:
        if not self.vectors:
            return
        for key in self.eval_sets:
            ds = self.dataset(key)
            cid = self.corpus_id(ds)
            corpus_dir = self.run.encoded_corpus(cid)
            encode_key = self.encode_key(ds)
            if not self.current("encode", cid, encode_key):
                if self.dist.is_main and corpus_dir.exists():  # shards of an interrupted attempt: start over
                    import shutil

                    shutil.rmtree(corpus_dir)
                self.dist.barrier()
                encode_corpus(self.encoder(), ds.corpus, corpus_dir, self.encode_spec, self.dist.rank, self.dist.world,
                              min_shards=self.backend.indexing_threads)
                self.dist.barrier()
                if self.dist.is_main:
                    stats = merge_stats(corpus_dir)
                    rd.mark_done(self.run, "encode", cid, {**stats, "provenance": encode_key})
                    log.info("encoded %s: %d docs, %.1f terms/doc, %.1f docs/s", cid, stats["docs"],
                             stats["doc_terms"], stats["docs_per_second"])
            qpath = self.run.encoded_queries(key)
            queries_key = self.queries_key(ds)
            if self.dist.is_main and not self.current("encode-queries", key, queries_key):
                stats = encode_queries(self.encoder(), ds.judged_queries(), qpath, self.encode_spec)
                rd.write_json(self.run.encoded_queries_stats(key), stats)
                rd.mark_done(self.run, "encode-queries", key, {"provenance": queries_key})

    def stage_index(self) -> None:
        for key in self.eval_sets:
            ds = self.dataset(key)
            cid = self.corpus_id(ds)
            index_dir = self.run.index(cid)
            index_key = self.index_key(ds)
            if self.current("index", cid, index_key):
                continue
            if self.vectors:
                self.backend.build(self.run.encoded_corpus(cid), index_dir)
            else:
                self.backend.build_from_corpus(ds.corpus, index_dir)
            rd.mark_done(self.run, "index", cid, {"provenance": index_key})

    def stage_search(self) -> None:
        k = int(self.cfg.eval.k)
        for key in self.eval_sets:
            ds = self.dataset(key)
            run_path = self.run.run_file(key)
            search_key = self.search_key(ds)
            if run_path.exists() and self.current("search", key, search_key):
                continue
            index_dir = self.run.index(self.corpus_id(ds))
            if self.vectors:
                self.backend.search(index_dir, read_query_vectors(self.run.encoded_queries(key)), k, run_path)
            else:
                self.backend.search_text(index_dir, ds.judged_queries(), k, run_path)
            rd.mark_done(self.run, "search", key, {"provenance": search_key})

    def stage_evaluate(self) -> dict:
        metrics_cfg = list(self.cfg.eval.metrics)
        out: dict = {}
        for key, spec in self.eval_sets.items():
            ds = self.dataset(key)
            run = read_trec_run(self.run.run_file(key)) if self.run.run_file(key).exists() else {}
            if spec.remove_self_hits:
                run = remove_self_hits(run)
            means, per_query = evaluate_run(ds.qrels, run, spec.metrics or metrics_cfg)
            rd.write_json(self.run.per_query(key), per_query)
            entry = dict(means)
            if self.vectors:
                qstats = self.run.encoded_queries_stats(key)
                dstats = self.run.encoded_corpus_stats(self.corpus_id(ds))
                entry["query_terms"] = rd.read_json(qstats)["query_terms"] if qstats.exists() else None
                entry["doc_terms"] = rd.read_json(dstats)["doc_terms"] if dstats.exists() else None
            entry["queries"] = len(per_query)
            out[key] = entry
        rd.write_json(self.run.metrics, out)
        return out

    def record_collapse(self) -> None:
        """metrics.json of a collapsed run: every dataset marked as not scored (the collapse is in status.json)."""
        rd.write_json(self.run.metrics, {key: {"scored": False} for key in self.eval_sets})

    def training_outcome(self) -> dict:
        """{collapsed, collapse: {step, reason, ...}} of this run's training, for status.json ({} without one)."""
        result = self.train_result
        if result is None and self.run.train_state.exists():
            result = rd.read_json(self.run.train_state)
        if result is None:
            return {}
        out = {"collapsed": bool(result.get("collapsed", False))}
        if out["collapsed"]:
            out["collapse"] = {k: result.get(k) for k in ("step", "reason", "query_terms", "doc_terms")}
        return out

    # ---------------------------------------------------------------- driver
    def execute(self) -> dict:
        for stage in self.stages:
            if not self.dist.is_main and stage not in ("train", "encode"):
                continue  # other ranks help with training and encoding; rank 0 indexes, searches, evaluates
            if stage in ("encode", "index", "search", "evaluate") and self.train_result and \
                    self.train_result.get("collapsed") and not self.cfg.train.collapse.get("evaluate", False):
                if stage == "evaluate":
                    self.record_collapse()
                log.warning("%s: skipped, training collapsed (train.collapse.evaluate=true scores it anyway)", stage)
                continue
            interrupt.set_stage(stage)
            start = time.time()
            log.info("stage %s", stage)
            result = getattr(self, f"stage_{stage}")()
            self.timer.add(stage, time.time() - start)
            rd.write_json(self.run.timings, self.timer.seconds)
        return rd.read_json(self.run.metrics) if self.run.metrics.exists() else {}


IGNORED_FOR_IDENTITY = ("stages", "force", "model", "expected", "paths", "inspect")  # paths: content is keyed instead;
# inspect: the options a report shows, not what a run computes


def _identity(cfg: DictConfig) -> dict:
    """The part of a config that defines a run's results (stage lists and output-only keys left out)."""
    data = OmegaConf.to_container(cfg, resolve=True)
    for key in IGNORED_FOR_IDENTITY:
        data.pop(key, None)
    for key in prov.TRAIN_NEUTRAL:  # cadence and prefetch: a run made with other values has the same results
        prov.drop(data, f"train.{key}")
    for key, value in prov.INERT_DEFAULTS.items():  # keys newer than the run, at the value it ran with
        prov.drop(data, key, value, always=False)
    return data


def guard_run_dir(cfg: DictConfig, run: RunDir) -> None:
    """Refuse to overwrite a finished run made with a different config, unless force=true."""
    if not run.config.exists():
        return
    old = OmegaConf.load(run.config)
    if _identity(old) == _identity(cfg):
        return
    if not run.metrics.exists() and not rd.is_done(run, "train"):
        return  # nothing finished yet
    if cfg.get("force", False):
        log.warning("force=true: overwriting the finished run in %s", run.root)
        return
    a, b = _identity(old), _identity(cfg)
    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    raise LsrError(f"{run.root} holds a finished run with a different config (differs in: {', '.join(diff)}); "
                   f"choose another hydra.run.dir or pass force=true to overwrite")


def print_table(metrics: dict, baselines: dict[str, dict], metric: str = "ndcg@10") -> str:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{metric} (terms per query / document)")
    table.add_column("dataset")
    table.add_column("model", justify="right")
    for name in baselines:
        table.add_column(name, justify="right")
    table.add_column("q terms", justify="right")
    table.add_column("d terms", justify="right")
    header = ["dataset", "model", *baselines, "q terms", "d terms"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for key, entry in metrics.items():
        if not isinstance(entry, dict) or metric not in entry:
            continue
        cells = [f"{entry[metric]:.4f}"] + [f"{b.get(key, {}).get(metric, float('nan')):.4f}" for b in baselines.values()]
        terms = [f"{entry.get('query_terms') or 0:.1f}", f"{entry.get('doc_terms') or 0:.1f}"]
        table.add_row(key, *cells, *terms)
        lines.append(f"| {key} | " + " | ".join(cells + terms) + " |")
    Console(width=160).print(table)
    return "\n".join(lines)


_LOCKS: dict[str, object] = {}


def lock_run_dir(root: Path) -> None:
    """One process per run directory: an advisory lock held until the process ends (or ``unlock_run_dir``)."""
    import fcntl

    path = RunDir(Path(root)).lock
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise RunDirBusy(f"{root} is in use by another lsr-run process (pid {holder}); wait for it to finish, or "
                       f"choose another hydra.run.dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    _LOCKS[str(Path(root).resolve())] = handle


def unlock_run_dir(root: Path) -> None:
    handle = _LOCKS.pop(str(Path(root).resolve()), None)
    if handle is not None:
        handle.close()  # closing the file releases the lock


def run(cfg: DictConfig, root: Path) -> dict:
    ctx = distributed.init()
    run_dir = RunDir(Path(root))
    torch.manual_seed(int(cfg.seed))
    experiment = Experiment(cfg, run_dir.root)  # validates everything before any file (or the lock) is written
    if ctx.is_main:
        run_dir.root.mkdir(parents=True, exist_ok=True)
        lock_run_dir(run_dir.root)
    try:
        return _run_locked(cfg, run_dir, ctx, experiment)
    finally:
        if ctx.is_main:
            unlock_run_dir(run_dir.root)


BASELINE_STAGES = ("index", "search", "evaluate")  # a baseline is a text backend: nothing is trained or encoded


def baseline_config(cfg: DictConfig, name: str) -> DictConfig:
    """Baseline ``name``'s own config, composed from the run's: every section but ``index`` and ``stages``, then
    the baseline's index node (``eval.baselines.<name>``) as its index and the stages a baseline runs. The run's
    config is left as it is; the result is written to ``baselines/<name>/config.yaml``."""
    composed = OmegaConf.masked_copy(cfg, [k for k in cfg if k not in ("index", "stages")])
    OmegaConf.set_struct(composed, False)
    composed = OmegaConf.merge(composed, {"index": cfg.eval.baselines[name], "stages": list(BASELINE_STAGES)})
    OmegaConf.set_struct(composed, True)
    return composed


def _run_locked(cfg: DictConfig, run_dir: RunDir, ctx, experiment: Experiment) -> dict:
    if ctx.is_main:
        guard_run_dir(cfg, run_dir)
    if ctx.is_main:
        rd.write_text(run_dir.config, OmegaConf.to_yaml(cfg, resolve=True))
        from .environment import lock_record

        meta = rd.run_metadata(int(cfg.seed))
        meta["lock"] = lock_record()
        meta["paths"] = OmegaConf.to_container(cfg.paths, resolve=True) if "paths" in cfg else None
        meta["processes"] = ctx.world
        rd.write_json(run_dir.meta, meta)
        rd.write_json(run_dir.status, {"state": "running", "pid": os.getpid()})
    ctx.barrier()
    metrics = experiment.execute()
    if not ctx.is_main:
        return {}
    baselines = {}
    for name in cfg.eval.get("baselines") or {}:
        bcfg = baseline_config(cfg, name)
        base_dir = run_dir.baseline(name)
        log.info("baseline %s", name)
        base_dir.root.mkdir(parents=True, exist_ok=True)
        rd.write_text(base_dir.config, OmegaConf.to_yaml(bcfg, resolve=True))
        baselines[name] = Experiment(bcfg, base_dir.root).execute()
    if metrics and "evaluate" in experiment.stages:
        if run_dir.model.is_dir() and not cfg.model.path:
            from .models.persist import write_model_card

            write_model_card(run_dir.model, OmegaConf.to_container(cfg, resolve=True),
                             rd.read_json(run_dir.train_state) if run_dir.train_state.exists() else None,
                             metrics, rd.read_json(run_dir.meta))
        table = print_table(metrics, baselines)
        rd.write_text(run_dir.table, table + "\n")
    interrupt.check()
    rd.write_json(run_dir.status, {"state": "done", **experiment.training_outcome()})
    return metrics
