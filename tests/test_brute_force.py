from lsr_run.backends.brute_force import BruteForceBackend
from lsr_run.data import read_trec_run
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
