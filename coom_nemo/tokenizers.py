"""Offline tokenizers, as NeMo-Run configs.

Nothing here downloads: a tokenizer is a vocabulary size (mock data), a
local SentencePiece ``.model`` or a local HF ``tokenizer.json`` (or a
directory holding one). One string names each, so the CLI can pass it:
``null:32000``, ``sentencepiece:/data/spm.model``, ``hf:/data/tok``.
"""

from __future__ import annotations

import os
from pathlib import Path

import nemo_run as run


def tokenizer_config(spec: str) -> run.Config:
    """NeMo tokenizer config for ``kind:value`` (see module
    docstring)."""
    kind, _, value = spec.partition(":")
    if kind == "null":
        from nemo.collections.common.tokenizers.null_tokenizer import NullTokenizer

        if not value.isdigit():
            raise ValueError(f"tokenizer: 'null:<vocab size>' expected, got {spec!r}")
        # NullTokenizer adds one id for end-of-document.
        return run.Config(NullTokenizer, vocab_size=int(value) - 1)
    if kind == "sentencepiece":
        from nemo.collections.common.tokenizers.sentencepiece_tokenizer import (
            SentencePieceTokenizer,
        )

        return run.Config(SentencePieceTokenizer, model_path=_existing(value, spec))
    if kind == "hf":
        from nemo.collections.common.tokenizers.huggingface.auto_tokenizer import AutoTokenizer

        path = Path(_existing(value, spec))
        directory = path.parent if path.is_file() else path
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        return run.Config(AutoTokenizer, pretrained_model_name=str(directory), use_fast=True)
    raise ValueError(
        f"tokenizer: unknown kind {kind!r} in {spec!r}; use null:<vocab>, "
        "sentencepiece:<file.model> or hf:<tokenizer.json or its directory>"
    )


def _existing(path: str, spec: str) -> str:
    if not path or not Path(path).exists():
        raise FileNotFoundError(f"tokenizer: {spec!r} names no existing file")
    return str(Path(path).resolve())


def vocab_size(config: run.Config) -> int:
    """Tokens of a tokenizer config, as NeMo sizes the model by it."""
    import fiddle as fdl

    return int(fdl.build(config).vocab_size)
