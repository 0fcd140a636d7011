"""DeepSeek-V3-style MoE family (MLA, MTP, sigmoid routing), and its
HuggingFace importer."""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from functools import cached_property

import nemo_run as run
from nemo.collections.llm.gpt.model.deepseek import (
    DeepSeekModel,
    DeepSeekV3Config,
    HFDeepSeekImporter,
)
from nemo.lightning import io
from nemo.lightning.io.state import TransformFns

from coom_nemo.models.base import CoomConfig
from coom_nemo.models.specs import layer_spec


@dataclass
class CoomDeepSeekConfig(CoomConfig, DeepSeekV3Config):
    """DeepSeek-V3 architecture: MLA, shared + fine-grained routed
    experts, sigmoid router with group-limited routing, aux-loss-free
    expert bias plus a sequence-wise aux loss, optional multi-token
    prediction (MTP) and token dropping (capacity factor)."""

    transformer_layer_spec: object = layer_spec


class CoomDeepSeekModel(DeepSeekModel):
    """``DeepSeekModel`` whose HF importer builds a
    :class:`CoomDeepSeekConfig` (so an import runs without TE)."""


SIZES = {
    # ~16B total / ~2.5B active: DeepSeek-V2-Lite widths (first layer
    # dense, 2 shared + 64 routed experts, top-6) with V3 routing:
    # sigmoid scores, expert bias, and at most 3 of 8 expert groups per
    # token (one group per EP8 rank: device-limited routing).
    "16b": dict(num_layers=27, hidden_size=2048, ffn_hidden_size=10944,
                num_attention_heads=16, q_lora_rank=None, kv_lora_rank=512,
                qk_head_dim=128, qk_pos_emb_head_dim=64, v_head_dim=128,
                num_moe_experts=64, moe_ffn_hidden_size=1408,
                moe_shared_expert_intermediate_size=2816, moe_router_topk=6,
                moe_router_num_groups=8, moe_router_group_topk=3,
                moe_layer_freq=[0] + [1] * 26, vocab_size=102400, seq_length=4096,
                mtp_num_layers=1, mtp_loss_scaling_factor=0.1),
    "v3": dict(vocab_size=129280, seq_length=4096, mtp_num_layers=1,
               mtp_loss_scaling_factor=0.1),
    # V3's router in small: 16 experts in 4 groups, top-4 from the best
    # 2 groups (a group scores by its top 2).
    "debug": dict(num_layers=2, hidden_size=64, ffn_hidden_size=256, num_attention_heads=4,
                  q_lora_rank=32, kv_lora_rank=32, qk_head_dim=16, qk_pos_emb_head_dim=8,
                  v_head_dim=16, kv_channels=16, num_moe_experts=16, moe_ffn_hidden_size=32,
                  moe_shared_expert_intermediate_size=32, moe_router_topk=4,
                  moe_router_num_groups=4, moe_router_group_topk=2, moe_layer_freq=[0, 1],
                  vocab_size=1024, make_vocab_size_divisible_by=64, seq_length=128,
                  mtp_num_layers=1, mtp_loss_scaling_factor=0.1),
}


def deepseek_config(size: str = "16b", **overrides) -> run.Config[CoomDeepSeekConfig]:
    if size not in SIZES:
        raise ValueError(f"size: {size!r} is not one of {', '.join(SIZES)}")
    return run.Config(CoomDeepSeekConfig, **{**SIZES[size], **overrides})


def deepseek_model(size: str = "16b", **overrides) -> run.Config[CoomDeepSeekModel]:
    return run.Config(CoomDeepSeekModel, config=deepseek_config(size, **overrides))


@io.model_importer(CoomDeepSeekModel, ext="hf")
class HFCoomDeepSeekImporter(HFDeepSeekImporter):
    """Import a DeepSeek-V3 checkpoint in HF format (``config.json`` +
    safetensors, as transformers' ``DeepseekV3ForCausalLM`` saves it).

    NeMo's importer reads fields only DeepSeek's remote code defines
    (``scoring_func``), keeps V3's YaRN defaults whatever the checkpoint
    says, and maps routed experts to TE's grouped layout only. This one
    reads transformers' config, RoPE included, builds our config, and
    also maps megatron-core's local experts (hosts without TE). MTP
    weights are not imported (transformers' model holds none).
    """

    def init(self) -> CoomDeepSeekModel:
        return CoomDeepSeekModel(self.config, tokenizer=self.tokenizer)

    @cached_property
    def config(self) -> CoomDeepSeekConfig:
        from transformers import AutoConfig

        return CoomDeepSeekConfig(**config_from_hf(AutoConfig.from_pretrained(str(self))))

    def convert_state(self, source, target):
        layer = target.module.decoder.layers[-1]
        if not hasattr(layer.mlp.experts, "local_experts"):
            return super().convert_state(source, target)  # TE grouped experts
        # map what the checkpoint holds (no q_proj where q is low-rank);
        # apply_transforms still fails on any weight left unfilled
        keys = list(source.state_dict())
        mapping = {hf: mcore for hf, mcore in _LOCAL_SPEC_MAPPING.items()
                   if fnmatch.filter(keys, hf)}
        merges = [t for t in _LOCAL_SPEC_MERGES if fnmatch.filter(keys, t.source_key[0])]
        return io.apply_transforms(source, target, mapping=mapping, transforms=merges)


