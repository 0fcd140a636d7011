"""GPT-OSS family (OpenAI gpt-oss-20b architecture)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import nemo_run as run
from megatron.core.fusions.fused_bias_geglu import quick_gelu
from nemo.collections.llm.gpt.model.gpt_oss import GPTOSSConfig20B, GPTOSSModel

from coom_nemo.models.base import CoomConfig
from coom_nemo.models.specs import layer_spec, use_transformer_engine


@dataclass
class CoomGptOssConfig(CoomConfig, GPTOSSConfig20B):
    """GPT-OSS: MoE every layer, alternating 128-token sliding window
    and full attention, learnable attention sinks, YaRN, clamped SwiGLU.

    Two fields differ from NeMo 2.7.3's ``GPTOSSConfig`` so that the
    model computes what the released weights expect (as in transformers
    and Megatron-Bridge): the 128-token window counts the current token,
    which megatron-core writes as ``(127, 0)``; and YaRN scales cos/sin
    by ``0.1 ln(32) + 1``, which needs ``yarn_mscale_all_dim=0``.

    On a GPU, NeMo's config could not be built at all: it takes
    ``quick_gelu`` from ``megatron.core.activations``, while
    megatron/core/transformer/transformer_config.py:1203 admits
    ``bias_activation_fusion`` only for the (same) function of
    ``megatron.core.fusions.fused_bias_geglu``. The fused clamped
    quick-GEGLU exists only in TE's grouped experts
    (moe/experts.py:894); megatron-core's local MLP cannot fuse it
    (mlp.py:156), so it is off where TE is not used.
    """

    transformer_layer_spec: object = layer_spec
    window_size: tuple[int, int] | None = (127, 0)
    yarn_mscale_all_dim: float = 0.0
    activation_func: Callable = quick_gelu

    def __post_init__(self):
        if not use_transformer_engine():
            self.bias_activation_fusion = False
        # GPT-OSS routes by softmax over the top k logits (transformers'
        # modeling_gpt_oss.py:155-156), which megatron-core computes
        # with moe_router_pre_softmax=False (moe_utils.py:586-588). At
        # k=1 that weighs the one expert by 1, so the router learns
        # nothing, and megatron-core refuses it
        # (transformer_config.py:1336-1344); pre-softmax would weigh it
        # by its softmax probability instead, another model. Keep
        # GPT-OSS's function: pass the check as k=2, then route top-1.
        top1 = self.moe_router_topk == 1 and not self.moe_router_pre_softmax
        if top1:
            self.moe_router_topk = 2
        try:
            super().__post_init__()
        finally:
            if top1:
                self.moe_router_topk = 1


class CoomGptOssModel(GPTOSSModel):
    """``GPTOSSModel`` whose Hugging Face import fills this model's own
    config (size, ``attention_gate``); see
    :mod:`coom_nemo.models.gpt_oss_hf`."""

    def importer(self, path: str):
        # ConnectorMixin.importer is a class method; NeMo calls it on
        # the model (nemo/lightning/io/api.py:166), so hand the
        # connector the config to import into.
        connector = type(self)._get_connector(path, importer=True)
        connector.target_config = self.config
        return connector


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


def gpt_oss_model(size: str = "20b", **overrides) -> run.Config[CoomGptOssModel]:
    return run.Config(CoomGptOssModel, config=gpt_oss_config(size, **overrides))


# Registers the Hugging Face importer and exporter of CoomGptOssModel
# wherever the model is used (export finds it through the checkpoint).
from coom_nemo.models import gpt_oss_hf  # noqa: E402, F401
