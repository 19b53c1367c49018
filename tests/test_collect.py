"""Collecting run directories into tables, significance marks, and checks against expected numbers.

Run directories are built by hand in tmp_path (metrics.json, runs/*.trec, per_query/*.json, .hydra/), with
per-query values from the real evaluator on a tiny BEIR-layout dataset; no Java, no model.
"""

from __future__ import annotations

import csv
import io
import json
import runpy
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from lsr_run.collect import (BETTER, CELL_FAIL, CELL_OK, CELL_SKIP, WORSE, build_table, check_expected,
                             expected_passed, load_records, paired_test, to_csv, to_latex, to_markdown,
                             write_outputs)
from lsr_run.data import load_dataset, read_trec_run, write_trec_run
from lsr_run.errors import LsrError
from lsr_run.evaluation import evaluate_run

from conftest import CONF_DIR, ROOT, write_beir

QUERIES = 30
DATASET = "tiny"


@pytest.fixture
def tiny_dataset(tmp_path) -> Path:
    """30 queries, each with one relevant document among 60."""
    docs = {f"d{i}": (f"title {i}", f"text of document {i}") for i in range(60)}
    queries = {f"q{i}": f"query {i}" for i in range(QUERIES)}
    qrels = {f"q{i}": {f"d{i}": 1} for i in range(QUERIES)}
    return write_beir(tmp_path / "data" / DATASET, docs, queries, qrels)


def ranking(relevant_rank: int, qid: int) -> list[tuple[str, float]]:
    """10 hits with query i's relevant document d{i} at ``relevant_rank`` (1-based; 0: absent)."""
    others = [f"d{(qid + k) % 60}" for k in range(30, 40)]
    hits = others[:9] if relevant_rank else others
    if relevant_rank:
        hits.insert(relevant_rank - 1, f"d{qid}")
    return [(doc, float(10 - r)) for r, doc in enumerate(hits)]


