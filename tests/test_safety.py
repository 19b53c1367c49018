"""Safe by default: no code runs from a data file, no silent zero hits or misread ids, names cannot leave the
run directory, signals stop everything and leave nothing behind, and faults end in one clear line.

Malicious files carry a harmless payload (creating a marker file) and the tests assert it never ran.
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lsr_run.errors import ConfigError, DataError, LsrError

from conftest import ROOT, cli, toy_overrides, write_beir


class _Payload:
    """Unpickling this runs a shell command that creates ``marker``: stands in for any code a malicious file
    would run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ---------------------------------------------------------------- 1. score pickles

def test_score_pickle_with_payload_is_refused_and_never_runs(tmp_path):
    from lsr_run.teachers import FileTeacher, read_scores

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"q1": {"d1": 1.0}, "x": _Payload(marker)}))
    with pytest.raises(DataError) as err:
        read_scores(path)
    assert not marker.exists()
    message = str(err.value)
    assert str(path) in message and f"refused global {os.name}.system" in message and "\n" not in message
    # the same through the teacher a run builds (teacher=file teacher.path=evil.pkl), gzipped
    gz = tmp_path / "evil.pkl.gz"
    with gzip.open(gz, "wb") as f:
        pickle.dump({"q1": {"d1": _Payload(marker)}}, f, protocol=2)
    with pytest.raises(DataError, match=f"refused global {os.name}.system"):
        FileTeacher(path=str(gz)).compute({}, None, {"q1": ["d1"]})
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_score_pickle_with_numpy_scores_still_loads(tmp_path, protocol):
    from lsr_run.teachers import read_scores

    path = tmp_path / "ce-scores.pkl.gz"
    scores = {1: {10: np.float32(3.5), 11: np.float64(-1.25)}, 2: {12: 0.5}}
    with gzip.open(path, "wb") as f:
        pickle.dump(scores, f, protocol=protocol)
    assert read_scores(path) == {"1": {"10": 3.5, "11": -1.25}, "2": {"12": 0.5}}
    arrays = tmp_path / "arrays.pkl"  # an array inside is data too (numpy's reconstruction is allowed)
    arrays.write_bytes(pickle.dumps({"q": {"d": np.arange(3, dtype=np.float32)[1]}}, protocol=protocol))
    assert read_scores(arrays) == {"q": {"d": 1.0}}


# ---------------------------------------------------------------- 2. checkpoints

def _toy_trainer(tmp_path):
    from test_robustness import _trainer

    from lsr_run.losses import InfoNCE

    return _trainer(tmp_path, InfoNCE())


def test_checkpoint_with_payload_is_refused_and_never_runs(tmp_path):
    trainer = _toy_trainer(tmp_path)
    marker = tmp_path / "pwned"
    trainer.ckpt_path.parent.mkdir(parents=True)
    torch.save({"model": _Payload(marker), "step": 3}, trainer.ckpt_path)
    with pytest.raises(LsrError) as err:
        trainer.maybe_resume()
    assert not marker.exists()
    message = str(err.value)
    assert str(trainer.ckpt_path) in message and "delete it" in message and "\n" not in message
    assert f"{os.name}.system" in message


