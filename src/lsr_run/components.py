"""Everything a composed config describes, checked and built once before any stage runs.

``Components.from_config`` validates the plain-data sections against their schemas (unknown keys, wrong types),
builds every ``_target_`` (out-of-range values fail here) and checks the rules that span keys. The stages
(``lsr_run.stages``) receive the result and never read a config section again for what it builds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from . import run_dir as rd
from .backends import Backend, TextBackend, VectorBackend
from .data import Dataset, load_dataset
from .encoding import EncodeSpec
from .errors import ConfigError, LsrError
from .losses import RankingLoss
from .models.backbone import BackboneSpec
from .models.splade import SpladeEncoder

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


@dataclass
class TrainParts:
    """What the train stage is built from: its schema-checked specs and the built candidates, teacher, sampler,
    loss and regularizer."""

    spec: Any  # lsr_run.train.TrainSpec
    data: EvalDataset
    candidates: Any
    teacher: Any
    sampler: Any
    loss: RankingLoss
    regularizer: Any


@dataclass
class Components:
    """The checked and built parts of one run's config (``from_config``), shared by every stage."""

    cfg: DictConfig
    seed: int
    stages: list[str]
    backbone: BackboneSpec
    encode: EncodeSpec
    backend: Backend
    eval_sets: dict[str, EvalDataset]
    train: TrainParts | None = None
    _config: dict | None = field(default=None, repr=False)

    @property
    def vectors(self) -> bool:
        """True when the backend indexes encoded vectors (the encode stage runs), False for a text backend."""
        return isinstance(self.backend, VectorBackend)

    @property
    def config(self) -> dict:
        """The resolved config as plain data (what provenance keys are computed from)."""
        if self._config is None:
            self._config = OmegaConf.to_container(self.cfg, resolve=True)
        return self._config

    @classmethod
    def from_config(cls, cfg: DictConfig) -> "Components":
        from .train import TrainSpec

        stages = list(cfg.stages)
        unknown = [s for s in stages if s not in STAGES]
        if unknown:
            raise ConfigError(f"stages: unknown {unknown}; allowed {list(STAGES)}")
        backbone = structured(BackboneSpec, cfg.backbone, "backbone")
        encode = structured(EncodeSpec, cfg.encode, "encode")
        backend = build_backend(cfg.index, "index")
        eval_sets = {key: structured(EvalDataset, node, f"eval.datasets.{key}")
                     for key, node in (cfg.eval.datasets or {}).items()}
        parts = cls(cfg=cfg, seed=int(cfg.seed), stages=[s for s in STAGES if s in stages], backbone=backbone,
                    encode=encode, backend=backend, eval_sets=eval_sets)
        check_names(cfg, eval_sets)
        for name, node in (cfg.eval.get("baselines") or {}).items():
            baseline = build_backend(node, f"eval.baselines.{name}")
            if not isinstance(baseline, TextBackend):  # baselines run index, search, evaluate: nothing is encoded
                raise ConfigError(f"eval.baselines.{name}: {type(baseline).__name__} searches encoded vectors; a "
                                  f"baseline is evaluated without a model and must be a text backend "
                                  f"(lsr_run.backends.lucene.LuceneBm25Backend)")
        build(cfg.head_scaling, "head_scaling")
        if "train" in parts.stages:
            spec = structured(TrainSpec, cfg.train, "train")
            spec.validate()
            data = structured(EvalDataset, cfg.data.train, "data.train")
            rd.check_name(data.name, "data.train.name")
            rd.check_name(data.split, "data.train.split")
            train = TrainParts(spec=spec, data=data, candidates=build(cfg.candidates, "candidates"),
                               teacher=build(cfg.teacher, "teacher"), sampler=build(cfg.sampling, "sampling"),
                               loss=build(cfg.loss, "loss"), regularizer=build(cfg.regularizer, "regularizer"))
            if not isinstance(train.loss, RankingLoss):
                raise ConfigError(f"loss: {cfg.loss.get('_target_')} is not a ranking loss (lsr_run.losses)")
            if train.loss.needs_teacher and not train.teacher.enabled:
                raise ConfigError(f"loss={cfg.loss._target_.rsplit('.', 1)[-1]} needs teacher scores but teacher=none; "
                                  "choose teacher=bi_encoder|cross_encoder|file or a loss without teacher (infonce)")
            size = getattr(train.candidates, "size", None)
            if size is not None and train.sampler.num_negatives > size:
                raise ConfigError(f"sampling.num_negatives={train.sampler.num_negatives} is larger than the candidate "
                                  f"pool (candidates.depth={train.candidates.depth} + "
                                  f"candidates.random={train.candidates.random})")
            parts.train = train
        return parts
