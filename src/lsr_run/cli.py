"""``lsr-run``: one Hydra entry point; runs the configured stages in one run directory.

Returns the sweep objective (mean nDCG@10 over the evaluated datasets) so Hydra sweepers can optimise it.
Problems with the user's input or environment (``LsrError``, and a full disk, an unwritable run folder or a
file where it should be) print one clear message, no traceback, and exit 2; in a multirun the failed job is
recorded in its run directory (``failed.json``) and the sweep goes on. SIGINT and SIGTERM stop the run (child
processes stopped, temporary files removed), are recorded in ``status.json`` and exit 130 / 143; the same
command resumes.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig



def conf_dir() -> str:
    """The Hydra configs: ``$LSR_CONF_DIR``, else those shipped inside the package (``lsr_run/conf`` in a wheel),
    else the checkout's ``conf/`` (an editable install)."""
    if os.environ.get("LSR_CONF_DIR"):
        return os.environ["LSR_CONF_DIR"]
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parents[1] / "conf"):
        if (candidate / "run.yaml").is_file():
            return str(candidate)
    raise SystemExit(f"lsr-run: error: no configs found (looked in {here / 'conf'} and {here.parents[1] / 'conf'}); "
                     "set LSR_CONF_DIR to a folder holding run.yaml")


CONF_DIR = conf_dir()

log = logging.getLogger("lsr_run")


def objective(metrics: dict, metric: str = "ndcg@10") -> float | None:
    values = [v[metric] for v in metrics.values() if isinstance(v, dict) and metric in v]
    return sum(values) / len(values) if values else None


def _set_status(root: Path, **status) -> None:
    """Record how this attempt ended in ``status.json``; never fails the run (the disk may be full)."""
    import time

    from . import run_dir as rd

    try:
        if root.is_dir():
            rd.write_json(rd.RunDir(root).status, {**status, "pid": os.getpid(),
                                                   "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
    except (OSError, RuntimeError):
        pass


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="run")
def _main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from . import interrupt
    from . import run_dir as rd
    from .errors import LsrError, RunDirBusy
    from .pipeline import run

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hc = HydraConfig.get()
    root = Path(hc.runtime.output_dir)
    interrupt.reset()
    interrupt.install()
    try:
        try:
            metrics = run(cfg, root)
            interrupt.check()  # a signal whose exception was swallowed (ignored in a destructor) still stops it
        except (OSError, RuntimeError) as e:
            error = None if isinstance(e, LsrError) else rd.write_error(e, root)
            if error is None:
                raise
            raise error from None
    except interrupt.Interrupted as e:
        stage = interrupt.stage() or "setup"
        _set_status(root, state="interrupted", signal=e.name, stage=stage)
        log.error("interrupted by %s during stage %s", e.name, stage)
        print(f"lsr-run: interrupted by {e.name} during stage {stage}: child processes stopped, temporary files "
              f"removed; run the same command again to resume", file=sys.stderr)
        sys.exit(e.exit_code)
    except LsrError as e:
        log.error("%s", e)  # into the run's log file
        print(f"lsr-run: error: {e}", file=sys.stderr)
        if isinstance(e, RunDirBusy):  # the folder is another process's: write nothing into it
            sys.exit(2)
        if rd.RunDir(root).status.exists():
            _set_status(root, state="failed", stage=interrupt.stage(), error=str(e))
        if hc.mode == RunMode.MULTIRUN:
            try:
                rd.write_json(rd.RunDir(root).failed, {"error": str(e), "type": type(e).__name__})
            except LsrError:
                pass
            return None
        sys.exit(2)
    return objective(metrics)


def _check_run_dir(argv: list[str]) -> str | None:
    """The message for a ``hydra.run.dir`` that cannot become the run folder (Hydra creates it before lsr-run
    runs and would end in a traceback), else None."""
    from .run_dir import file_in_the_way

    for arg in argv:
        key, _, value = arg.lstrip("+").partition("=")
        if key != "hydra.run.dir" or not value or "${" in value:
            continue
        blocker = file_in_the_way(Path(value))
        if blocker is not None:
            return f"hydra.run.dir={value}: {blocker} is a file, not a folder; choose another hydra.run.dir"
        existing = next(p for p in (Path(value).absolute(), *Path(value).absolute().parents) if p.exists())
        if not os.access(existing, os.W_OK | os.X_OK):
            return f"hydra.run.dir={value}: {existing} is not writable; choose another hydra.run.dir"
    return None


def main() -> None:
    """The ``lsr-run`` command: the run folder checked, then Hydra's main."""
    problem = _check_run_dir(sys.argv[1:])
    if problem:
        print(f"lsr-run: error: {problem}", file=sys.stderr)
        sys.exit(2)
    _main()


if __name__ == "__main__":
    main()