def test_truncated_checkpoint_is_one_clear_line(tmp_path):
    trainer = _toy_trainer(tmp_path)
    trainer.step = 2
    trainer.save_checkpoint()
    data = trainer.ckpt_path.read_bytes()
    trainer.ckpt_path.write_bytes(data[: len(data) // 2])
    with pytest.raises(LsrError) as err:
        _toy_trainer(tmp_path).maybe_resume()
    message = str(err.value)
    assert str(trainer.ckpt_path) in message and "delete it" in message and "\n" not in message


def test_checkpoint_loads_weights_only_and_resumes_rng_and_step(tmp_path):
    trainer = _toy_trainer(tmp_path)
    trainer.step = 4
    trainer.save_checkpoint()
    torch.load(trainer.ckpt_path, weights_only=True)  # no allow-list needed: tensors, lists and numbers only
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    resumed = _toy_trainer(tmp_path)
    assert resumed.maybe_resume() and resumed.step == 4
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


# ---------------------------------------------------------------- 3. zero hits (Lucene clause limit)

@pytest.mark.integration
def test_query_with_more_than_1024_terms_gets_the_brute_force_results(tmp_path):
    from lsr_run.backends.brute_force import BruteForceBackend
    from lsr_run.backends.lucene import LuceneImpactBackend
    from lsr_run.data import read_trec_run
    from lsr_run.impacts import write_vectors

    rng = random.Random(0)
    terms = [f"t{i}" for i in range(3000)]
    docs = [(f"d{i}", {t: rng.randint(1, 50) for t in rng.sample(terms, 40)}) for i in range(60)]
    (tmp_path / "vectors").mkdir()
    write_vectors(tmp_path / "vectors" / "part-000-00000.jsonl", docs)
    queries = {"long": {t: rng.randint(1, 9) for t in rng.sample(terms, 1500)},  # > 1024 distinct terms
               "short": dict(docs[0][1])}
    runs = {}
    for name, backend in (("lucene", LuceneImpactBackend(threads=1)), ("brute", BruteForceBackend())):
        backend.build(tmp_path / "vectors", tmp_path / name / "index")
        backend.search(tmp_path / name / "index", queries, 10, tmp_path / name / "runs" / "synthetic.trec")
        runs[name] = read_trec_run(tmp_path / name / "runs" / "synthetic.trec")
    assert len(runs["lucene"]["long"]) == 10
    for qid in queries:
        assert sorted(runs["lucene"][qid].items(), key=lambda x: (-x[1], x[0])) == \
            sorted(runs["brute"][qid].items(), key=lambda x: (-x[1], x[0]))
    assert not list((tmp_path / "lucene" / "runs").glob(".*tmp*"))


def test_lucene_query_with_terms_and_no_result_is_an_error(tmp_path):
    from lsr_run.backends import lucene

    run_path = tmp_path / "runs" / "mydata.trec"

    def fake_anserini(main_class, args, **kwargs):  # Lucene's answer to a query over the clause limit
        Path(args[args.index("-output") + 1]).write_text("q1 Q0 d1 1 5.000000 Anserini\n")
        return "ERROR SearchCollection - org.apache.lucene.search.IndexSearcher$TooManyClauses: maxClauseCount is set to 1024\n"

    (tmp_path / "index").mkdir()
    (tmp_path / "index" / "segments_1").write_text("")
    lucene.run_anserini, saved = fake_anserini, lucene.run_anserini
    try:
        with pytest.raises(LsrError) as err:
            lucene.LuceneImpactBackend().search(tmp_path / "index", {"q1": {"a": 2}, "q2": {"b": 1}}, 10, run_path)
        assert "mydata" in str(err.value) and "query q2" in str(err.value) and "TooManyClauses" in str(err.value)
        with pytest.raises(LsrError, match="query q2 has terms"):  # BM25 too, when Anserini reported an exception
            lucene.LuceneBm25Backend().search_text(tmp_path / "index", {"q1": "a b", "q2": "c"}, 10, run_path)
    finally:
        lucene.run_anserini = saved
    assert not run_path.exists() and not list(run_path.parent.iterdir())  # no empty run, no topics left


# ---------------------------------------------------------------- 4. ids with whitespace

def _dataset(tmp_path, docs=None, queries=None, qrels=None) -> Path:
    docs = docs or {"d1": ("", "sparse retrieval"), "d2": ("", "dense retrieval")}
    queries = queries or {"q1": "sparse"}
    qrels = qrels or {"q1": {"d1": 1}}
    return write_beir(tmp_path / "ds", docs, queries, qrels)


@pytest.mark.parametrize("bad", ["17 x", "46\tx"])
def test_document_and_query_ids_with_whitespace_named_with_file_and_line(tmp_path, bad):
    from lsr_run.data import load_dataset

    folder = _dataset(tmp_path, docs={"d1": ("", "a"), bad: ("", "b")}, qrels={"q1": {bad: 1}})
    with pytest.raises(DataError, match=r"corpus.jsonl:2: document id .* contains whitespace"):
        load_dataset("ds", path=str(folder))
    folder = _dataset(tmp_path / "b", queries={"q1": "a", bad: "b"})
    with pytest.raises(DataError, match=r"queries.jsonl:2: query id .* contains whitespace"):
        load_dataset("ds", path=str(folder))


def test_qrels_id_with_space_is_an_error_not_a_lost_judgement(tmp_path):
    from lsr_run.data import load_qrels_file

    path = tmp_path / "test.tsv"
    path.write_text("query-id\tcorpus-id\tscore\n1\t17 x\t1\n")
    with pytest.raises(DataError, match=r"test.tsv:2: document id '17 x' contains whitespace"):
        load_qrels_file(path)


def test_run_file_line_with_an_id_with_space_is_not_misread(tmp_path):
    from lsr_run.candidates import RunFileCandidates
    from lsr_run.data import read_trec_run, write_trec_run

    path = tmp_path / "run.trec"
    path.write_text("1 Q0 17 x 19 12063759.0 lsr-run\n")
    with pytest.raises(DataError, match=r"run.trec:1: .*6 columns.*got 7"):
        read_trec_run(path)
    path.write_text("1\tQ0\t17 x\t1\t3.5\tlsr-run\n")
    with pytest.raises(DataError, match=r"run.trec:1: document id '17 x'"):
        RunFileCandidates(path=str(path)).pools(None, {"1": ["d"]}, tmp_path)
    with pytest.raises(DataError, match="query id 'q 1'"):
        write_trec_run(tmp_path / "out.trec", {"q 1": [("d1", 1.0)]})


def test_teacher_tsv_and_pickle_ids_with_whitespace(tmp_path):
    from lsr_run.teachers import read_scores

    tsv = tmp_path / "scores.tsv"
    tsv.write_text("q1\td1\t0.5\nq1\t17 x\t0.25\n")
    with pytest.raises(DataError, match=r"scores.tsv:2: document id '17 x'"):
        read_scores(tsv)
    pkl = tmp_path / "scores.pkl"
    pkl.write_bytes(pickle.dumps({"q 1": {"d1": 1.0}}))
    with pytest.raises(DataError, match=r"scores.pkl: query id 'q 1'"):
        read_scores(pkl)


# ---------------------------------------------------------------- 8. minor input faults

@pytest.mark.parametrize("grade", ["0.5", "2.9"])
def test_fractional_qrels_grade_is_an_error(tmp_path, grade):
    from lsr_run.data import load_qrels_file

    path = tmp_path / "test.tsv"
    path.write_text(f"query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\t{grade}\n")
    with pytest.raises(DataError, match=rf"test.tsv:3: relevance '{grade}' is not an integer grade"):
        load_qrels_file(path)
    path.write_text(f"q1 0 d2 {grade}\n")  # TREC layout, first line (not taken for a header)
    with pytest.raises(DataError, match=r"test.tsv:1: relevance"):
        load_qrels_file(path)
    path.write_text("q1 0 d2 2.0\n")
    assert load_qrels_file(path) == {"q1": {"d2": 2}}


def test_corpus_jsonl_beside_corpus_jsonl_gz_is_ambiguous(tmp_path):
    from lsr_run.data import load_dataset

    folder = _dataset(tmp_path)
    with gzip.open(folder / "corpus.jsonl.gz", "wt") as f:
        f.write(json.dumps({"_id": "other", "text": "x"}) + "\n")
    with pytest.raises(DataError, match="both corpus.jsonl and corpus.jsonl.gz"):
        load_dataset("ds", path=str(folder))


def test_table_md_is_a_markdown_table():
    from lsr_run.pipeline import print_table

    text = print_table({"scifact": {"ndcg@10": 0.7, "query_terms": 10.0, "doc_terms": 100.0}, "collapsed": False},
                       {"bm25": {"scifact": {"ndcg@10": 0.6}}})
    lines = text.splitlines()
    assert lines[0].count("|") == lines[1].count("|") == lines[2].count("|") == 6
    assert set(lines[1].replace("|", "").strip()) <= {"-", " ", ":"} and "---" in lines[1]


# ---------------------------------------------------------------- 5. names that become paths

def _compose(overrides):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from conftest import CONF_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="run", overrides=overrides)


@pytest.mark.parametrize("overrides,key", [
    (["eval=none", "+eval.datasets={../../escaped: {name: toytest}}"], "eval.datasets.../../escaped"),
    (["eval=none", "+eval.datasets={/tmp/abs: {name: toytest}}"], "eval.datasets./tmp/abs"),
    (["eval=none", "+eval.datasets.t={name: toytest, split: ../../x}"], "eval.datasets.t.split"),
    (["eval=none", "+eval.datasets.t={name: ../toytest}"], "eval.datasets.t.name"),
    (["data.train.name=../up"], "data.train.name"),
    (["eval=local", "+eval.baselines={../up: {_target_: lsr_run.backends.brute_force.BruteForceBackend}}"],
     "eval.baselines.../up"),
])
def test_names_that_would_leave_the_run_directory_are_config_errors(tmp_path, overrides, key):
    from lsr_run import stages

    with pytest.raises(ConfigError) as err:
        stages.prepare(_compose(overrides + ["index=brute_force"]), tmp_path / "run")
    assert str(err.value).startswith(f"{key}=")
    assert not (tmp_path / "run").exists()


@pytest.mark.process
def test_cli_dataset_key_outside_the_run_directory_writes_nothing(toy, tmp_path):
    run_dir = tmp_path / "a" / "b" / "run"
    proc = cli(["stages=[encode,index,search,evaluate]", "backbone=tiny_bert", "index=brute_force", "eval=none",
                "+eval.datasets={../../ESC/x: {name: toytest, split: test}}", f"hydra.run.dir={run_dir}"],
               {"LSR_DATA_DIR": str(toy["data"])})
    assert proc.returncode == 2 and "eval.datasets.../../ESC/x=" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "a" / "ESC").exists() and not (run_dir.parent / "ESC").exists()
    assert sorted(p.name for p in run_dir.iterdir()) == [".hydra", "cli.log"]  # Hydra's own files only


