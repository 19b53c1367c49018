"""Robustness: config errors before any work, kill-and-resume, no silent overwrite, numeric faults, collapse.

These runs use a tiny random BERT, a toy BEIR dataset, candidates from a TREC run file and the brute-force
backend: no Java, seconds per run.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from lsr_run.errors import ConfigError
from lsr_run.losses import RankingLoss

from conftest import CONF_DIR, WORDS, cli, losses, toy_overrides

@pytest.mark.process
def test_kill_during_training_then_resume_matches_uninterrupted(toy, tmp_path):
    env = {"LSR_DATA_DIR": str(toy["data"])}
    straight = tmp_path / "straight"
    proc = cli(toy_overrides(toy, steps=8) + [f"hydra.run.dir={straight}"], env)
    assert proc.returncode == 0, proc.stderr[-2000:]

    killed = tmp_path / "killed"
    p = cli(toy_overrides(toy, steps=8) + [f"hydra.run.dir={killed}"], env, wait=False)
    ckpt = killed / "checkpoints" / "last.pt"
    deadline = time.time() + 600
    while time.time() < deadline:  # kill right after the step-4 checkpoint landed (steps 5.. in flight)
        if ckpt.exists() and losses(killed) and max(losses(killed)) >= 5:
            break
        if p.poll() is not None:
            pytest.fail(f"run ended before it could be killed: {p.stderr.read()[-2000:]}")
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (killed / "metrics.json").exists()
    # written atomically: whatever exists under its final name is whole (a temporary file of the killed write is
    # named .<name>.tmp-<pid> and never matches *.json); stage markers under .done/ included
    whole = {p.relative_to(killed).as_posix(): json.loads(p.read_text()) for p in killed.rglob("*.json")}
    assert {"meta.json", "status.json", "checkpoints/inputs.json", "head_scaling.json"} <= set(whole)
    state = torch.load(ckpt, weights_only=False)
    assert 0 < state["step"] < 8

    proc = cli(toy_overrides(toy, steps=8) + [f"hydra.run.dir={killed}"], env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = losses(straight), losses(killed)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4, abs=1e-5), step
    ma = json.loads((straight / "metrics.json").read_text())["toytest"]
    mb = json.loads((killed / "metrics.json").read_text())["toytest"]
    assert mb["ndcg@10"] == pytest.approx(ma["ndcg@10"], abs=1e-6)
    assert json.loads((killed / "train_state.json").read_text())["resumed"] is True


@pytest.mark.process
def test_finished_run_is_never_overwritten_silently(toy, tmp_path):
    env = {"LSR_DATA_DIR": str(toy["data"])}
    run_dir = tmp_path / "run"
    assert cli(toy_overrides(toy, steps=2) + [f"hydra.run.dir={run_dir}"], env).returncode == 0
    before = (run_dir / "metrics.json").read_text()
    # the same config resumes: every stage is complete, nothing is recomputed
    again = cli(toy_overrides(toy, steps=2) + [f"hydra.run.dir={run_dir}"], env)
    assert again.returncode == 0 and "train: done already" in again.stderr
    # a different config is refused, with the differing key named (dotted), and nothing is touched
    other = cli(toy_overrides(toy, steps=2) + ["train.lr=5e-4", f"hydra.run.dir={run_dir}"], env)
    assert other.returncode == 2
    assert "different config (differs in: train.lr)" in other.stderr and "force=true" in other.stderr
    assert "Traceback" not in other.stderr
    assert (run_dir / "metrics.json").read_text() == before
    forced = cli(toy_overrides(toy, steps=2) + ["train.lr=5e-4", "force=true", f"hydra.run.dir={run_dir}"], env)
    assert forced.returncode == 0


def _experiment(overrides, tmp_path):
    from lsr_run import stages

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="run", overrides=overrides)
    return stages.prepare(cfg, tmp_path / "x")


@pytest.mark.parametrize("overrides,message", [
    (["train.lr=-1"], "train.lr=-1.0: out of range"),
    (["train.batch_size=abc"], "train.batch_size: Value 'abc' of type 'str' could not be converted to Integer"),
    (["head_scaling=constant", "head_scaling.k=0"], "head_scaling.k=0: must be > 0"),
    (["sampling.num_negatives=80"], "sampling.num_negatives=80 is larger than the candidate pool (candidates.depth=50 + candidates.random=0)"),
    (["loss=kl_div"], "needs teacher scores but teacher=none"),
    (["loss=kl_infonce"], "needs teacher scores but teacher=none"),  # a weighted sum needs what its parts need
    (["loss=margin_mse", "loss._target_=torch.nn.L1Loss"], "loss: torch.nn.L1Loss is not a ranking loss"),
    (["regularizer.lambda_d=-0.1"], "regularizer.lambda_d=-0.1: must be >= 0"),
    # what a backend indexes is its type: no setting turns a vector backend into a text one
    (["index=brute_force", "+index.needs_vectors=false"], "index: BruteForceBackend.__init__() got an unexpected "
                                                          "keyword argument 'needs_vectors'"),
    (["index=bm25", "+index.needs_vectors=true"], "unexpected keyword argument 'needs_vectors'"),
    (["index=brute_force", "index._target_=collections.OrderedDict"], "index: OrderedDict is not a retrieval backend"),
    (["+eval.baselines={bf: {_target_: lsr_run.backends.brute_force.BruteForceBackend}}"],
     "eval.baselines.bf: BruteForceBackend searches encoded vectors; a baseline is evaluated without a model"),
    (["stages=[train,dance]"], "stages: unknown ['dance']"),
    (["teacher=bi_encoder", "teacher.normalize=softmax"], "teacher.normalize=softmax: allowed none, minmax, zscore"),
    (["encode.max_tokens=0"], "encode.max_tokens=0: must be >= 1"),
    (["encode.weights=fp8"], "encode.weights=fp8: allowed null (as loaded), bf16"),
    (["encode.doc_top_k=0"], "encode.doc_top_k=0: must be >= 1 (or null: every term)"),
    (["encode.query_top_k=-3"], "encode.query_top_k=-3: must be >= 1"),
])
def test_bad_config_values_named_before_any_work(overrides, message, tmp_path):
    with pytest.raises(ConfigError) as err:
        _experiment(overrides, tmp_path)
    assert message in str(err.value)
    assert not (tmp_path / "x").exists()


def test_backend_kind_cannot_be_overridden():
    from hydra.errors import ConfigCompositionException

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        with pytest.raises(ConfigCompositionException, match="needs_vectors"):
            compose(config_name="run", overrides=["index=brute_force", "index.needs_vectors=false"])


def test_unknown_key_rejected_by_hydra():
    from hydra.errors import ConfigCompositionException

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        with pytest.raises(ConfigCompositionException, match="train.lrr"):
            compose(config_name="run", overrides=["train.lrr=1"])


@pytest.mark.process
def test_external_failures_give_one_clear_message(toy, tmp_path):
    env = {"LSR_DATA_DIR": str(toy["data"])}
    jvm = cli(["experiment=bm25", "eval=none", "+eval.datasets.toytest={name: toytest}", f"hydra.run.dir={tmp_path / 'j'}"],
              {**env, "LSR_JAVA": str(tmp_path / "no-java")})
    assert jvm.returncode == 2 and "JVM" in jvm.stderr and "LSR_JAVA" in jvm.stderr
    assert "Traceback" not in jvm.stderr
    hub = cli(["stages=[inspect]", "backbone=bert_base_uncased", f"hydra.run.dir={tmp_path / 'h'}"], env)
    assert hub.returncode == 2 and "cannot be loaded" in hub.stderr and "backbone.model_id" in hub.stderr
    assert "Traceback" not in hub.stderr
    data = cli(["experiment=bm25", "eval=none", "+eval.datasets.nope={name: nope}", f"hydra.run.dir={tmp_path / 'd'}"], env)
    assert data.returncode == 2 and "LSR_DATA_DIR" in data.stderr and "Traceback" not in data.stderr


class _NaNAt(RankingLoss):
    """A ranking loss that returns NaN on chosen calls: a numeric fault on demand."""

    def __init__(self, bad_calls):
        from lsr_run.losses import InfoNCE

        super().__init__()
        self.inner, self.bad, self.calls = InfoNCE(), set(bad_calls), 0

    def forward(self, batch):
        self.calls += 1
        value = self.inner(batch)
        return value * float("nan") if self.calls in self.bad else value


def _trainer(tmp_path, loss, regularizer=None, **spec_overrides):
    from lsr_run.losses import FlopsRegularizer
    from lsr_run.run_dir import RunDir
    from lsr_run.sampling import RandomSampler
    from lsr_run.train import CollapseSpec, Trainer, TrainingData, TrainSpec

    from conftest import make_tiny_encoder

    class Corpus:
        def text(self, d):
            return f"document {d} about " + " ".join(WORDS[int(d[1:]) % len(WORDS):][:6])

        def many(self, ids):
            return [self.text(d) for d in ids]

    docs = [f"d{i}" for i in range(20)]
    data = TrainingData({f"q{i}": f"query {WORDS[i]}" for i in range(8)}, {f"q{i}": [f"d{i}"] for i in range(8)},
                        {f"q{i}": [d for d in docs if d != f"d{i}"] for i in range(8)}, Corpus())
    settings = {"batch_size": 4, "max_steps": 6, "doc_max_length": 24, "bf16": "false", "save_every": 100,
                "log_every": 1, "warmup_steps": 0, **spec_overrides}
    collapse = CollapseSpec(**settings.pop("collapse", {}))
    spec = TrainSpec(**settings, collapse=collapse)
    encoder = make_tiny_encoder("bert", active=0.01)  # calibrated like a real head: about 1% of logits positive
    regularizer = FlopsRegularizer(warmup_steps=0) if regularizer is None else regularizer
    return Trainer(encoder, data, RandomSampler(2), loss, regularizer, spec,
                   RunDir(tmp_path / "run"), seed=0)


def test_prefetch_thread_trains_exactly_as_the_inline_loop(tmp_path):
    """The CUDA path's prefetch (the next batch sampled, read and tokenised in a thread), forced on a CPU: every
    logged value and every final weight equal those of the loop that does the host work in line."""
    from lsr_run.losses import InfoNCE

    runs = {}
    for prefetch in ("false", "true"):
        trainer = _trainer(tmp_path / prefetch, InfoNCE(), prefetch=prefetch)
        assert (trainer._prefetch is not None) == (prefetch == "true")
        result = trainer.train()
        assert result["steps"] == 6
        log = [{k: v for k, v in json.loads(line).items() if k != "rss_gb"}
               for line in trainer.run.train_log.read_text().splitlines()]
        runs[prefetch] = (log, {k: v.clone() for k, v in trainer.encoder.state_dict().items()})
    assert len(runs["true"][0]) == 6 and runs["true"][0] == runs["false"][0]
    assert all(torch.equal(runs["true"][1][k], v) for k, v in runs["false"][1].items())


def test_trainer_steps_with_fused_adamw_on_a_cpu_as_the_per_parameter_loop_does(tmp_path):
    """AdamW's fused kernel on a CPU (what the trainer builds there): the same logged losses and final weights as
    torch's per-parameter AdamW, within float reordering."""
    from transformers import get_linear_schedule_with_warmup

    from lsr_run.losses import InfoNCE

    runs = {}
    for fused in (True, False):
        trainer = _trainer(tmp_path / str(fused), InfoNCE())
        assert trainer.optimizer.defaults["fused"] is True  # what the trainer itself chose on this CPU
        if not fused:
            trainer.optimizer = torch.optim.AdamW(trainer.encoder.parameters(), lr=trainer.spec.lr,
                                                  weight_decay=trainer.spec.weight_decay)
            trainer.scheduler = get_linear_schedule_with_warmup(trainer.optimizer, 0, trainer.spec.max_steps)
        start = {k: v.clone() for k, v in trainer.encoder.state_dict().items()}
        trainer.train()
        log = [json.loads(line)["loss"] for line in trainer.run.train_log.read_text().splitlines()]
        runs[fused] = (log, {k: v.clone() for k, v in trainer.encoder.state_dict().items()})
        assert any(not torch.equal(v, start[k]) for k, v in runs[fused][1].items())  # the steps moved the weights
    assert len(runs[True][0]) == 6 and runs[True][0] == pytest.approx(runs[False][0], rel=1e-5)
    for k, v in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][k], v, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc")
