"""Llama 3.1 family."""

from __future__ import annotations

from dataclasses import dataclass

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
