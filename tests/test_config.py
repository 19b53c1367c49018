"""Every option of every config group composes, and its _target_ builds; experiments compose too."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lsr_run.models.backbone import BackboneSpec
from lsr_run.components import EvalDataset, structured
from lsr_run.train import TrainSpec

from conftest import CONF_DIR

GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name not in ("hydra", "sweep"))
INSTANTIATED = {"head_scaling", "sampling", "teacher", "loss", "regularizer", "index", "candidates"}
REQUIRED_PATHS = {("teacher", "file"): ["teacher.path=/x.tsv"], ("candidates", "run_file"): ["candidates.path=/x"],
                  ("candidates", "teacher_file"): ["candidates.path=/x"]}


def options():
    for group in GROUPS:
        for f in sorted((CONF_DIR / group).glob("*.yaml")):
            yield group, f.stem


def _compose(overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="run", overrides=overrides, return_hydra_config=True)


@pytest.mark.exhaustive
@pytest.mark.parametrize("group,option", list(options()))
def test_every_option_composes(group, option):
    if group in ("experiment", "debug"):  # presets in the global package
        overrides = [f"{group}={option}"]
    else:
        overrides = [f"{group}={option}"] + REQUIRED_PATHS.get((group, option), [])
    cfg = _compose(overrides)
    node = cfg[group] if group not in ("experiment", "debug") else cfg
    if group in INSTANTIATED:
        obj = instantiate(node)
        assert type(obj).__name__ == str(node._target_).rsplit(".", 1)[1]  # the class the config names
    structured(BackboneSpec, cfg.backbone, "backbone")
    structured(TrainSpec, cfg.train, "train")
    for key, ds in cfg.eval.datasets.items():
        structured(EvalDataset, ds, f"eval.datasets.{key}")


def test_unknown_key_and_bad_type_are_named():
    from lsr_run.errors import ConfigError

    cfg = _compose([])
    OmegaConf.set_struct(cfg, False)
    cfg.train.lrr = 1.0
    with pytest.raises(ConfigError, match="train.*Key 'lrr' not in 'TrainSpec'"):
        structured(TrainSpec, cfg.train, "train")
    cfg = _compose(["train.lr=fast"])
    with pytest.raises(ConfigError, match="train.lr: Value 'fast'"):
        structured(TrainSpec, cfg.train, "train")


def test_unknown_group_option_lists_valid_ones():
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException) as err:
        _compose(["sampling=hardest"])
    assert "stratified" in str(err.value) and "topk" in str(err.value)


def test_lengths_and_precision_have_one_home_in_encode():
    """train.* lengths and bf16 follow encode.* unless a recipe sets its own (the demo's 192-token documents)."""
    cfg = _compose(["encode.doc_max_length=128", "encode.query_max_length=32", "encode.bf16=false"])
    spec = structured(TrainSpec, cfg.train, "train")
    assert (spec.doc_max_length, spec.query_max_length, str(spec.bf16).lower()) == (128, 32, "false")
    demo = _compose(["experiment=demo", "encode.doc_max_length=128"])
    assert structured(TrainSpec, demo.train, "train").doc_max_length == 192  # the recipe's own value stays
    assert structured(TrainSpec, demo.train, "train").query_max_length == demo.encode.query_max_length


SWEEPS = sorted(CONF_DIR.glob("sweep/*.yaml"))


@pytest.mark.exhaustive
@pytest.mark.parametrize("sweep", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_every_run_of_every_sweep_composes_and_builds(sweep, monkeypatch):
    """Every override of conf/sweep/*.yaml composes in a run of its sweep, and that run's sampler, candidates,
    teacher, loss and head scaling build (a typo in a run's overrides fails here, not hours into a sweep)."""
    from lsr_run.sweep import plan

    monkeypatch.setenv("REF_NORM", "190.3")
    runs = plan(sweep, out=Path("outputs/tables/x"))
    assert runs and len({r.name for r in runs}) == len(runs)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        seen: set[str] = set()
        for run in plan(sweep, seeds=[1], out=Path("outputs/tables/x")):  # seeds add only seed=N
            if set(run.overrides) <= seen:
                continue  # every override of this run was composed already (a grid crosses them)
            seen |= set(run.overrides)
            cfg = compose(config_name="run", overrides=run.overrides)
            for group in ("sampling", "candidates", "teacher", "loss", "head_scaling", "regularizer"):
                obj = instantiate(cfg[group])
                assert type(obj).__name__ == str(cfg[group]._target_).rsplit(".", 1)[1], (run.name, group)
            structured(TrainSpec, cfg.train, "train")
            assert run.name.endswith("_s1") and cfg.seed == 1


def test_a_sweep_runs_a_subset_of_its_runs_and_seeds():
    from lsr_run.errors import ConfigError
    from lsr_run.sweep import plan

    sweep = CONF_DIR / "sweep" / "sampling_cpu.yaml"
    names = [r.name for r in plan(sweep, only=["stratified"], seeds=[7])]
    assert names == ["stratified_kl_div_s7", "stratified_margin_mse_s7"]
    assert len(plan(sweep)) == 18
    with pytest.raises(ConfigError, match="--runs hard: not in .*its runs: topk, random, stratified"):
        plan(sweep, only=["hard"])


def test_a_sweep_run_can_evaluate_the_model_of_an_earlier_run_of_its_seed(tmp_path):
    from lsr_run.errors import ConfigError
    from lsr_run.sweep import plan

    sweep = CONF_DIR / "sweep" / "ood_prune_cpu.yaml"
    runs = plan(sweep, out=tmp_path, seeds=[1, 42])
    names = [r.name for r in runs]
    assert names[:2] == ["demo_s1", "demo_s42"]  # every seed of the trained run first
    pruned = runs[names.index("doc_top256_s42")].overrides
    assert f"model.path={tmp_path}/demo_s42/model" in pruned and "encode.doc_top_k=256" in pruned
    assert "seed=42" in pruned and not any("{" in o for o in pruned)
    with pytest.raises(ConfigError, match="run doc_top1024_s1: 'model.path={out}/demo_s{seed}/model' names {out}, "
                                          "but the sweep has no output folder"):
        plan(sweep, seeds=[1])


def test_false_switches_off_whatever_form_it_reaches_the_code_in():
    """``bf16=false`` from the command line reaches a ``str`` field as "False" (bool("False") is True): it must
    switch bf16 off on every device; a value other than auto/true/false is refused with its key."""
    import torch

    from lsr_run.encoding import EncodeSpec
    from lsr_run.errors import ConfigError
    from lsr_run.models.splade import resolve_bf16, switch

    cfg = _compose(["train.bf16=false", "encode.bf16=false", "train.prefetch=false"])
    train = structured(TrainSpec, cfg.train, "train")
    encode = structured(EncodeSpec, cfg.encode, "encode")
    for device in ("cpu", "cuda"):
        assert resolve_bf16(train.bf16, torch.device(device)) is False
        assert resolve_bf16(encode.bf16, torch.device(device)) is False
        assert switch(train.prefetch, True) is False
    cfg = _compose(["train.bf16=true", "train.prefetch=true"])
    train = structured(TrainSpec, cfg.train, "train")
    assert resolve_bf16(train.bf16, torch.device("cpu")) is True and switch(train.prefetch, False) is True
    assert switch("auto", True) is True and switch(None, False) is False
    with pytest.raises(ConfigError, match="train.bf16=yes: allowed auto, true, false"):
        structured(TrainSpec, _compose(["train.bf16=yes"]).train, "train").validate()
    with pytest.raises(ConfigError, match="encode.bf16=on: allowed auto, true, false"):
        structured(EncodeSpec, _compose(["encode.bf16=on"]).encode, "encode")


def test_inspect_options_are_composed_from_the_head_scaling_group():
    """inspect's options are the head_scaling group's files (plus the variant each names), so they follow them;
    and they are a report's settings, not part of a run's identity."""
    from lsr_run.pipeline import _identity

    cfg = _compose([])
    constant = OmegaConf.to_container(_compose(["head_scaling=constant"]).head_scaling)
    assert OmegaConf.to_container(cfg.inspect.scalings.k16_weight) == constant
    assert OmegaConf.to_container(cfg.inspect.scalings.k16_weight_bias) == {**constant, "target": "weight_and_bias"}
    assert OmegaConf.to_container(cfg.inspect.scalings.k16_keep_tie) == {**constant, "tie": "keep"}
    assert OmegaConf.to_container(cfg.inspect.scalings.none) == OmegaConf.to_container(cfg.head_scaling)
    for scaling in cfg.inspect.scalings.values():
        instantiate(scaling)
    def identity(overrides):
        composed = OmegaConf.to_container(_compose(["run_name=x", *overrides]), resolve=False)
        composed.pop("hydra")
        return _identity(OmegaConf.create(composed))

    assert identity(["inspect.scalings.k16_weight.k=8"]) == identity([]) != identity(["head_scaling=constant"])
