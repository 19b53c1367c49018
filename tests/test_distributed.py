"""DDP on CPU (gloo, 2 processes) reproduces the 1-process loss curve with the same global batch."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, cli, free_port, losses, toy_overrides


@pytest.mark.process
def test_two_process_gloo_matches_one_process(toy, tmp_path):
    env = dict(os.environ, LSR_DATA_DIR=str(toy["data"]), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1")
    # Adam amplifies the last-bit differences of a different reduction order; a modest lr keeps the comparison
    # about the engine, not about that amplification
    overrides = toy_overrides(toy, steps=6) + ["train.dropout=0.0", "train.lr=2e-4"]
    single = tmp_path / "one"
    proc = cli(overrides + [f"hydra.run.dir={single}"], {"LSR_DATA_DIR": str(toy["data"])})
    assert proc.returncode == 0, proc.stderr[-2000:]
    double = tmp_path / "two"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={free_port()}",  # not a fixed one: another job may hold it
                           "-m", "lsr_run.cli", *overrides, f"hydra.run.dir={double}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = losses(single), losses(double)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    print("step  1 process  2 processes")
    for step in a:
        print(f"{step:4d}  {a[step]:.6f}  {b[step]:.6f}")
    assert b[1] == pytest.approx(a[1], rel=1e-5)  # before any update: the same global loss
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-2), (step, a[step], b[step])
    state = json.loads((double / "train_state.json").read_text())
    assert state["processes"] == 2
    enc = json.loads(next((double / ".done").glob("encode-toytest-*")).read_text())  # <corpus>-<content digest>
    assert enc["ranks"] == 2 and enc["docs"] == 40  # corpus encoded in two shards, merged into one index
    ma = json.loads((single / "metrics.json").read_text())["toytest"]
    mb = json.loads((double / "metrics.json").read_text())["toytest"]
    assert mb["ndcg@10"] == pytest.approx(ma["ndcg@10"], abs=0.02)
    assert mb["doc_terms"] == pytest.approx(ma["doc_terms"], rel=0.02)
