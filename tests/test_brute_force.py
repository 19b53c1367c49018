import json
from dataclasses import dataclass

from lsr_run.backends import TextBackend
from lsr_run.backends.brute_force import BruteForceBackend
from lsr_run.data import read_trec_run, write_trec_run
from lsr_run.impacts import write_vectors


def test_exact_scores_and_id_tie_break(tmp_path):
    vectors = tmp_path / "vec"
    vectors.mkdir()
    write_vectors(vectors / "part-00000.jsonl", [
        ("d2", {"apple": 3, "pear": 1}),
        ("d1", {"apple": 3, "pear": 1}),  # ties with d2: d1 ranks first
        ("d3", {"kiwi": 10}),
        ("d4", {"pear": 2}),
    ])
    backend = BruteForceBackend()
    backend.build(vectors, tmp_path / "index")
    backend.search(tmp_path / "index", {"q": {"apple": 2, "pear": 5}, "none": {"zzz": 3}}, k=10,
                   run_path=tmp_path / "run.trec")
    run = read_trec_run(tmp_path / "run.trec")
    assert list(run["q"]) == ["d1", "d2", "d4"]
    assert run["q"] == {"d1": 11.0, "d2": 11.0, "d4": 10.0}
    assert "none" not in run


def test_what_a_backend_indexes_is_its_type():
    import dataclasses

    from lsr_run.backends import TextBackend, VectorBackend
    from lsr_run.backends.lucene import LuceneBm25Backend, LuceneImpactBackend

    for backend in (BruteForceBackend(), LuceneImpactBackend()):
        assert isinstance(backend, VectorBackend) and not isinstance(backend, TextBackend)
    assert isinstance(LuceneBm25Backend(), TextBackend) and not isinstance(LuceneBm25Backend(), VectorBackend)
    for cls in (BruteForceBackend, LuceneImpactBackend, LuceneBm25Backend):
        assert "needs_vectors" not in {f.name for f in dataclasses.fields(cls)}  # no config field decides it
    assert BruteForceBackend().indexing_threads == 1
    assert LuceneImpactBackend(threads=3).indexing_threads == 3


@dataclass
class WordOverlap(TextBackend):
    """A text backend for the tests: scores a document by the number of query words it contains."""

    batch_size: int = 256  # index=brute_force's key, so the preset's node builds this class too

    def build_from_corpus(self, corpus, index_dir):
        docs = {d: t.lower().split() for ids, texts in corpus.batches() for d, t in zip(ids, texts)}
        index_dir.mkdir(parents=True)
        (index_dir / "docs.json").write_text(json.dumps(docs))
        return {"docs": len(docs)}

    def search_text(self, index_dir, queries, k, run_path):
        docs = json.loads((index_dir / "docs.json").read_text())
        run = {}
        for qid, text in queries.items():
            words = set(text.lower().split())
            scored = sorted(((-sum(w in words for w in ws), d) for d, ws in docs.items()))
            run[qid] = [(d, float(-s)) for s, d in scored[:k] if s < 0]
        write_trec_run(run_path, run)


def test_a_text_backend_is_searched_with_text_and_encodes_nothing(toy, tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from conftest import CONF_DIR, toy_overrides
    from lsr_run import stages

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="run", overrides=toy_overrides(toy) + [
            "stages=[encode,index,search,evaluate]", f"paths.data_dir={toy['data']}", "paths.cache_dir=null",
            f"index._target_={__name__}.WordOverlap"])
    ctx = stages.prepare(cfg, tmp_path / "run")
    assert not ctx.parts.vectors
    metrics = stages.execute(ctx)
    run = ctx.run
    assert not (run.root / "encoded").exists()  # nothing encoded: no model was even loaded
    assert not ctx.encoder_loaded
    assert metrics["toytest"]["queries"] == 16 and metrics["toytest"]["ndcg@10"] > 0
    assert "query_terms" not in metrics["toytest"]  # no vectors, no vector statistics
    assert read_trec_run(run.run_file("toytest"))
    marker = json.loads(next((run.root / ".done").glob("index-toytest-*")).read_text())
    assert marker["docs"] == 40 and marker["seconds"] >= 0 and marker["provenance"]  # the backend's figures


