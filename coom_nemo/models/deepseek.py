"""DeepSeek-V3-style MoE family (MLA, MTP, sigmoid routing)."""

from __future__ import annotations

from dataclasses import dataclass

import nemo_run as run
from nemo.collections.llm.gpt.model.deepseek import DeepSeekModel, DeepSeekV3Config

from coom_nemo.models.base import CoomConfig
from coom_nemo.models.specs import layer_spec


@dataclass
class CoomDeepSeekConfig(CoomConfig, DeepSeekV3Config):
    """DeepSeek-V3 architecture: MLA, shared + fine-grained routed
    experts,
    sigmoid router with expert bias, optional multi-token prediction."""

    transformer_layer_spec: object = layer_spec


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


def deepseek_model(size: str = "16b", **overrides) -> run.Config[DeepSeekModel]:
    return run.Config(DeepSeekModel, config=deepseek_config(size, **overrides))