# ---------------------------------------------------------------- 6. signals

def _children(pid: int) -> list[int]:
    """Descendants of ``pid`` (from /proc; no psutil)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    out, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, parent in parents.items() if parent == p]
        out += kids
        frontier += kids
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _leftovers(run_dir: Path) -> list[Path]:
    return [p for p in run_dir.rglob("*") if ".tmp" in p.name or ".part" in p.name]


@pytest.mark.process
def test_sigterm_during_training_stops_records_and_resumes(toy, tmp_path):
    env = {"LSR_DATA_DIR": str(toy["data"])}
    run_dir = tmp_path / "run"
    args = toy_overrides(toy, steps=6) + [f"hydra.run.dir={run_dir}"]
    p = cli(args, env, wait=False)
    deadline = time.time() + 600
    while not ((run_dir / "train_log.jsonl").exists() and (run_dir / "train_log.jsonl").read_text().strip()):
        assert p.poll() is None, p.stderr.read()[-2000:]
        assert time.time() < deadline
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    code = p.wait(timeout=120)
    stderr = p.stderr.read()
    assert code == 128 + signal.SIGTERM, stderr[-2000:]
    assert "interrupted by SIGTERM during stage train" in stderr and "Traceback" not in stderr
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "interrupted" and status["signal"] == "SIGTERM" and status["stage"] == "train"
    assert not _leftovers(run_dir)
    again = cli(args, env)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((run_dir / "status.json").read_text())["state"] == "done"
    assert (run_dir / "metrics.json").exists()


@pytest.mark.integration
def test_sigterm_during_lucene_indexing_stops_the_indexer_and_resumes(toy, tmp_path):
    env = {"LSR_DATA_DIR": str(toy["data"])}
    run_dir = tmp_path / "run"
    args = ["stages=[encode,index]", "backbone=tiny_bert", "index=lucene_impact", "index.threads=1", "eval=none",
            "+eval.datasets.toytest={name: toytest, split: test}", "encode.bf16=false", f"hydra.run.dir={run_dir}"]
    p = cli(args, env, wait=False)
    deadline, indexers = time.time() + 600, []
    while not indexers:
        assert p.poll() is None, p.stderr.read()[-2000:]
        assert time.time() < deadline
        indexers = [c for c in _children(p.pid) if b"impact_index" in Path(f"/proc/{c}/cmdline").read_bytes()]
        time.sleep(0.02)
    time.sleep(0.5)  # the JVM is up and writing into index/.toytest.tmp-<pid>
    p.send_signal(signal.SIGTERM)
    code = p.wait(timeout=120)
    stderr = p.stderr.read()
    assert code == 128 + signal.SIGTERM, stderr[-2000:]
    assert not [c for c in indexers if _alive(c)], "an indexer outlived lsr-run"
    assert not _leftovers(run_dir), _leftovers(run_dir)
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "interrupted" and status["stage"] == "index"
    again = cli(args, env)
    assert again.returncode == 0, again.stderr[-2000:]
    index = next(p for p in (run_dir / "index").glob("toytest-*") if p.is_dir())  # <corpus>-<content digest>
    assert (run_dir / ".done" / f"index-{index.name}").exists() and any(index.glob("segments_*"))


_CLI_SIGTERM_WHILE_ENCODING = """
import os, signal, sys, torch
import lsr_run.encoding as encoding
import lsr_run.stages as stages

