"""Hydra launchers: SLURM through submitit (composition; submitit's local executor runs the same code path for
real, including a 2-task DDP world) and joblib for parallel local sweeps."""

import json

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from conftest import CONF_DIR, cli, losses, toy_overrides


def _compose(overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="run", overrides=overrides, return_hydra_config=True)


def test_slurm_launcher_composes_one_task_per_gpu():
    cfg = _compose(["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=4", "hydra.launcher.nodes=2",
                    "hydra.launcher.partition=gpu"])
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == (2, 4, 4)
    assert launcher.partition == "gpu" and launcher.max_num_timeout == 3


def test_local_parallel_launcher_composes_joblib():
    cfg = _compose(["hydra/launcher=local_parallel", "hydra.launcher.n_jobs=3"])
    assert cfg.hydra.launcher._target_ == "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
    assert cfg.hydra.launcher.n_jobs == 3


@pytest.mark.process
def test_joblib_sweep_runs_points_in_parallel_processes(toy, tmp_path):
    sweep = tmp_path / "sweep"
    proc = cli(["-m", "hydra/launcher=local_parallel", *toy_overrides(toy, steps=2), "seed=1,2",
                f"hydra.sweep.dir={sweep}"], {"LSR_DATA_DIR": str(toy["data"]), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job in ("0", "1"):
        metrics = json.loads((sweep / job / "metrics.json").read_text())
        assert 0.0 <= metrics["toytest"]["ndcg@10"] <= 1.0
    pids = {json.loads((sweep / job / "meta.json").read_text()).get("pid") for job in ("0", "1")}
    assert len(pids) == 2 and None not in pids  # two worker processes, not one after the other in this one


@pytest.mark.process
def test_submitit_two_tasks_form_one_ddp_world(toy, tmp_path):
    """The code path of a SLURM job with 2 tasks, on submitit's local executor: same losses as one process."""
    env = {"LSR_DATA_DIR": str(toy["data"]), "OMP_NUM_THREADS": "1"}
    overrides = toy_overrides(toy, steps=4) + ["train.dropout=0.0", "train.lr=2e-4"]
    single = tmp_path / "one"
    proc = cli(overrides + [f"hydra.run.dir={single}"], env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    sweep = tmp_path / "sweep"
    proc = cli(["-m", "hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2",
                "hydra.launcher.timeout_min=15", *overrides, f"hydra.sweep.dir={sweep}"], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = sweep / "0"
    logs = "\n".join(p.read_text() for p in (sweep / ".submitit").rglob("*.err"))
    assert (run / "metrics.json").exists(), logs[-3000:]
    assert json.loads((run / "train_state.json").read_text())["processes"] == 2
    a, b = losses(single), losses(run)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-2), (step, a[step], b[step])
