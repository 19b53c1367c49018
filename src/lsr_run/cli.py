"""``lsr-run``: one Hydra entry point; runs the configured stages in one run directory.

Returns the sweep objective (mean nDCG@10 over the evaluated datasets) so Hydra sweepers can optimise it.
Problems with the user's input or environment (``LsrError``) print one clear message, no traceback; in a
multirun the failed job is recorded in its run directory (``failed.json``) and the sweep goes on.
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


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="run")
def main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from . import run_dir as rd
    from .errors import LsrError
    from .pipeline import run

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hc = HydraConfig.get()
    root = Path(hc.runtime.output_dir)
    try:
        metrics = run(cfg, root)
    except LsrError as e:
        log.error("%s", e)  # into the run's log file
        print(f"lsr-run: error: {e}", file=sys.stderr)
        if hc.mode == RunMode.MULTIRUN:
            rd.write_json(root / "failed.json", {"error": str(e), "type": type(e).__name__})
            return None
        sys.exit(2)
    return objective(metrics)


if __name__ == "__main__":
    main()
