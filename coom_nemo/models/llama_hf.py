"""Llama 3.1 checkpoints between Hugging Face and coom NeMo.

:func:`import_from_hf` turns a local ``LlamaForCausalLM`` directory
into a NeMo checkpoint of a :class:`CoomLlama31Config` model;
:func:`export_to_hf` writes one back. Both read :data:`MAPPINGS`, one
table of HF <-> megatron-core names for the TransformerEngine and the
local layer spec alike, and check by name and count that every tensor
was converted (:mod:`coom_nemo.models.conversion`).

NeMo 2.7.3's own importer (nemo/collections/llm/gpt/model/llama.py,
``HFLlamaImporter.convert_state``) names the per-layer RMSNorm weights
only as TE fuses them (``linear_qkv.layer_norm_weight``); on a host
without TE they stayed at 1.0, with one "No matches found" warning.
"""

from __future__ import annotations

import math
from functools import cached_property
from pathlib import Path

import torch
from nemo.collections.llm.gpt.model.llama import HFLlamaExporter, HFLlamaImporter

from coom_nemo.models.conversion import (
    TableExporter,
    TableImporter,
    nemo_checkpoint,
    new_output,
    on_this_host,
)
from coom_nemo.models.hf_mapping import (
    COMMON,
    FUSED_MLP_NORM,
    HF_LAYER,
    LAYER,
    O_PROJ,
    gated_mlp,
    gqa_attention,
)
from coom_nemo.models.llama import CoomLlama31Config

# the TE spec fuses each norm into the linear after it
MAPPINGS = COMMON + gqa_attention() + [
    FUSED_MLP_NORM, O_PROJ, *gated_mlp(LAYER + "mlp.", HF_LAYER + "mlp.")]


def mappings(config) -> list:
    return MAPPINGS


def config_from_hf(hf, dtype: torch.dtype | None = None) -> CoomLlama31Config:
    """The coom config of transformers' ``LlamaConfig`` (Llama 3.1
    RoPE scaling required); anything else is refused in one line."""
    rope = hf.rope_scaling or {}
    if rope.get("rope_type", rope.get("type")) != "llama3":
        raise ValueError(f"rope_scaling: {rope or None} is not Llama 3.1's; give a checkpoint "
                         "with rope_scaling.rope_type 'llama3'")
    for field in ("attention_bias", "mlp_bias"):
        if getattr(hf, field, False):
            raise ValueError(f"{field}: Llama 3.1 has no biases and this importer maps none; "
                             "give a checkpoint with it false")
    if getattr(hf, "hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act: {hf.hidden_act!r} is not Llama's SwiGLU ('silu')")
    dtype = dtype or (hf.dtype if isinstance(hf.dtype, torch.dtype) else torch.bfloat16)
    vocab = hf.vocab_size
    return CoomLlama31Config(
        num_layers=hf.num_hidden_layers, hidden_size=hf.hidden_size,
        ffn_hidden_size=hf.intermediate_size, num_attention_heads=hf.num_attention_heads,
        num_query_groups=hf.num_key_value_heads,
        kv_channels=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
        seq_length=hf.max_position_embeddings, rotary_base=hf.rope_theta,
        scale_factor=rope["factor"], low_freq_factor=rope["low_freq_factor"],
        high_freq_factor=rope["high_freq_factor"],
        old_context_len=rope["original_max_position_embeddings"],
        layernorm_epsilon=hf.rms_norm_eps, init_method_std=hf.initializer_range,
        vocab_size=vocab, make_vocab_size_divisible_by=math.gcd(vocab, 128),
        share_embeddings_and_output_weights=hf.tie_word_embeddings,
        params_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16)


def hf_config_from(cfg, tokenizer=None):
    """transformers ``LlamaConfig`` of a coom Llama 3.1 config."""
    from transformers import LlamaConfig

    special = {}
    for name in ("bos", "eos", "pad"):
        token_id = getattr(tokenizer, f"{name}_token_id", None)
        if isinstance(token_id, int):
            special[f"{name}_token_id"] = token_id
    heads = cfg.num_attention_heads
    return LlamaConfig(
        num_hidden_layers=cfg.num_layers, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_hidden_size, num_attention_heads=heads,
        num_key_value_heads=cfg.num_query_groups or heads,
        head_dim=cfg.kv_channels or cfg.hidden_size // heads,
        max_position_embeddings=cfg.seq_length, rms_norm_eps=cfg.layernorm_epsilon,
        initializer_range=cfg.init_method_std, rope_theta=cfg.rotary_base,
        rope_scaling={"rope_type": "llama3", "factor": cfg.scale_factor,
                      "low_freq_factor": cfg.low_freq_factor,
                      "high_freq_factor": cfg.high_freq_factor,
                      "original_max_position_embeddings": cfg.old_context_len},
        vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.share_embeddings_and_output_weights,
        dtype=cfg.params_dtype, **special)


class HFLlama31Importer(TableImporter, HFLlamaImporter):
    """HF Llama 3.1 -> NeMo checkpoint of a :class:`CoomLlama31Config`
    model, whose config turns off fusions this host lacks (NeMo's own
    builds ``Llama31Config`` with TE's RoPE fusion on, refused without
    TE), converted through :data:`MAPPINGS`."""

    mappings = staticmethod(mappings)

    @cached_property
    def config(self) -> CoomLlama31Config:
        from transformers import AutoConfig

        return config_from_hf(AutoConfig.from_pretrained(str(self)))


class HFLlama31Exporter(TableExporter, HFLlamaExporter):
    """NeMo Llama 3.1 checkpoint -> transformers ``LlamaForCausalLM``
    (plus its tokenizer when it has a HF one)."""

    mappings = staticmethod(mappings)
    hf_config_of = staticmethod(hf_config_from)

    @cached_property
    def config(self):
        return hf_config_from(self.nemo_config, getattr(self.tokenizer, "tokenizer", None))


def import_from_hf(hf_dir, output_path) -> Path:
    """Import a local HF Llama 3.1 directory as a NeMo checkpoint
    (``context/`` + ``weights/``), what fine-tuning and pretraining
    recipes' ``restore_path`` starts from."""
    source = Path(hf_dir)
    if not (source / "config.json").is_file():
        raise FileNotFoundError(f"hf_dir: {source}/config.json does not exist; give the "
                                "directory of a Hugging Face Llama checkpoint")
    output = new_output(output_path)
    importer = HFLlama31Importer(str(source.resolve()))
    _ = importer.config  # a foreign config is refused before anything is written
    with on_this_host():
        return importer(output_path=output)


def export_to_hf(checkpoint, output_path) -> Path:
    """Write a NeMo Llama 3.1 checkpoint as a HF directory."""
    source = nemo_checkpoint(checkpoint)
    output = new_output(output_path)
    with on_this_host():
        return HFLlama31Exporter(str(source.resolve()))(output_path=output)