def test_kept_freed_memory_is_reused_without_page_faults():
    """After ``keep_freed_memory`` (what the trainer calls on a CPU) a freed 47 MB buffer, the size of MiniLM's
    embedding gradient, comes back without faulting its pages in again, once the heap has grown to hold it (one
    or two rounds); by default every round faults it in afresh."""
    script = """
import resource, sys, torch
from lsr_run.train import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
faults = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buffer = torch.zeros(30522, 384)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    del buffer
print(sum(faults[-4:]))
"""
    faults = {mode: int(subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True,
                                       check=True).stdout.split()[-1]) for mode in ("default", "keep")}
    assert faults["default"] >= 4  # faulted in again each round (11,446 faults a round with 4 KB pages)
    assert faults["keep"] < faults["default"] / 10


@pytest.mark.process  # inductor compiles in worker processes, about a minute on 2 CPU cores
def test_compiled_encoder_trains_as_the_eager_one(tmp_path):
    """``train.compile``: the same logged losses and final weights as eager training, within float reordering;
    the weights keep their names (checkpoints and saved models are unchanged)."""
    from lsr_run.losses import InfoNCE

    from torch._dynamo.utils import counters

    runs = {}
    counters.clear()
    for compiled in (False, True):
        trainer = _trainer(tmp_path / str(compiled), InfoNCE(), compile=compiled, dropout=0.0, max_steps=3)
        assert trainer.train()["steps"] == 3
        assert (counters["stats"]["unique_graphs"] > 0) == compiled  # compiled graphs ran, and only then
        log = [json.loads(line) for line in trainer.run.train_log.read_text().splitlines()]
        runs[compiled] = ([entry["loss"] for entry in log], trainer.encoder.state_dict())
    (eager, eager_weights), (compiled, compiled_weights) = runs[False], runs[True]
    assert list(compiled_weights) == list(eager_weights)
    assert compiled == pytest.approx(eager, rel=1e-4, abs=1e-5)
    for name, value in eager_weights.items():
        torch.testing.assert_close(compiled_weights[name], value, rtol=1e-3, atol=1e-5)


