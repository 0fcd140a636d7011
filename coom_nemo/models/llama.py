"""Llama 3.1 family."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nemo_run as run
from nemo.collections.llm import LlamaModel
from nemo.collections.llm.gpt.model.llama import Llama31Config

from coom_nemo.models.base import CoomConfig
from coom_nemo.models.specs import layer_spec


@dataclass
class CoomLlama31Config(CoomConfig, Llama31Config):
    """Llama 3.1 (RoPE with 3.1 scaling, SwiGLU, RMSNorm, GQA)."""

    transformer_layer_spec: object = layer_spec


SIZES = {
    # Meta's Llama 3.1 405B with its 128256-token vocabulary.
    "405b": dict(num_layers=126, hidden_size=16384, ffn_hidden_size=53248,
                 num_attention_heads=128, num_query_groups=8, rotary_base=500_000,
                 vocab_size=128256, seq_length=8192),
    "70b": dict(num_layers=80, hidden_size=8192, ffn_hidden_size=28672,
                num_attention_heads=64, num_query_groups=8, rotary_base=500_000,
                vocab_size=128256, seq_length=8192),
    "8b": dict(num_layers=32, hidden_size=4096, ffn_hidden_size=14336,
               num_attention_heads=32, num_query_groups=8, rotary_base=500_000,
               vocab_size=128256, seq_length=8192),
    # Same code path, small enough for a laptop CPU.
    "debug": dict(num_layers=2, hidden_size=128, ffn_hidden_size=384,
                  num_attention_heads=4, num_query_groups=2, vocab_size=1024,
                  seq_length=128, make_vocab_size_divisible_by=64),
}


def llama31_config(size: str = "405b", **overrides) -> run.Config[CoomLlama31Config]:
    if size not in SIZES:
        raise ValueError(f"size: {size!r} is not one of {', '.join(SIZES)}")
    return run.Config(CoomLlama31Config, **{**SIZES[size], **overrides})


def llama31_model(size: str = "405b", **overrides) -> run.Config[LlamaModel]:
    return run.Config(LlamaModel, config=llama31_config(size, **overrides))


def import_hf_checkpoint(hf_dir: str, output_dir: str) -> Path:
    """Convert a local HF Llama 3.1 checkpoint to a NeMo one
    (:func:`coom_nemo.models.llama_hf.import_from_hf`)."""
    from coom_nemo.models.llama_hf import import_from_hf

    return import_from_hf(hf_dir, output_dir)