class Encoder:  # encodes one batch, then the process receives SIGTERM while the next is encoded
    tokenizer = None
    device = torch.device("cpu")
    def encode(self, texts, max_length, batch_size, bf16, progress=None, prefetch=None, max_tokens=None):
        yield [0, 1], torch.ones(2, 3)
        os.kill(os.getpid(), signal.SIGTERM)
        yield [2, 3], torch.ones(2, 3)

encoding.term_vocabulary = lambda tokenizer: ["x", "y", "z"]
stages.StageContext.encoder = lambda self: Encoder()
from lsr_run.cli import main
sys.argv = ["lsr-run", *sys.argv[1:]]
main()
"""


@pytest.mark.process
def test_sigterm_during_encoding_leaves_no_tmp_shard(toy, tmp_path):
    run_dir = tmp_path / "run"
    env = dict(os.environ, LSR_DATA_DIR=str(toy["data"]), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", _CLI_SIGTERM_WHILE_ENCODING, "stages=[encode]", "backbone=tiny_bert",
                           "index=lucene_impact", "index.threads=2", "eval=none",
                           "+eval.datasets.toytest={name: toytest, split: test}", f"hydra.run.dir={run_dir}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-2000:]
    shards = list((run_dir / "encoded").glob("toytest-*/corpus"))  # <corpus>-<content digest>
    assert len(shards) == 1 and not list(shards[0].iterdir())  # neither .tmp shards nor half a corpus
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "interrupted" and status["stage"] == "encode"


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the swallowed one, on purpose
def test_a_swallowed_signal_is_raised_again():
    from lsr_run import interrupt

    class Swallows:
        def __del__(self):  # an exception raised here is "ignored in" the destructor
            os.kill(os.getpid(), signal.SIGINT)

    saved = {s: signal.getsignal(s) for s in interrupt.SIGNALS}
    try:
        interrupt.reset()
        assert interrupt.install()
        obj = Swallows()
        del obj  # the SIGINT's KeyboardInterrupt is swallowed here
        with pytest.raises(interrupt.Interrupted) as err:
            interrupt.set_stage("encode")  # the next stage boundary raises it again
        assert err.value.exit_code == 130
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
        interrupt.reset()


# ---------------------------------------------------------------- 7. one line instead of a traceback

@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_damaged_model_folder_is_one_line(tmp_path, damage):
    from conftest import make_tiny_encoder

    from lsr_run import stages

    folder = tmp_path / "model"
    make_tiny_encoder("bert").save(folder)
    weights = folder / "model.safetensors"
    assert weights.exists()
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
    else:
        weights.unlink()
    ctx = stages.prepare(_compose(["stages=[encode]", "backbone=tiny_bert", "index=brute_force",
                                   f"model.path={folder}"]), tmp_path / "run")
    with pytest.raises(LsrError) as err:
        ctx.encoder()
    assert str(folder) in str(err.value) and "\n" not in str(err.value)


def test_full_disk_is_one_line_naming_the_file(tmp_path, monkeypatch):
    from lsr_run import run_dir as rd

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    target = tmp_path / "run" / "metrics.json"
    with pytest.raises(LsrError, match=rf"^no space left on device writing {target}; free space"):
        rd.write_json(target, {"a": 1})
    assert not list(target.parent.iterdir())  # the temporary file is gone too

    def torch_full(obj, f):  # torch.save's C++ writer on a full disk
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", torch_full)
    monkeypatch.setattr("shutil.disk_usage", lambda p: type("U", (), {"free": 0})())
    with pytest.raises(LsrError, match="no space left on device writing .*last.pt"):
        with rd.atomic_path(tmp_path / "run" / "last.pt") as tmp:
            torch.save({}, tmp)


_CLI_WITH_FULL_DISK = """
import errno, sys
import lsr_run.stages as stages
def full(ctx):
    raise OSError(errno.ENOSPC, "No space left on device")
