"""Layer specs, chosen on the node that builds the model."""

from __future__ import annotations

import torch
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

from coom_nemo.models.base import has_transformer_engine


def use_transformer_engine() -> bool:
    """TE modules where TE imports and a GPU runs them."""
    return has_transformer_engine() and torch.cuda.is_available()


def layer_spec(config, vp_stage: int | None = None):
    """Block spec for any coom config: dense or MoE layers, MHA/GQA or
    MLA.

    megatron-core's decoder block spec places MoE layers by
    ``moe_layer_freq`` and honours the pipeline layout; TE modules are
    used where :func:`use_transformer_engine`, else megatron-core's
    local modules.
    """
    if getattr(config, "attention_gate", False):
        raise NotImplementedError("attention_gate: gated attention spec not available yet")
    return get_gpt_decoder_block_spec(
        config,
        use_transformer_engine=use_transformer_engine(),
        normalization=config.normalization,
        vp_stage=vp_stage,
    )
