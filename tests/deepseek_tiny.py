"""Tiny DeepSeek-V3 Hugging Face checkpoints, made here (no download).

Every weight is random, norms, expert bias (``e_score_correction_bias``)
included, so that a tensor left at its initial value or mapped to the
wrong place changes the logits. The tokenizer is GPT-OSS's tiny one
(a byte-level BPE with a chat template), so fine-tuning reads the same
JSONL.
"""

from pathlib import Path

import torch
from gpt_oss_tiny import make_tokenizer

VOCAB = 384

# The debug size's shape: 16 experts in 4 groups, top-4 from 2 groups
# (k / groups = 2, where megatron-core and transformers agree), YaRN.
DEBUG_SHAPE = dict(
    hidden_size=64, intermediate_size=256, moe_intermediate_size=32, num_hidden_layers=2,
    first_k_dense_replace=1, num_attention_heads=4, n_shared_experts=1, n_routed_experts=16,
    num_experts_per_tok=4, n_group=4, topk_group=2, q_lora_rank=32, kv_lora_rank=32,
    qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16, routed_scaling_factor=2.5,
    max_position_embeddings=163840,
    rope_scaling=dict(type="yarn", factor=40, original_max_position_embeddings=4096,
                      beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0),
)

# Shapes other than the debug size's: odd head counts, no low-rank q
# (V2-Lite style), several shared experts, no dense layer, plain RoPE,
# and groups scored differently by megatron-core's default
# (k / groups = 3 or 1) than by transformers (top 2).
SHAPES = {
    "debug": DEBUG_SHAPE,
    "k6_of_2groups_lite": dict(
        hidden_size=48, intermediate_size=80, moe_intermediate_size=24, num_hidden_layers=3,
        first_k_dense_replace=1, num_attention_heads=3, n_shared_experts=2,
        n_routed_experts=12, num_experts_per_tok=6, n_group=4, topk_group=2, q_lora_rank=None,
        kv_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=12,
        routed_scaling_factor=1.5, rope_scaling=None),
    "k2_of_2groups_all_moe": dict(
        hidden_size=40, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        first_k_dense_replace=0, num_attention_heads=5, n_shared_experts=1,
        n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2, q_lora_rank=20,
        kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
        routed_scaling_factor=1.0, rope_scaling=None),
}


def make_tiny_deepseek(directory: Path, shape: str = "debug", seed: int = 0,
                       expert_bias_mean: float = 0.0) -> Path:
    """A random tiny DeepseekV3ForCausalLM (fp32) and a tokenizer.
    Scores are sigmoids in (0, 1): an ``expert_bias_mean`` of -1 makes
    many biased scores negative (where megatron-core's router and
    transformers' differ: -inf and 0 for the other groups' experts)."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    directory = Path(directory)
    fields = SHAPES[shape]
    config = DeepseekV3Config(vocab_size=VOCAB, num_key_value_heads=fields["num_attention_heads"],
                              dtype="float32", eos_token_id=0, bos_token_id=0, pad_token_id=0,
                              **fields)
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(config).float()
    with torch.no_grad():  # buffers too: the expert bias is one
        for name, tensor in model.state_dict().items():
            if name.endswith("norm.weight"):
                tensor.copy_(1 + 0.2 * torch.randn_like(tensor))
            elif name.endswith("e_score_correction_bias"):
                tensor.normal_(expert_bias_mean, 0.1 + abs(expert_bias_mean))
            else:
                tensor.normal_(0.0, 0.15)
    model.save_pretrained(directory)
    make_tokenizer(directory, vocab_size=VOCAB)
    return directory


def hf_logits(directory: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import DeepseekV3ForCausalLM

    model = DeepseekV3ForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                  attn_implementation="eager").eval()
    with torch.no_grad():
        return model(tokens).logits
