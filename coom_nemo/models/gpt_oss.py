"""GPT-OSS family."""

from __future__ import annotations

from dataclasses import dataclass

import nemo_run as run
from nemo.collections.llm.gpt.model.gpt_oss import GPTOSSConfig20B, GPTOSSModel

from coom_nemo.models.base import CoomConfig
from coom_nemo.models.specs import layer_spec


@dataclass
class CoomGptOssConfig(CoomConfig, GPTOSSConfig20B):
    """GPT-OSS: MoE every layer, alternating 128-token sliding window
    and
    full attention, learnable attention sinks, YaRN, clamped SwiGLU."""

    transformer_layer_spec: object = layer_spec


SIZES = {
    "20b": dict(seq_length=4096),
    "debug": dict(num_layers=2, hidden_size=128, ffn_hidden_size=128, moe_ffn_hidden_size=128,
                  num_attention_heads=4, num_query_groups=2, kv_channels=32,
                  num_moe_experts=4, moe_router_topk=2, vocab_size=1024,
                  make_vocab_size_divisible_by=64, seq_length=128, window_size=(16, 0),
                  yarn_original_max_position_embeddings=128),
}


def gpt_oss_config(size: str = "20b", **overrides) -> run.Config[CoomGptOssConfig]:
    if size not in SIZES:
        raise ValueError(f"size: {size!r} is not one of {', '.join(SIZES)}")
    return run.Config(CoomGptOssConfig, **{**SIZES[size], **overrides})


def gpt_oss_model(size: str = "20b", **overrides) -> run.Config[GPTOSSModel]:
    return run.Config(GPTOSSModel, config=gpt_oss_config(size, **overrides))
