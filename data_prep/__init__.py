"""Dataset preparation: documents to Megatron indexed datasets.

Commands, run from the repository root (``--help`` for each):

- ``python -m data_prep.c4``: C4 ``c4/en/3.0.1`` with MLPerf's split
- ``python -m data_prep.tinystories``: TinyStories, text or parquet
- ``python -m data_prep.prepare``: any JSON-lines, text, parquet files
- ``python -m data_prep.train_tokenizer``: SentencePiece, offline
- ``python -m data_prep.english_corpus``: a small English corpus
- ``python -m data_prep.benchmark``: throughput against a plain loop
"""