def make_run(root: Path, overrides: list[str] | None, ranks: dict[int, int] | None = None,
             dataset_dir: Path | None = None, config: dict | None = None, collapsed: bool | None = None,
             failed: str | None = None, choices: dict | None = None, stored_metrics=("ndcg@10", "mrr@10"),
             extra_metrics: dict | None = None) -> Path:
    """A run directory; ``ranks`` (query index -> rank of its relevant document) produces runs/, per_query/ and
    metrics.json through the real evaluator."""
    root.mkdir(parents=True)
    if overrides is not None:
        (root / ".hydra").mkdir()
        (root / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
        (root / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(
            {"hydra": {"runtime": {"choices": {"experiment": None, "hydra/launcher": "basic", **(choices or {})}}}}))
    config = dict(config or {})
    if dataset_dir is not None:
        config.setdefault("eval", {})["datasets"] = {DATASET: {"name": DATASET, "split": "test",
                                                               "path": str(dataset_dir)}}
    (root / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    if failed is not None:
        (root / "failed.json").write_text(json.dumps({"error": failed, "type": "DataError"}))
    if ranks is not None:
        run = {f"q{i}": ranking(r, i) for i, r in ranks.items()}
        write_trec_run(root / "runs" / f"{DATASET}.trec", run)
        qrels = {f"q{i}": {f"d{i}": 1} for i in range(QUERIES)}
        means, per_query = evaluate_run(qrels, {q: dict(h) for q, h in run.items()}, list(stored_metrics))
        (root / "per_query").mkdir()
        (root / "per_query" / f"{DATASET}.json").write_text(json.dumps(per_query))
        metrics = {DATASET: {**means, "query_terms": 12.0, "doc_terms": 80.0, "queries": len(per_query)},
                   **(extra_metrics or {})}
        if collapsed is not None:
            metrics["collapsed"] = collapsed
        (root / "metrics.json").write_text(json.dumps(metrics))
    return root


GOOD = {i: 1 for i in range(QUERIES)}  # relevant document first for every query
POOR = {i: 2 + i % 5 for i in range(QUERIES)}  # relevant document second to sixth


# ---------------------------------------------------------------- labels and rows

def test_sweep_rows_are_labelled_by_the_overrides_that_differ(tmp_path, tiny_dataset):
    sweep = tmp_path / "sweep"
    make_run(sweep / "0", ["experiment=bm25", "index.k1=0.9"], POOR, tiny_dataset)
    make_run(sweep / "1", ["experiment=bm25", "index.k1=1.2"], GOOD, tiny_dataset)
    make_run(sweep / "10", ["experiment=bm25"], POOR, tiny_dataset, config={"index": {"k1": 0.5}})
    (sweep / "multirun.yaml").write_text("{}")
    records = load_records([sweep])
    # job folders in numeric order; a run without the override shows its resolved config value
    assert [r.path.name for r in records] == ["0", "1", "10"]
    assert [r.label for r in records] == ["index.k1=0.9", "index.k1=1.2", "index.k1=0.5"]


def test_group_choices_label_runs_that_did_not_override_them(tmp_path, tiny_dataset):
    a = make_run(tmp_path / "a", ["experiment=demo"], POOR, tiny_dataset, choices={"experiment": "demo",
                                                                                  "sampling": "random"})
    b = make_run(tmp_path / "b", ["experiment=demo", "sampling=topk"], GOOD, tiny_dataset,
                 choices={"experiment": "demo", "sampling": "topk"})
    assert [r.label for r in load_records([a, b])] == ["sampling=random", "sampling=topk"]


def test_runs_without_overrides_are_labelled_by_differing_config_keys(tmp_path, tiny_dataset):
    shared = {"seed": 1, "train": {"lr": 3e-5, "max_steps": 100}}
    a = make_run(tmp_path / "a", None, POOR, tiny_dataset,
                 config={**shared, "sampling": {"_target_": "lsr_run.sampling.RandomSampler", "num_negatives": 3}})
    b = make_run(tmp_path / "b", None, GOOD, tiny_dataset,
                 config={**shared, "train": {"lr": 1e-4, "max_steps": 100}, "expected": {"tolerance": 0.1},
                         "sampling": {"_target_": "lsr_run.sampling.TopKSampler", "k": 5, "num_negatives": 3}})
    labels = [r.label for r in load_records([a, b])]
    # a swapped _target_ shows as the class; `expected` never labels a run; shared keys are left out
    assert labels == ["train.lr=3e-05 sampling=RandomSampler", "train.lr=0.0001 sampling=TopKSampler"]


def test_repeated_configs_get_distinct_labels_and_folder_labels_on_request(tmp_path, tiny_dataset):
    runs = [make_run(tmp_path / name, [f"seed={seed}"], POOR, tiny_dataset)
            for name, seed in (("first", 1), ("again", 1), ("other", 2))]
    assert [r.label for r in load_records(runs)] == ["seed=1 [first]", "seed=1 [again]", "seed=2"]
    assert [r.label for r in load_records(runs, label_from="folder")] == ["first", "again", "other"]
    # nothing differs: the folder names label the runs
    assert [r.label for r in load_records(runs[:2])] == ["first", "again"]


def test_failed_unfinished_and_collapsed_runs_are_rows_marked_so(tmp_path, tiny_dataset):
    sweep = tmp_path / "sweep"
    make_run(sweep / "0", ["sampling=random"], POOR, tiny_dataset, collapsed=False)
    make_run(sweep / "1", ["sampling=topk"], None, tiny_dataset, failed="no qrels for split dev")
    make_run(sweep / "2", ["sampling=stratified"], None, tiny_dataset)  # still running: no metrics.json
    make_run(sweep / "3", ["sampling=hard"], GOOD, tiny_dataset, collapsed=True)
    table = build_table(load_records([sweep]), baseline=0)
    assert [(r.label, r.status, r.collapsed) for r in table.rows] == [
        ("sampling=random", "ok", False), ("sampling=topk", "failed", None),
        ("sampling=stratified", "no metrics", None), ("sampling=hard", "ok", True)]
    assert table.rows[1].values[DATASET] is None and table.rows[3].values[DATASET] == pytest.approx(1.0)
    markdown = to_markdown(table)
    assert "failed (DataError: no qrels for split dev)" in markdown
    assert "| sampling=stratified | – | – | – | – | – | no metrics |" in markdown
    assert "| sampling=hard | **1.0000↑** | **1.0000** | 12.0 | 80.0 | yes | ok |" in markdown
    with pytest.raises(LsrError, match="has no results"):
        build_table(load_records([sweep]), baseline=1)


def test_a_run_that_succeeded_after_failing_counts_as_finished(tmp_path, tiny_dataset):
    import os

    run = make_run(tmp_path / "run", ["seed=1"], POOR, tiny_dataset, failed="out of memory")
    os.utime(run / "failed.json", (1_000_000, 1_000_000))  # the failure came first
    assert load_records([run])[0].status == "ok"
    os.utime(run / "metrics.json", (500_000, 500_000))
    assert load_records([run])[0].status == "failed"


def test_a_sweep_folder_without_runs_is_an_error(tmp_path):
    (tmp_path / "empty" / "collected").mkdir(parents=True)
    with pytest.raises(LsrError, match="neither a run directory"):
        load_records([tmp_path / "empty"])


# ---------------------------------------------------------------- significance

def test_clearly_better_run_is_marked_and_an_identical_one_is_not(tmp_path, tiny_dataset):
    base = make_run(tmp_path / "base", ["index=bm25"], POOR, tiny_dataset)
    better = make_run(tmp_path / "better", ["index=lucene_impact"], GOOD, tiny_dataset)
    same = make_run(tmp_path / "same", ["index=brute_force"], POOR, tiny_dataset)
    table = build_table(load_records([base, better, same]), baseline="index=bm25")
    assert table.baseline == 0
    assert table.rows[1].marks == {DATASET: BETTER} and table.rows[1].p_values[DATASET] < 1e-6
    assert table.rows[2].marks == {} and table.rows[2].p_values[DATASET] == 1.0
    assert "↑" in to_markdown(table).splitlines()[3] and "↑" not in to_markdown(table).splitlines()[4]
    # the other way round the better run is the baseline, and the poor one is marked worse
    table = build_table(load_records([base, better, same]), baseline="better")
    assert table.rows[0].marks == {DATASET: WORSE} and table.rows[2].marks == {DATASET: WORSE}


def test_a_dataset_the_baseline_lacks_is_noted_not_tested(tmp_path, tiny_dataset):
    base = make_run(tmp_path / "base", ["run=base"], POOR, tiny_dataset)
    other = make_run(tmp_path / "other", ["run=other"], GOOD, tiny_dataset,
                     extra_metrics={"adi": {"ndcg@10": 0.5}})
    table = build_table(load_records([base, other]), baseline=0)
    assert table.datasets == [DATASET, "adi"] and table.mean_over == [DATASET]
    assert table.rows[1].marks == {DATASET: BETTER}
    assert "adi: the baseline has no ndcg@10 for it; not tested." in to_markdown(table)
    rows = list(csv.DictReader(io.StringIO(to_csv(table))))
    assert rows[0][f"{DATASET} sig"] == "baseline" and rows[0]["adi sig"] == "" and rows[1]["adi sig"] == ""


def test_paired_test_is_the_two_sided_paired_t_test_over_common_queries():
    from scipy.stats import ttest_rel

    control = {f"q{i}": 0.1 * (i % 3) for i in range(20)}
    treatment = {f"q{i}": 0.1 * (i % 3) + (0.5 if i < 4 else 0.0) for i in range(20)}
    treatment["unpaired"] = 1.0  # a query the control did not score is left out
    queries = sorted(control)
    p = paired_test(control, treatment)
    assert p == pytest.approx(ttest_rel([control[q] for q in queries], [treatment[q] for q in queries]).pvalue)
    assert 0.025 < p < 0.05
    assert paired_test(control, dict(control)) == 1.0
    assert paired_test({"q1": 0.5}, {"q1": 1.0}) is None


def test_bonferroni_removes_a_mark_that_only_passes_uncorrected(tmp_path, tiny_dataset):
    ranks_base = {i: 0 for i in range(QUERIES)}  # relevant document never retrieved
    ranks_some = {i: (1 if i < 4 else 0) for i in range(QUERIES)}  # found first for 4 of 30 queries
    base = make_run(tmp_path / "base", ["run=base"], ranks_base, tiny_dataset)
    some = make_run(tmp_path / "some", ["run=some"], ranks_some, tiny_dataset)
    copy = make_run(tmp_path / "copy", ["run=copy"], ranks_base, tiny_dataset)
    records = load_records([base, some, copy])
    plain = build_table(records, baseline=0)
    p = plain.rows[1].p_values[DATASET]
    assert 0.025 < p < 0.05 and plain.rows[1].marks == {DATASET: BETTER}
    corrected = build_table(records, baseline=0, bonferroni=True)
    assert corrected.rows[1].marks == {} and "Bonferroni" in to_markdown(corrected)


def test_metric_missing_from_stored_files_is_recomputed_from_run_files_on_request(tmp_path, tiny_dataset):
    base = make_run(tmp_path / "base", ["run=base"], POOR, tiny_dataset)
    better = make_run(tmp_path / "better", ["run=better"], GOOD, tiny_dataset)
    records = load_records([base, better])
    table = build_table(records, metric="recall@3", baseline=0)
    assert table.rows[0].values[DATASET] is None and table.rows[1].marks == {}
    table = build_table(records, metric="recall@3", baseline=0, recompute=True)
    ds = load_dataset(DATASET, "test", path=str(tiny_dataset))
    for row, ranks in zip(table.rows, (POOR, GOOD)):
        expected, _ = evaluate_run(ds.qrels, {f"q{i}": dict(ranking(r, i)) for i, r in ranks.items()}, ["recall@3"])
        assert row.values[DATASET] == pytest.approx(expected["recall@3"])
    assert table.rows[0].values[DATASET] == pytest.approx(0.4)  # ranks 2 and 3 of 2..6
    assert table.rows[1].marks == {DATASET: BETTER}


def test_baselines_inside_runs_become_one_row_each(tmp_path, tiny_dataset):
    sweep = tmp_path / "sweep"
    for job, ranks in (("0", GOOD), ("1", GOOD)):
        run = make_run(sweep / job, [f"seed={job}"], ranks, tiny_dataset)
        bm25 = run / "baselines" / "bm25"
        bm25.mkdir(parents=True)
        evaluated = make_run(tmp_path / f"bm25-{job}", None, POOR, tiny_dataset)
        for name in ("metrics.json", "per_query", "runs"):  # what the pipeline writes for a baseline
            (evaluated / name).rename(bm25 / name)
    records = load_records([sweep], include_baselines=True)
    # the same BM25 result in both jobs: one row, first, labelled by its name
    assert [r.label for r in records] == ["bm25", "seed=0", "seed=1"]
    table = build_table(records, baseline="bm25")
    assert table.rows[1].marks == {DATASET: BETTER} and table.rows[2].marks == {DATASET: BETTER}
    assert [r.label for r in load_records([sweep])] == ["seed=0", "seed=1"]


# ---------------------------------------------------------------- outputs

def test_markdown_csv_latex_and_chart_are_written(tmp_path, tiny_dataset):
    base = make_run(tmp_path / "base", ["loss=infonce"], POOR, tiny_dataset)
    better = make_run(tmp_path / "better", ["loss=kl_div"], GOOD, tiny_dataset)
    (better / "sampling_stats.json").write_text(json.dumps({"teacher_entropy": 1.25, "sampler": "TopKSampler"}))
    broken = make_run(tmp_path / "broken", ["loss=margin_mse"], None, tiny_dataset, failed="bad & 50%_rate")
    (base / "init_report.json").write_text(json.dumps({"head": {"row_norm_mean": 1.066, "decoder_frobenius": 190.3}}))
    table = build_table(load_records([base, better, broken]), baseline=0,
                        extras=["sampling_stats", "init_report:head.row_norm_mean"])
    paths = write_outputs(table, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["table.csv", "table.md", "table.png",
                                                                    "table.tex"]
    assert paths["markdown"].read_text() == to_markdown(table)
    assert paths["chart"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    rows = list(csv.DictReader(io.StringIO(paths["csv"].read_text())))
    assert [r["run"] for r in rows] == ["loss=infonce", "loss=kl_div", "loss=margin_mse"]
    assert rows[0][f"{DATASET} sig"] == "baseline" and rows[1][f"{DATASET} sig"] == BETTER
    assert float(rows[1][DATASET]) == pytest.approx(1.0) and float(rows[1][f"{DATASET} p"]) < 0.05
    assert rows[1]["teacher_entropy"] == "1.25" and rows[0]["teacher_entropy"] == ""
    assert rows[0]["head.row_norm_mean"] == "1.066" and rows[1]["head.row_norm_mean"] == ""  # a nested key
    assert rows[2]["status"] == "failed (DataError: bad & 50%_rate)" and rows[2][DATASET] == ""

    latex = paths["latex"].read_text()
    assert latex == to_latex(table)
    assert r"\toprule" in latex and r"\bottomrule" in latex
    assert r"\textbf{1.000}$^{\uparrow}$" in latex
    assert r"loss=margin\_mse (failed)" in latex and "50%_rate" not in latex
    header = next(line for line in latex.splitlines() if line.startswith("Run &"))
    spec = next(line for line in latex.splitlines() if line.startswith(r"\begin{tabular}"))
    assert header.count("&") + 1 == len(spec[len(r"\begin{tabular}{"):-1])  # one alignment per column
    assert to_csv(table) == paths["csv"].read_text()


def test_collect_cli_writes_next_to_a_single_sweep(tmp_path, tiny_dataset, capsys):
    sweep = tmp_path / "sweep"
    make_run(sweep / "0", ["regularizer=none"], POOR, tiny_dataset, config={"regularizer": "none"})
    make_run(sweep / "1", ["regularizer=flops"], GOOD, tiny_dataset, config={"regularizer": "flops"})
    cli = runpy.run_path(str(ROOT / "scripts" / "collect.py"), run_name="collect")
    assert cli["main"]([str(sweep), "--baseline", "0", "--metric", "mrr@10"]) == 0
    out = capsys.readouterr().out
    assert "| regularizer=flops | **1.0000↑** |" in out
    assert (sweep / "collected" / "table.md").exists()
    source = (sweep / "collected" / "source.md").read_text()  # the command, the commit, the runs' commits
    assert f"`scripts/collect.py {sweep} --baseline 0 --metric mrr@10`" in source
    assert "- Collected at commit " in source and "- 2 run directories, made at commit(s): unknown." in source
    (sweep / "1" / "meta.json").write_text(json.dumps({"git": {"sha": "0123456789abcdef", "dirty": False},
                                                       "hardware": {"cpu": "AMD EPYC", "cpus": 2}}))
    assert cli["main"]([str(sweep), "--seeds"]) == 0
    source = (sweep / "collected" / "source.md").read_text()
    assert "made at commit(s): unknown, 0123456789ab." in source and "AMD EPYC, 2 cores" in source
    (sweep / "0" / "meta.json").write_text(json.dumps({"hardware": {  # CPUs that share a name differ by generation
        "cpu": "AMD EPYC", "cpus": 2, "cpu_family": "26", "cpu_model_number": "2",
        "cpu_features": ["avx2", "avx512f", "avx512_bf16"]}}))
    assert cli["main"]([str(sweep), "--seeds"]) == 0
    source = (sweep / "collected" / "source.md").read_text()
    assert "AMD EPYC (family 26 model 2; avx2, avx512f, avx512_bf16), 2 cores; AMD EPYC, 2 cores" in source
    assert "| 1 |" in (sweep / "collected" / "table.md").read_text()  # one seed each: no caption about seeds
    assert "A row of several seeds" not in (sweep / "collected" / "table.md").read_text()
    assert cli["main"]([str(sweep), str(sweep / "0")]) == 2  # several paths need --out
    assert cli["main"]([str(sweep), "--baseline", "nope"]) == 2


def test_run_meta_names_the_cpu_generation_and_its_bf16_features(tmp_path):
    from lsr_run.run_dir import cpu_details, describe_cpu

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n"
                    "model name\t: AMD EPYC\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 avx512vl\n\n"
                    "processor\t: 1\ncpu family\t: 99\n")
    details = cpu_details(str(info))
    assert details == {"cpu_family": "25", "cpu_model_number": "17", "cpu_features": ["avx2", "avx512f", "avx512_bf16"]}
    assert describe_cpu({"cpu": "AMD EPYC", **details}) == "AMD EPYC (family 25 model 17; avx2, avx512f, avx512_bf16)"
    info.write_text("processor\t: 0\nmodel name\t: Neoverse\n")  # no x86 family: nothing to add
    assert cpu_details(str(info)) == {} and cpu_details(str(tmp_path / "absent")) == {}
    assert describe_cpu({"cpu": "AMD EPYC", "cpu_family": "23", "cpu_model_number": "49", "cpu_features": []}) == \
        "AMD EPYC (family 23 model 49; none of avx2, avx512f, avx512_bf16, amx_bf16)"


# ---------------------------------------------------------------- expected numbers

def expected_spec(**datasets) -> dict:
    return {"tolerance": 0.01, "datasets": datasets}


def test_check_expected_ok_fail_skip(tmp_path, tiny_dataset):
    run = make_run(tmp_path / "run", ["experiment=bm25"], POOR, tiny_dataset)
    actual = json.loads((run / "metrics.json").read_text())[DATASET]
    cells = check_expected(run, expected_spec(
        tiny={"mrr@10": actual["mrr@10"] + 0.005, "ndcg@10": {"value": actual["ndcg@10"] + 0.002, "tolerance": 0.001},
              "map": 0.2},
        scifact={"ndcg@10": 0.6789}))
    assert [(c.dataset, c.metric, c.status) for c in cells] == [
        ("tiny", "mrr@10", CELL_OK), ("tiny", "ndcg@10", CELL_FAIL), ("tiny", "map", CELL_FAIL),
        ("scifact", "ndcg@10", CELL_SKIP)]
    assert cells[2].reason == "missing from metrics.json"
    assert cells[0].line().startswith("[OK]   tiny") and cells[1].line().startswith("[FAIL] tiny")
    assert not expected_passed(cells)
    assert expected_passed(cells[:1] + cells[3:])
    assert not expected_passed(cells[3:])  # nothing checked is not a pass


def test_check_expected_fails_every_cell_of_a_failed_run(tmp_path, tiny_dataset):
    run = make_run(tmp_path / "run", ["experiment=bm25"], None, tiny_dataset, failed="index missing")
    cells = check_expected(run, expected_spec(tiny={"ndcg@10": 0.5}))
    assert [c.status for c in cells] == [CELL_FAIL] and "index missing" in cells[0].reason


def test_check_expected_cli_reads_a_preset_or_the_run_config(tmp_path, tiny_dataset, capsys):
    run = make_run(tmp_path / "run", ["experiment=bm25"], POOR, tiny_dataset)
    mrr = json.loads((run / "metrics.json").read_text())[DATASET]["mrr@10"]
    preset = tmp_path / "preset.yaml"
    preset.write_text(yaml.safe_dump({"run_name": "x", "expected": {"source": "test", "tolerance": 0.001,
                                                                    "datasets": {"tiny": {"mrr@10": mrr}}}}))
    cli = runpy.run_path(str(ROOT / "scripts" / "check_expected.py"), run_name="check_expected")
    assert cli["main"]([str(run), str(preset)]) == 0
    assert "[OK]   tiny" in capsys.readouterr().out
    preset.write_text(yaml.safe_dump({"expected": {"datasets": {"tiny": {"mrr@10": mrr + 0.1}}}}))
    assert cli["main"]([str(run), str(preset)]) == 1
    assert "[FAIL] tiny" in capsys.readouterr().out
    assert cli["main"]([str(run)]) == 2  # the run's config.yaml holds no expected numbers
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["expected"] = {"datasets": {"tiny": {"mrr@10": mrr}}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    assert cli["main"]([str(run)]) == 0


# ---------------------------------------------------------------- the suites and presets tables come from

def _compose(overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="run", overrides=overrides)


def test_several_eval_suites_merge_their_datasets():
    cfg = _compose(["eval=[beir13,trec_dl,msmarco_dev]"])
    assert list(cfg.eval.datasets)[:3] == ["trec-covid", "nfcorpus", "nq"]
    assert {"dl19", "dl20", "msmarco-dev", "quora"} <= set(cfg.eval.datasets) and len(cfg.eval.datasets) == 16
    assert {k for k, d in cfg.eval.datasets.items() if d.remove_self_hits} == {"arguana", "quora"}
    assert list(cfg.eval.datasets.dl19.metrics) == ["ndcg@10", "map-l2", "recall@1000-l2"]
    assert set(_compose(["eval=local_all"]).eval.datasets) == {"scifact", "cranfield", "cisi", "adi"}
    assert set(_compose(["eval=beir_small"]).eval.datasets) <= set(_compose(["eval=beir13"]).eval.datasets)


@pytest.mark.parametrize("preset", sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")
                                          if "expected:" in p.read_text()))
def test_expected_numbers_name_datasets_and_metrics_their_preset_evaluates(preset):
    cfg = _compose([f"experiment={preset}"])
    for dataset, metrics in cfg.expected.datasets.items():
        assert dataset in cfg.eval.datasets, f"{preset}: expected numbers for {dataset}, which it does not evaluate"
        evaluated = cfg.eval.datasets[dataset].get("metrics") or cfg.eval.metrics
        assert set(metrics) <= set(evaluated), f"{preset}: {dataset} is not scored on {set(metrics) - set(evaluated)}"


# ---------------------------------------------------------------- a sweep's failure record


def _failing_sweep(tmp_path, monkeypatch):
    import subprocess

    from lsr_run import sweep

    spec = tmp_path / "sweep.yaml"
    spec.write_text("base: [debug=default]\nruns:\n  broken: [train.lr=1]\n")
    monkeypatch.setattr(sweep.subprocess, "run", lambda cmd, env: subprocess.CompletedProcess(cmd, 3))
    return lambda: sweep.launch(spec, tmp_path / "out")


@pytest.mark.process
def test_a_failed_sweep_run_is_recorded_where_run_dir_says_and_collected(tmp_path, monkeypatch):
    from lsr_run.run_dir import RunDir

    # RunDir is the one home of the name: moved there, the sweep writes and collect reads the new name
    monkeypatch.setattr(RunDir, "failed", property(lambda self: self.root / "why-it-failed.json"))
    results = _failing_sweep(tmp_path, monkeypatch)()
    run = tmp_path / "out" / "broken"
    assert results[0]["status"] == "failed (exit 3)"
    assert sorted(p.name for p in run.iterdir()) == ["why-it-failed.json"]
    assert json.loads((run / "why-it-failed.json").read_text()) == {"error": "failed (exit 3)",
                                                                    "overrides": ["debug=default", "train.lr=1"]}
    (record,) = load_records([tmp_path / "out"])
    assert record.status == "failed" and "failed (exit 3)" in record.error


@pytest.mark.process
def test_a_failed_sweep_run_record_is_written_atomically(tmp_path, monkeypatch):
    import errno

    launch = _failing_sweep(tmp_path, monkeypatch)
    real_write_text = Path.write_text

    def half_then_disk_full(self, text, *args, **kwargs):  # the disk fills up in the middle of the file
        real_write_text(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_text", half_then_disk_full)
    with pytest.raises(LsrError, match="no space left"):
        launch()
    monkeypatch.undo()
    run = tmp_path / "out" / "broken"
    assert list(run.iterdir()) == []  # no half-written failed.json, no temporary file left behind


def test_seeds_of_one_config_become_one_row_with_std_tested_against_two_baselines(tmp_path, tiny_dataset):
    """``seeds=True``: runs differing only in ``seed`` are one row (mean ± sample std over the seeds; the test on
    per-query values averaged over the seeds), tested against top-K (a) and random (b) at once."""
    import statistics

    ranks = {"topk": lambda i, s: 2 + (i + s) % 5, "random": lambda i, s: 1 if (i + s) % 3 == 0 else 3,
             "stratified": lambda i, s: 1 if (i + s) % 10 else 2}
    sweep = tmp_path / "sweep"
    for name, rank in ranks.items():
        for seed in (1, 2, 3):
            failed = "killed" if (name, seed) == ("random", 3) else None
            make_run(sweep / f"{name}_s{seed}", [f"sampling={name}", f"seed={seed}"],
                     None if failed else {i: rank(i, seed) for i in range(QUERIES)}, tiny_dataset,
                     config={"sampling": {"name": name}, "seed": seed}, failed=failed)
    records = load_records([sweep], seeds=True)
    assert [r.label for r in records] == ["sampling=random", "sampling=stratified", "sampling=topk"]  # folder order
    RANDOM, STRAT, TOPK = 0, 1, 2
    table = build_table(records, baseline=["sampling=topk", "sampling=random"])
    assert table.baselines == [TOPK, RANDOM] and [r.seeds for r in table.rows] == ["2/3", "3", "3"]
    assert "random_s3: failed (DataError: killed)" in records[RANDOM].error

    per_seed = [json.loads((sweep / f"stratified_s{s}" / "metrics.json").read_text())[DATASET]["ndcg@10"]
                for s in (1, 2, 3)]
    strat = table.rows[STRAT]
    assert strat.values[DATASET] == pytest.approx(statistics.mean(per_seed))
    assert strat.stds[DATASET] == pytest.approx(statistics.stdev(per_seed))
    assert strat.mean == strat.values[DATASET] and strat.mean_std == pytest.approx(statistics.stdev(per_seed))
    two = [json.loads((sweep / f"random_s{s}" / "metrics.json").read_text())[DATASET]["ndcg@10"] for s in (1, 2)]
    assert table.rows[RANDOM].values[DATASET] == pytest.approx(statistics.mean(two))  # the failed seed is left out

    from lsr_run.collect import per_query_scores

    averaged = per_query_scores(records[STRAT], DATASET, "ndcg@10")
    members = [json.loads((sweep / f"stratified_s{s}" / "per_query" / f"{DATASET}.json").read_text())
               for s in (1, 2, 3)]
    assert averaged == pytest.approx({q: statistics.mean(m[q]["ndcg@10"] for m in members) for q in members[0]})
    topk = per_query_scores(records[TOPK], DATASET, "ndcg@10")
    assert strat.p_by[TOPK][DATASET] == pytest.approx(paired_test(topk, averaged))
    assert strat.marks_by == {TOPK: {DATASET: BETTER}, RANDOM: {DATASET: BETTER}} and strat.marks == {DATASET: BETTER}
    assert table.rows[TOPK].marks_by[RANDOM] == {DATASET: WORSE}  # top-K below random

    markdown = to_markdown(table)
    line = next(x for x in markdown.splitlines() if x.startswith("| sampling=stratified"))
    assert f"{strat.values[DATASET]:.4f} ± {strat.stds[DATASET]:.4f}↑a↑b" in line and "| 3 |" in line
    assert "sampling=topk (baseline a)" in markdown and "sampling=random (baseline b)" in markdown
    assert "A row of several seeds shows the mean over its seeds ± the sample standard deviation" in markdown
    assert "↑x/↓x: significantly better/worse than baseline x (a: 'sampling=topk', b: 'sampling=random')" in markdown
    rows = list(csv.DictReader(io.StringIO(to_csv(table))))
    assert rows[STRAT]["seeds"] == "3" and float(rows[STRAT][f"{DATASET} std"]) == pytest.approx(strat.stds[DATASET])
    assert rows[STRAT][f"{DATASET} sig"] == BETTER and rows[STRAT][f"{DATASET} sig (b)"] == BETTER
    assert rows[TOPK][f"{DATASET} sig"] == "baseline" and rows[RANDOM][f"{DATASET} sig (b)"] == "baseline"
    assert rows[STRAT]["path"] == "; ".join(str(sweep / f"stratified_s{s}") for s in (1, 2, 3))
    latex = to_latex(table)
    assert r"$\pm$" in latex and r"$^{\uparrow a\uparrow b}$" in latex
    write_outputs(table, tmp_path / "out")  # the chart draws the standard deviations as error bars
    assert (tmp_path / "out" / "table.png").stat().st_size > 0
    # without seeds=True every run is its own row, labelled with its seed
    assert len(load_records([sweep])) == 9


def test_a_seed_run_recorded_with_keys_added_later_at_their_defaults_joins_its_row(tmp_path, tiny_dataset):
    """A config key added after some seeds ran (``provenance.INERT_DEFAULTS``) neither splits a seed row nor labels
    it while it holds its default; set to anything else, it is a different config."""
    sweep = tmp_path / "sweep"
    old = {"head_scaling": {"name": "constant"}, "train": {"lr": 2e-5}}
    new = {"head_scaling": {"name": "constant"}, "train": {"lr": 2e-5, "compile": False},
           "encode": {"max_tokens": None, "weights": None}}
    for seed, config in ((1, old), (2, old), (3, new)):
        make_run(sweep / f"k16_s{seed}", None, GOOD, tiny_dataset, config={**config, "seed": seed})
    make_run(sweep / "k16bf_s1", None, GOOD, tiny_dataset,
             config={**new, "encode": {"max_tokens": None, "weights": "bf16"}, "seed": 1})
    records = load_records([sweep], seeds=True, label_from="folder")
    assert [(r.label, len(r.members)) for r in records] == [("k16", 3), ("k16bf", 1)]
    assert [r.label for r in load_records([sweep / f"k16_s{s}" for s in (1, 3)], label_from="config")] == \
        ["seed=1", "seed=3"]  # the defaults are not shown as a difference


# ---------------------------------------------------------------- fusion

def _scored_run(root: Path, tiny_dataset: Path, hits: dict, spec: dict | None = None) -> Path:
    """A finished run directory whose runs/tiny.trec holds ``hits`` (query -> [(doc, score)]); its eval spec finds
    the dataset through ``paths.data_dir`` (no ``path``), as a run's recorded config does."""
    spec = spec or {"name": DATASET, "split": "test"}
    make_run(root, None, config={"eval": {"datasets": {DATASET: spec}, "metrics": ["ndcg@10"], "k": 100},
                                 "paths": {"data_dir": str(tiny_dataset.parent)}})
    write_trec_run(root / "runs" / f"{DATASET}.trec", hits)
    qrels = {f"q{i}": {f"d{i}": 1} for i in range(QUERIES)}
    means, per_query = evaluate_run(qrels, {q: dict(h) for q, h in hits.items()}, ["ndcg@10"])
    (root / "metrics.json").write_text(json.dumps({DATASET: means}))
    (root / "per_query").mkdir()
    (root / "per_query" / f"{DATASET}.json").write_text(json.dumps(per_query))
    return root


def test_two_runs_fused_are_scored_as_a_run_that_collect_reads(tmp_path, tiny_dataset):
    """Each run puts another document first and the relevant one second (25 queries; 5 find nothing relevant);
    min-max wsum at equal weights ranks the relevant document first (0.5 * 0.9 + 0.5 * 0.9 against 0.5 for the
    others); weights (1, 0) give the first run back."""
    from lsr_run.fusion import fuse_runs

    x, y = (lambda i: f"d{(i + 30) % 60}"), (lambda i: f"d{(i + 31) % 60}")
    found = range(25)
    a = _scored_run(tmp_path / "a", tiny_dataset, {f"q{i}": [(x(i), 1.0), (f"d{i}", 0.9), (y(i), 0.0)] if i in found
                                                   else [(x(i), 1.0), (y(i), 0.5)] for i in range(QUERIES)})
    b = _scored_run(tmp_path / "b", tiny_dataset, {f"q{i}": [(y(i), 4.0), (f"d{i}", 3.6), (x(i), 0.0)] if i in found
                                                   else [(y(i), 4.0), (x(i), 0.0)] for i in range(QUERIES)})
    alone = json.loads((a / "metrics.json").read_text())[DATASET]["ndcg@10"]
    assert alone == pytest.approx(25 / 30 / 1.5849625, rel=1e-6)  # the relevant document second: 1 / log2(3)

    metrics = fuse_runs([a, b], tmp_path / "fused")
    assert metrics == {DATASET: {"ndcg@10": pytest.approx(25 / 30), "queries": QUERIES}}
    lines = (tmp_path / "fused" / "runs" / f"{DATASET}.trec").read_text().splitlines()
    assert [line.split()[2] for line in lines[:3]] == ["d0", y(0), x(0)]  # 0.9, then 0.5 tied: docid descending
    assert [float(line.split()[4]) for line in lines[:3]] == [0.9, 0.5, 0.5]  # the fused scores themselves
    rescored, _ = evaluate_run({f"q{i}": {f"d{i}": 1} for i in range(QUERIES)}, read_trec_run(
        tmp_path / "fused" / "runs" / f"{DATASET}.trec"), ["ndcg@10"])
    assert rescored["ndcg@10"] == metrics[DATASET]["ndcg@10"]  # the file scores as metrics.json says
    per_query = json.loads((tmp_path / "fused" / "per_query" / f"{DATASET}.json").read_text())
    assert [per_query[f"q{i}"]["ndcg@10"] for i in range(QUERIES)] == pytest.approx([1.0] * 25 + [0.0] * 5)
    config = yaml.safe_load((tmp_path / "fused" / "config.yaml").read_text())
    assert config["fusion"]["runs"] == [str(a.resolve()), str(b.resolve())] and config["fusion"]["weights"] == [0.5, 0.5]
    assert fuse_runs([a, b], tmp_path / "first", weights=[1.0, 0.0])[DATASET]["ndcg@10"] == pytest.approx(alone)

    records = load_records([a, b, tmp_path / "fused"], label_from="folder")
    table = build_table(records, baseline="a")
    assert [r.label for r in table.rows] == ["a", "b", "fused"]
    assert table.rows[2].values[DATASET] == pytest.approx(25 / 30) and table.rows[2].marks[DATASET] == BETTER


def test_fusion_refuses_runs_scored_on_other_judgements_and_unfinished_folders(tmp_path, tiny_dataset):
    from lsr_run.fusion import fuse_runs

    hits = {f"q{i}": [(f"d{i}", 1.0)] for i in range(QUERIES)}
    a = _scored_run(tmp_path / "a", tiny_dataset, hits)
    b = _scored_run(tmp_path / "b", tiny_dataset, hits, spec={"name": DATASET, "split": "dev"})
    with pytest.raises(LsrError, match=f"fusion: {DATASET} was scored on other judgements in {b / 'config.yaml'}"):
        fuse_runs([a, b], tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LsrError, match="empty: not a finished run directory"):
        fuse_runs([a, tmp_path / "empty"], tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written before the inputs are checked


def test_kept_run_records_let_a_table_gain_seeds_after_the_runs_are_gone(tmp_path, tiny_dataset):
    """--keep-runs copies each run's record (no run files, models or indexes) to <out>/runs/; collected again on
    another machine, with only that machine's runs given, the table keeps the earlier seeds, and equals the table
    collected from every original run directory."""
    import shutil
    import statistics

    cli = runpy.run_path(str(ROOT / "scripts" / "collect.py"), run_name="collect")
    ranks = {"topk": lambda i, s: 2 + (i + s) % 5, "stratified": lambda i, s: 1 if (i + s) % 4 else 3}
    for name, rank in ranks.items():
        for seed in (1, 2):
            where = tmp_path / ("machine_a" if seed == 1 else "machine_b") / f"{name}_s{seed}"
            make_run(where, [f"sampling={name}", f"seed={seed}"], {i: rank(i, seed) for i in range(QUERIES)},
                     tiny_dataset, config={"sampling": {"name": name}, "seed": seed})
            (where / "sampling_stats.json").write_text(json.dumps({"teacher_variance": 1.0 + seed}))
    run = tmp_path / "machine_a" / "topk_s1"
    (run / "model").mkdir()
    (run / "model" / "model.safetensors").write_bytes(b"weights")
    shutil.copytree(run, tmp_path / "bm25_copy")
    (run / "baselines" / "bm25").mkdir(parents=True)
    for name in ("metrics.json", "per_query"):
        (shutil.copytree if name == "per_query" else shutil.copy)(tmp_path / "bm25_copy" / name,
                                                                   run / "baselines" / "bm25" / name)
    args = ["--seeds", "--label-from", "folder", "--baseline", "topk", "--extra", "sampling_stats", "--keep-runs"]
    everything = tmp_path / "everything"
    assert cli["main"]([str(tmp_path / "machine_a"), str(tmp_path / "machine_b"), "--out", str(everything),
                        *args[:-1]]) == 0
    out = tmp_path / "results"
    assert cli["main"]([str(tmp_path / "machine_a"), "--out", str(out), *args]) == 0
    kept = out / "runs" / "topk_s1"
    assert sorted(p.name for p in kept.iterdir()) == [".hydra", "baselines", "config.yaml", "metrics.json",
                                                       "per_query", "sampling_stats.json"]
    assert (kept / "baselines" / "bm25" / "per_query" / f"{DATASET}.json").exists()

    shutil.rmtree(tmp_path / "machine_a")  # that machine's outputs are gone; only the kept records remain
    shutil.copytree(kept, out / "runs" / ".topk_s3.tmp")  # a copy that was interrupted: not a run of the table
    assert cli["main"]([str(tmp_path / "machine_b"), "--out", str(out), *args]) == 0
    assert sorted(p.name for p in (out / "runs").iterdir()) == [".topk_s3.tmp", "stratified_s1", "stratified_s2",
                                                                 "topk_s1", "topk_s2"]
    assert (out / "table.md").read_text() == (everything / "table.md").read_text()
    per_seed = [json.loads((out / "runs" / f"stratified_s{s}" / "metrics.json").read_text())[DATASET]["ndcg@10"]
                for s in (1, 2)]
    row = next(line for line in (out / "table.csv").read_text().splitlines() if line.startswith("stratified"))
    assert f"{statistics.mean(per_seed):.4f}" in row
    assert "- 4 run directories" in (out / "source.md").read_text()
    # the kept records alone collect into the same table; they are not copied onto themselves
    assert cli["main"]([str(out / "runs"), "--out", str(out), *args]) == 0
    assert (out / "table.md").read_text() == (everything / "table.md").read_text()

    running = tmp_path / "machine_b" / "topk_s3"  # a run that has not ended: in the table, not kept
    make_run(running, ["sampling=topk", "seed=3"], None, tiny_dataset, config={"sampling": {"name": "topk"}, "seed": 3})
    assert cli["main"]([str(tmp_path / "machine_b"), "--out", str(out), *args]) == 0
    assert not (out / "runs" / "topk_s3").exists() and "| 2/3 |" in (out / "table.md").read_text()
    shutil.rmtree(running)

    other = tmp_path / "elsewhere" / "topk_s2"  # a different run with a kept run's name: refused, nothing written
    shutil.copytree(tmp_path / "machine_b" / "topk_s2", other)
    before = (out / "table.md").stat().st_mtime_ns
    assert cli["main"]([str(tmp_path / "machine_b"), str(other), "--out", str(out), *args]) == 2
    assert (out / "table.md").stat().st_mtime_ns == before


def test_evaluations_and_fusions_of_one_recipe_form_one_seed_row():
    """Runs that evaluate (model.path) or fuse (fusion.runs) the runs of one seed each differ in those paths only
    by the folders' seed suffix: they group by seed like trained runs; other folders stay apart."""
    from lsr_run.collect import _without_seed

    def evaluation(seed, folder):
        return {"seed": seed, "model": {"path": f"out/{folder}/model"}, "encode": {"doc_top_k": 256}}

    assert _without_seed(evaluation(1, "demo_s1")) == _without_seed(evaluation(2, "demo_s2"))
    assert _without_seed(evaluation(2, "demo_s2")) != _without_seed(evaluation(2, "flops_s2"))
    assert _without_seed(evaluation(1, "demo_s1x")) != _without_seed(evaluation(2, "demo_s2x"))  # not a suffix

    def fusion(folder):
        return {"seed": 42, "fusion": {"runs": ["/t/bm25", f"/t/{folder}"], "method": "wsum"}}

    assert _without_seed(fusion("demo_s1")) == _without_seed(fusion("demo_s42"))
    assert _without_seed(fusion("demo_s1")) != _without_seed(fusion("doc_top256_s1"))
