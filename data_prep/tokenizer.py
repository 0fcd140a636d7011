"""Tokenizers for data_prep, from local files only.

The specs are the ones the recipes take (``coom_nemo.tokenizers``):
``sentencepiece:<file.model>`` or ``hf:<tokenizer.json or its
directory>``. Documents are encoded without special tokens; the writer
appends the end-of-document token, the tokenizer's EOS, which is what
NeMo's tokenizers report as ``eod`` at training time, unless loaded
with ``eod=False`` (MLPerf's C4 files have none).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Tokenizer:
    spec: str
    path: Path
    eod: int | None  # None: documents get no end-of-document token
    vocab_size: int
    _model: object

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, in this process's one thread (the
        pipeline's parallelism is its worker processes)."""
        if isinstance(self._model, _SentencePiece):
            return self._model.encode(texts, num_threads=1)
        return [e.ids for e in self._model.encode_batch(texts, add_special_tokens=False)]

    def encode_one(self, text: str) -> list[int]:
        if isinstance(self._model, _SentencePiece):
            return self._model.encode(text)
        return self._model.encode(text, add_special_tokens=False).ids

    def fingerprint(self) -> dict:
        """What decides the tokens: the model's hash and the EOD."""
        digest = hashlib.sha256(self.path.read_bytes()).hexdigest()
        return {"file": str(self.path), "sha256": digest, "eod": self.eod,
                "vocab_size": self.vocab_size}


try:
    from sentencepiece import SentencePieceProcessor as _SentencePiece
except ImportError:  # pragma: no cover - a pinned dependency
    _SentencePiece = None


def load(spec: str, eod_token: str | None = None, eod: bool = True) -> Tokenizer:
    """The tokenizer ``spec`` names; ``eod_token`` overrides its EOS;
    ``eod=False``: no end-of-document token."""
    kind, _, value = spec.partition(":")
    if kind == "sentencepiece":
        path = _existing(value, spec)
        model = _SentencePiece(model_file=str(path))
        if not eod:
            return Tokenizer(spec, path, None, model.vocab_size(), model)
        eod = model.piece_to_id(eod_token) if eod_token else model.eos_id()
        if eod < 0 or (eod_token and model.id_to_piece(eod) != eod_token):
            raise ValueError(f"tokenizer: {path} has no {eod_token or 'EOS'} token for the "
                             "end of documents; pass --eod-token with one it has")
        return Tokenizer(spec, path, eod, model.vocab_size(), model)
    if kind == "hf":
        from tokenizers import Tokenizer as HFTokenizer

        path = _existing(value, spec)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer: {path} does not exist; give the "
                                    "tokenizer.json or the directory holding it")
        model = HFTokenizer.from_file(str(path))
        size = model.get_vocab_size(with_added_tokens=True)
        if not eod:
            return Tokenizer(spec, path, None, size, model)
        token = eod_token or _eos_token(path.parent)
        eod = model.token_to_id(token) if token else None
        if eod is None:
            raise ValueError(f"tokenizer: cannot tell the end-of-document token of {path} "
                             f"({token!r} is not in its vocabulary); pass --eod-token, "
                             "e.g. --eod-token '</s>'")
        return Tokenizer(spec, path, eod, size, model)
    raise ValueError(f"tokenizer: unknown kind {kind!r} in {spec!r}; use "
                     "sentencepiece:<file.model> or hf:<tokenizer.json or its directory>")


def _eos_token(directory: Path) -> str | None:
    """``eos_token`` of ``tokenizer_config.json`` beside the tokenizer,
    as transformers (and so NeMo) would read it."""
    config = directory / "tokenizer_config.json"
    if not config.is_file():
        return None
    token = json.loads(config.read_text()).get("eos_token")
    return token.get("content") if isinstance(token, dict) else token


def _existing(path: str, spec: str) -> Path:
    if not path or not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer: {spec!r} names no existing file")
    return Path(path).resolve()