def test_evaluate_is_reused_only_for_the_same_runs_and_judgements(toy, tmp_path):
    """A second execute in the same folder skips evaluate (no scoring); rewritten qrels score again, with the new
    judgements, and so do other metrics."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from conftest import CONF_DIR, toy_overrides
    from lsr_run import stages

    def execute(*extra):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="run", overrides=toy_overrides(toy) + [
                "stages=[index,search,evaluate]", f"paths.data_dir={toy['data']}", "paths.cache_dir=null",
                f"index._target_={__name__}.WordOverlap", *extra])
        return stages.execute(stages.prepare(cfg, tmp_path / "run"))

    first = execute()
    done = tmp_path / "run" / ".done" / "evaluate"
    recorded = done.read_text()
    (tmp_path / "run" / "per_query" / "toytest.json").write_text("{}")  # would be rewritten by a new scoring
    assert execute() == first and done.read_text() == recorded
    assert (tmp_path / "run" / "per_query" / "toytest.json").read_text() == "{}"
    qrels = toy["data"] / "toytest" / "qrels" / "test.tsv"
    lines = qrels.read_text().splitlines()
    qrels.write_text("\n".join(lines[:1] + [line.replace("\td", "\tx", 1) for line in lines[1:9]] + lines[9:]) + "\n")
    rejudged = execute()  # half the queries lose their only relevant document
    assert rejudged["toytest"]["ndcg@10"] < first["toytest"]["ndcg@10"]
    assert json.loads((tmp_path / "run" / "per_query" / "toytest.json").read_text())
    other = execute("eval.metrics=[ndcg@10,map]")
    assert "map" in other["toytest"] and "map" not in rejudged["toytest"]


def test_a_baseline_runs_from_its_own_config_composed_from_the_run(toy, tmp_path):
    """``eval.baselines.<name>`` runs index, search and evaluate from a config composed from the run's (its
    index node in place of the run's index): written to baselines/<name>/config.yaml, the run's left as it is."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from conftest import CONF_DIR, toy_overrides
    from lsr_run.pipeline import baseline_config
    from lsr_run.run_dir import RunDir

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="run", overrides=toy_overrides(toy) + [
            "index=brute_force", f"paths.data_dir={toy['data']}", "paths.cache_dir=null",
            f"+eval.baselines.overlap={{_target_: {__name__}.WordOverlap}}"])
    before = OmegaConf.to_yaml(cfg)
    composed = baseline_config(cfg, "overlap")
    assert OmegaConf.to_yaml(cfg) == before  # composing leaves the run's config untouched
    assert composed.index._target_ == f"{__name__}.WordOverlap" and list(composed.stages) == ["index", "search",
                                                                                                 "evaluate"]
    others = [k for k in cfg if k not in ("index", "stages")]  # every other section is the run's
    assert OmegaConf.to_container(OmegaConf.masked_copy(composed, others)) == \
        OmegaConf.to_container(OmegaConf.masked_copy(cfg, others))

    from lsr_run import distributed, stages
    from lsr_run.pipeline import _run_locked

    run = RunDir(tmp_path / "run")
    ctx = stages.prepare(OmegaConf.merge(cfg, {"stages": ["evaluate"]}), run.root)
    run.root.mkdir(parents=True)
    _run_locked(ctx.cfg, run, distributed.init(), ctx)
    base = run.baseline("overlap")
    written = OmegaConf.load(base.config)
    assert written.index._target_ == f"{__name__}.WordOverlap" and list(written.stages) == ["index", "search",
                                                                                              "evaluate"]
    metrics = json.loads(base.metrics.read_text())
    assert metrics["toytest"]["queries"] == 16 and metrics["toytest"]["ndcg@10"] > 0
    assert not (base.root / "encoded").exists()


def test_bf16_weights_and_token_budget_reach_the_encode_stage_and_its_keys(toy, tmp_path, monkeypatch):
    """``encode.weights=bf16`` loads the model to encode in bf16; ``encode.max_tokens`` batches by tokens. Both
    change the encode key; left at null they leave it as a config without them has it (earlier runs' keys)."""
    import torch
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from conftest import CONF_DIR, make_tiny_encoder, toy_overrides
    from lsr_run import stages
    from lsr_run.models.splade import SpladeEncoder

    model = tmp_path / "model"
    make_tiny_encoder("bert", active=0.01).save(model)

    def context(folder, *extra):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="run", overrides=toy_overrides(toy) + [
                "stages=[encode]", f"paths.data_dir={toy['data']}", "paths.cache_dir=null",
                "index=brute_force", f"model.path={model}", "encode.bf16=false", *extra])
        return stages.prepare(cfg, tmp_path / folder)

    budgets = []
    batches = SpladeEncoder.token_batches
    monkeypatch.setattr(SpladeEncoder, "token_batches",
                        lambda self, texts, length, size, budget: budgets.append(budget) or batches(
                            self, texts, length, size, budget))
    ctx = context("budget", "encode.max_tokens=64")
    stages.execute(ctx)
    assert budgets == [64, 64]  # the corpus, then the queries
    assert ctx.run.encoded_queries("toytest").exists()
    half = context("bf16", "encode.weights=bf16")
    assert next(half.encoder().parameters()).dtype == torch.bfloat16  # (bf16 outputs: test_pooling)
    plain, absent = context("plain"), context("absent")
    assert next(plain.encoder().parameters()).dtype == torch.float32
    for key in ("max_tokens", "weights"):  # as the config of a run made before these settings existed
        del absent.parts.config["encode"][key]
    ds = ctx.dataset("toytest")
    keys = [stages.encode_key(c, ds) for c in (plain, absent, ctx, half)]
    assert keys[0] == keys[1] and len(set(keys)) == 3
