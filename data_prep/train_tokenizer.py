"""Train a SentencePiece tokenizer offline from a corpus.

For tests and for users without hub access. The model is BPE with byte
fallback (no unknown tokens), identity normalization (decoding gives
the text back) and ids 0/1/2 = ``<unk>``/``<s>``/``</s>``, as Llama and
Mixtral tokenizers have them; ``</s>`` is the end-of-document token.

    python -m data_prep.train_tokenizer --vocab-size 1024 \\
        --input data/english/fortunes-train.txt \\
        --output data/english/spm1024

writes ``spm1024.model`` (for ``--tokenizer
sentencepiece:data/english/spm1024.model``) and ``spm1024.vocab``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from data_prep import documents, prepare

_MAX_LINE = 16384  # bytes; SentencePiece skips longer "sentences"


def train(inputs, output: str, vocab_size: int, *, max_docs: int | None = None,
          model_type: str = "bpe") -> Path:
    """Train on the documents of ``inputs``; return the ``.model``
    path. Refuses to overwrite an existing model."""
    model = Path(f"{output}.model")
    if model.exists():
        raise FileExistsError(f"output: {model} exists; choose another --output or "
                              "remove it")
    model.parent.mkdir(parents=True, exist_ok=True)
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=_lines(inputs, max_docs),
        model_prefix=output,
        vocab_size=vocab_size,
        model_type=model_type,
        byte_fallback=True,
        character_coverage=0.9999,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        max_sentence_length=_MAX_LINE,
        input_sentence_size=5_000_000,
        shuffle_input_sentence=True,
        num_threads=os.cpu_count() or 1,
        minloglevel=2,  # warnings too: pieces with tabs upset only .vocab
    )
    return model


def _lines(inputs, max_docs: int | None):
    """Non-empty lines of the documents: SentencePiece's sentences."""
    pieces = documents.plan(inputs, piece_bytes=1 << 62, max_docs=max_docs)
    for piece in pieces:
        for text, _ in documents.read(piece):
            for line in text.splitlines():
                if line.strip():
                    yield line


def main(argv=None) -> int:
    p = prepare.command_line(__doc__, "train_tokenizer")
    p.add_argument("--input", nargs="+", required=True,
                   help="corpus files (.json[l][.gz], .txt[.gz], .parquet)")
    p.add_argument("--output", required=True, help="model prefix: writes <output>.model")
    p.add_argument("--vocab-size", type=int, default=32000, help="(default 32000)")
    p.add_argument("--model-type", default="bpe", choices=("bpe", "unigram"),
                   help="(default bpe)")
    p.add_argument("--max-docs", type=int, help="train on the first N documents only")
    args = p.parse_args(argv)
    try:
        model = train(args.input, args.output, args.vocab_size, max_docs=args.max_docs,
                      model_type=args.model_type)
    except (OSError, ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {model} (vocab {args.vocab_size}); use --tokenizer sentencepiece:{model}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