stages.encode = full
from lsr_run.cli import main
sys.argv = ["lsr-run", *sys.argv[1:]]
main()
"""


@pytest.mark.process
def test_cli_full_disk_and_unusable_run_folder_are_one_line(toy, tmp_path):
    env = dict(os.environ, LSR_DATA_DIR=str(toy["data"]), HF_HUB_OFFLINE="1")
    run_dir = tmp_path / "run"
    args = ["stages=[encode]", "backbone=tiny_bert", "index=brute_force", "eval=none",
            "+eval.datasets.toytest={name: toytest, split: test}"]
    proc = subprocess.run([sys.executable, "-c", _CLI_WITH_FULL_DISK, *args, f"hydra.run.dir={run_dir}"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"lsr-run: error: no space left on device writing {run_dir}" in proc.stderr
    assert "Traceback" not in proc.stderr
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    for where in (a_file, a_file / "run"):
        proc = cli(args + [f"hydra.run.dir={where}"], {"LSR_DATA_DIR": str(toy["data"])})
        assert proc.returncode == 2 and f"{a_file} is a file, not a folder" in proc.stderr, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr


def test_unwritable_run_folder_is_one_line(tmp_path, monkeypatch):
    from lsr_run import run_dir as rd

    target = tmp_path / "run" / "config.yaml"

    def denied(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "write_text", denied)
    with pytest.raises(LsrError, match=r"permission denied; make the run folder writable or choose another"):
        rd.write_text(target, "x")
    from lsr_run.cli import _check_run_dir

    monkeypatch.setattr(os, "access", lambda path, mode: False)  # root may write anywhere: pretend it may not
    assert "is not writable" in _check_run_dir([f"hydra.run.dir={tmp_path / 'new'}"])
