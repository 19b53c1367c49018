import torch

from lsr_run.impacts import QUANTIZATION_SCALE, quantize, term_vocabulary, to_sparse


def test_quantize_rounds_and_scales():
    w = torch.tensor([[0.004, 0.016, 1.234, 0.0, 0.126]])
    assert QUANTIZATION_SCALE == 100
    assert quantize(w).tolist() == [[0, 2, 123, 0, 13]]
    assert quantize(w).dtype == torch.int32


def test_to_sparse_drops_zeros_and_orders_by_impact():
    impacts = torch.tensor([[0, 5, 0, 9], [0, 0, 0, 0]], dtype=torch.int32)
    terms = ["a", "b", "c", "d"]
    assert to_sparse(impacts, terms) == [{"d": 9, "b": 5}, {}]


def test_term_vocabulary_is_unique_and_whitespace_free():
    class Tok:
        def __len__(self):
            return 4

        def convert_ids_to_tokens(self, ids):
            return ["a", "b c", "", "a"]

    terms = term_vocabulary(Tok())
    assert len(set(terms)) == 4
    assert not any(" " in t or not t for t in terms)
