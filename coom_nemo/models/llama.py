"""Llama 3.1 family."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import nemo_run as run
from nemo.collections.llm import LlamaModel
from nemo.collections.llm.gpt.model.llama import HFLlamaImporter, Llama31Config

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


class HFLlama31Importer(HFLlamaImporter):
    """NeMo's HF Llama importer, building a :class:`CoomLlama31Config`.

    NeMo's own builds ``Llama31Config`` with TE fusions on
    (``apply_rope_fusion``), which megatron-core refuses on a host
    without TransformerEngine; the coom config turns off what the host
    lacks, so the weights convert on any node (a CPU one included).
    """

    @property
    def config(self) -> CoomLlama31Config:
        from transformers import AutoConfig

        hf = AutoConfig.from_pretrained(str(self))
        rope = hf.rope_scaling or {}
        if rope.get("rope_type") != "llama3":
            raise ValueError(f"{self}: rope_scaling {rope} is not Llama 3.1's (rope_type llama3)")
        return CoomLlama31Config(
            num_layers=hf.num_hidden_layers, hidden_size=hf.hidden_size,
            ffn_hidden_size=hf.intermediate_size, num_attention_heads=hf.num_attention_heads,
            num_query_groups=hf.num_key_value_heads, kv_channels=getattr(hf, "head_dim", None),
            seq_length=hf.max_position_embeddings, rotary_base=hf.rope_theta,
            scale_factor=rope["factor"], low_freq_factor=rope["low_freq_factor"],
            high_freq_factor=rope["high_freq_factor"],
            old_context_len=rope["original_max_position_embeddings"],
            layernorm_epsilon=hf.rms_norm_eps, init_method_std=hf.initializer_range,
            vocab_size=hf.vocab_size,
            share_embeddings_and_output_weights=hf.tie_word_embeddings)


def import_hf_checkpoint(hf_dir: str, output_dir: str) -> Path:
    """Convert a local HF Llama 3.1 checkpoint to a NeMo one.

    ``output_dir`` (``context/`` + ``weights/``) is what a recipe's
    ``restore_path`` starts from; an existing one is never overwritten.
    """
    import torch

    from coom_nemo import cpu_mode

    output = Path(output_dir)
    if output.exists():
        raise FileExistsError(f"output_dir: {output} exists; choose a new directory")
    importer = HFLlama31Importer(str(Path(hf_dir).resolve()))
    host = contextlib.nullcontext() if torch.cuda.is_available() else cpu_mode.cpu_mode()
    with host:
        return importer(output_path=output)
