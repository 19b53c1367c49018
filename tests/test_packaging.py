"""lsr-run installs as a package: a wheel carries its configs and runs from any folder; paths are config keys."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LSR_", "PYTHONPATH"))}
    env.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **extra})
    return env


@pytest.fixture(scope="module")
def wheel_target(tmp_path_factory) -> Path:
    """The project built as a wheel and installed, without dependencies, into a folder of its own."""
    tmp = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp / "dist"), str(ROOT)],
                   check=True, capture_output=True, text=True, timeout=600)
    wheel = next((tmp / "dist").glob("lsr_run-*.whl"))
    target = tmp / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, text=True, timeout=600)
    return target


@pytest.mark.process
def test_wheel_runs_from_another_folder(wheel_target, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = _env(PYTHONPATH=str(wheel_target))
    where = subprocess.run([sys.executable, "-c", "import lsr_run.cli as c; print(c.__file__); print(c.CONF_DIR)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, check=True)
    module, conf = where.stdout.split()
    assert Path(module).is_relative_to(wheel_target) and Path(conf) == wheel_target / "lsr_run" / "conf"
    job = subprocess.run([sys.executable, "-m", "lsr_run.cli", "experiment=demo", "--cfg", "job", "--resolve"], cwd=elsewhere,
                         env=env, capture_output=True, text=True, timeout=300)
    assert job.returncode == 0, job.stderr
    assert "experiment" not in job.stdout.split("\n", 1)[0]  # the composed config, not an error
    assert f"data_dir: {os.path.abspath(elsewhere / '../shared/data')}" in job.stdout
    inspect = subprocess.run([sys.executable, "-m", "lsr_run.cli", "stages=[inspect]", "backbone=tiny_bert",
                              "hydra.run.dir=run"], cwd=elsewhere, env=env, capture_output=True, text=True,
                             timeout=600)
    assert inspect.returncode == 0, inspect.stderr[-2000:]
    assert (elsewhere / "run" / "inspect.json").is_file()
    assert (elsewhere / "run" / "config.yaml").read_text().count(str(elsewhere)) >= 1  # paths recorded absolute


@pytest.mark.process
def test_paths_default_and_override(tmp_path):
    """Without LSR_DATA_DIR the data folder is ../shared/data from where lsr-run starts; keys override it."""
    job = subprocess.run([sys.executable, "-m", "lsr_run.cli", "--cfg", "job", "--resolve"], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert job.returncode == 0, job.stderr
    assert f"data_dir: {os.path.abspath(ROOT / '../shared/data')}" in job.stdout
    job = subprocess.run([sys.executable, "-m", "lsr_run.cli", "--cfg", "job", "--resolve", f"paths.data_dir={tmp_path}"],
                         cwd=ROOT, env=_env(LSR_DATA_DIR="/nowhere"), capture_output=True, text=True, timeout=300)
    assert f"data_dir: {tmp_path}" in job.stdout
    job = subprocess.run([sys.executable, "-m", "lsr_run.cli", "--cfg", "job", "--resolve"], cwd=ROOT,
                         env=_env(LSR_DATA_DIR=str(tmp_path)), capture_output=True, text=True, timeout=300)
    assert f"data_dir: {tmp_path}" in job.stdout


@pytest.mark.process
@pytest.mark.parametrize("offline", ["1", "0"])
def test_export_without_network_says_so_in_one_line(tmp_path, offline):
    from conftest import make_tiny_encoder

    make_tiny_encoder("bert").save(tmp_path / "model")
    env = _env(HF_HUB_OFFLINE=offline, HF_TOKEN="hf_invalid", HF_HUB_ETAG_TIMEOUT="5",
               HF_HUB_DOWNLOAD_TIMEOUT="5", HF_ENDPOINT="http://127.0.0.1:9")  # a closed local port: no network
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "export.py"), str(tmp_path / "model"), "me/tiny"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("lsr-run export:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert ("offline" in lines[0]) if offline == "1" else ("could not push" in lines[0])