def test_step_statistics_reach_the_host_in_one_copy():
    """``to_host``: tensors and plain numbers by name -> the floats ``float()`` gives each, in their order."""
    from lsr_run.train import to_host

    values = {"a": torch.tensor(1.5), "n": 3, "b": torch.tensor([[2.25]]), "c": torch.tensor(7, dtype=torch.int64),
              "x": 0.125}
    out = to_host(values)
    assert list(out) == list(values) and out == {k: float(v) for k, v in values.items()}
    assert all(type(v) is float for v in out.values())


def test_nonfinite_loss_skipped_and_counted(tmp_path):
    result = _trainer(tmp_path, _NaNAt({2, 4}), nonfinite="skip").train()
    assert result["steps"] == 6 and result["nonfinite_steps"] == 2 and result["collapsed"] is False


def test_nonfinite_loss_stops_when_asked(tmp_path):
    result = _trainer(tmp_path, _NaNAt({3}), nonfinite="stop").train()
    assert result["collapsed"] is True and result["step"] == 2 and "non-finite" in result["reason"]
    assert (tmp_path / "run" / "checkpoints" / "last.pt").exists()


def test_collapse_fires_on_synthetic_collapse_not_on_healthy_run(tmp_path):
    from lsr_run.losses import InfoNCE

    healthy = _trainer(tmp_path / "a", InfoNCE(), collapse={"check_every": 1, "patience": 2}).train()
    assert healthy["collapsed"] is False and healthy["steps"] == 6
    assert 1 <= healthy["last"]["doc_terms"] < 0.5 * 30522
    t = _trainer(tmp_path / "b", InfoNCE(), collapse={"check_every": 1, "patience": 3})
    for _ in range(2):
        t._check_collapse(q_terms=t.vocab * 0.9, d_terms=t.vocab * 0.95)
    assert t.collapsed is None  # below patience
    t._check_collapse(q_terms=t.vocab * 0.9, d_terms=t.vocab * 0.95)
    assert t.collapsed["reason"] == "vectors nearly all active"
    t2 = _trainer(tmp_path / "c", InfoNCE(), collapse={"check_every": 1, "patience": 1})
    t2._check_collapse(q_terms=0.0, d_terms=12.0)
    assert t2.collapsed["reason"] == "vectors all zero"
    # a whole run whose vectors are "too dense" by a strict threshold stops, keeps its checkpoint
    strict = _trainer(tmp_path / "d", InfoNCE(), collapse={"check_every": 1, "patience": 2, "dense_fraction": 1e-6})
    out = strict.train()
    assert out["collapsed"] is True and out["step"] == 2
    assert (tmp_path / "d" / "run" / "checkpoints" / "last.pt").exists()


@pytest.mark.process
def test_collapsed_run_records_step_in_status_and_keeps_checkpoint(toy, tmp_path):
    run_dir = tmp_path / "collapsing"
    proc = cli(toy_overrides(toy, steps=6) + ["train.collapse.check_every=1", "train.collapse.patience=2",
                                              "train.collapse.dense_fraction=1e-6", f"hydra.run.dir={run_dir}"],
               {"LSR_DATA_DIR": str(toy["data"])})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "training collapsed at step 2" in proc.stderr
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "done" and status["collapsed"] is True and status["collapse"]["step"] == 2
    assert json.loads((run_dir / "metrics.json").read_text()) == {"toytest": {"scored": False}}
    assert (run_dir / "checkpoints" / "last.pt").exists()
