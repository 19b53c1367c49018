"""Retrieval backends: Lucene impact index, Lucene BM25, and an exact brute-force sparse dot product.

A backend is chosen by the ``index`` config group (``_target_``) and answers two calls: ``build(source,
index_dir)`` and ``search(index_dir, queries, k, run_path)``. Impact backends take encoded documents/queries
(quantised {term: int} vectors); BM25 takes raw text.
"""