def config_from_hf(hf) -> dict:
    """:class:`CoomDeepSeekConfig` fields of a transformers
    ``DeepseekV3Config``."""
    import torch

    if hf.model_type != "deepseek_v3":
        raise ValueError(f"config.json: model_type {hf.model_type!r} is not 'deepseek_v3'; "
                         "this importer reads DeepSeek-V3 checkpoints only")
    if not getattr(hf, "norm_topk_prob", True):
        raise ValueError("config.json: norm_topk_prob=false is not supported; megatron-core's "
                         "sigmoid router always normalizes the top-k weights")
    dense = hf.first_k_dense_replace
    dtype = getattr(hf, "dtype", None) or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    scaling = hf.rope_scaling or {}
    config = dict(
        num_layers=hf.num_hidden_layers, hidden_size=hf.hidden_size,
        ffn_hidden_size=hf.intermediate_size, num_attention_heads=hf.num_attention_heads,
        q_lora_rank=hf.q_lora_rank, kv_lora_rank=hf.kv_lora_rank,
        qk_head_dim=hf.qk_nope_head_dim, qk_pos_emb_head_dim=hf.qk_rope_head_dim,
        v_head_dim=hf.v_head_dim, num_moe_experts=hf.n_routed_experts,
        moe_ffn_hidden_size=hf.moe_intermediate_size,
        moe_shared_expert_intermediate_size=hf.moe_intermediate_size * hf.n_shared_experts,
        moe_layer_freq=[0] * dense + [1] * (hf.num_hidden_layers - dense),
        moe_router_topk=hf.num_experts_per_tok, moe_router_num_groups=hf.n_group,
        moe_router_group_topk=hf.topk_group,
        moe_router_topk_scaling_factor=hf.routed_scaling_factor,
        mtp_num_layers=None, mtp_loss_scaling_factor=None,
        vocab_size=hf.vocab_size,
        # pad nothing: the HF embedding has exactly vocab_size rows
        make_vocab_size_divisible_by=math.gcd(hf.vocab_size, 128),
        layernorm_epsilon=hf.rms_norm_eps, rotary_base=hf.rope_theta,
        max_position_embeddings=hf.max_position_embeddings,
        params_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
    )
    if scaling.get("type", scaling.get("rope_type")) != "yarn":
        # mscale_all_dim=0: MLA's softmax scale stays 1/sqrt(head dim)
        return {**config, "rope_type": "rope", "mscale_all_dim": 0.0}
    return {**config, "rope_type": "yarn", "rotary_scaling_factor": scaling["factor"],
            "original_max_position_embeddings": scaling["original_max_position_embeddings"],
            "beta_fast": scaling.get("beta_fast", 32), "beta_slow": scaling.get("beta_slow", 1),
            "mscale": scaling.get("mscale", 1.0),
            "mscale_all_dim": scaling.get("mscale_all_dim", 0.0)}


# HF DeepSeek-V3 names -> megatron-core local-spec names (norms are
# separate modules there, routed experts are SequentialMLP's
# local_experts).
_LOCAL_SPEC_MAPPING = {
    "model.embed_tokens.weight": "embedding.word_embeddings.weight",
    "model.norm.weight": "decoder.final_layernorm.weight",
    "lm_head.weight": "output_layer.weight",
    "**.input_layernorm.weight": "**.input_layernorm.weight",
    "**.post_attention_layernorm.weight": "**.pre_mlp_layernorm.weight",
    "**.self_attn.q_proj.weight": "**.self_attention.linear_q_proj.weight",
    "**.self_attn.q_a_proj.weight": "**.self_attention.linear_q_down_proj.weight",
    "**.self_attn.q_a_layernorm.weight": "**.self_attention.q_layernorm.weight",
    "**.self_attn.q_b_proj.weight": "**.self_attention.linear_q_up_proj.weight",
    "**.self_attn.kv_a_proj_with_mqa.weight": "**.self_attention.linear_kv_down_proj.weight",
    "**.self_attn.kv_a_layernorm.weight": "**.self_attention.kv_layernorm.weight",
    "**.self_attn.kv_b_proj.weight": "**.self_attention.linear_kv_up_proj.weight",
    "**.self_attn.o_proj.weight": "**.self_attention.linear_proj.weight",
    "**.mlp.down_proj.weight": "**.mlp.linear_fc2.weight",
    "**.mlp.gate.weight": "**.mlp.router.weight",
    "**.mlp.gate.e_score_correction_bias": "**.mlp.router.expert_bias",
    "**.mlp.experts.*.down_proj.weight": "**.mlp.experts.local_experts.*.linear_fc2.weight",
    "**.mlp.shared_experts.down_proj.weight": "**.mlp.shared_experts.linear_fc2.weight",
}

_LOCAL_SPEC_MERGES = [
    io.state_transform(source_key=(f"**.{hf}gate_proj.weight", f"**.{hf}up_proj.weight"),
                       target_key=f"**.{mcore}linear_fc1.weight", fn=TransformFns.merge_fc1)
    for hf, mcore in (("mlp.", "mlp."), ("mlp.experts.*.", "mlp.experts.local_experts.*."),
                      ("mlp.shared_experts.", "mlp.shared_experts."))
]
