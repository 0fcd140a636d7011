"""Layer specs, chosen on the node that builds the model."""

from __future__ import annotations

import torch
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer.dot_product_attention import DotProductAttention

from coom_nemo.models import sdpa
from coom_nemo.models.base import has_transformer_engine


def use_transformer_engine() -> bool:
    """TE modules where TE imports and a GPU runs them."""
    return has_transformer_engine() and torch.cuda.is_available()


class LocalMLACoreAttention(DotProductAttention):
    """megatron-core's local core attention, usable by MLA.

    MLA builds its core attention with ``k_channels``/``v_channels``
    (megatron/core/transformer/multi_latent_attention.py:151-162), which
    only TE's attention accepts; MLA also passes its own softmax scale.
    The only width that differs is the output: heads x ``v_channels``.
    """

    def __init__(self, *args, k_channels=None, v_channels=None, **kwargs):
        super().__init__(*args, **kwargs)
        if v_channels is not None:
            self.hidden_size_per_partition = v_channels * self.num_attention_heads_per_partition


def _bind_missing_te_names() -> None:
    """megatron/core/transformer/moe/moe_utils.py:958 reads
    ``te_general_gemm``, bound only when TE imports (NameError once
    ``moe_router_dtype`` is set); None selects its torch path."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def layer_spec(config, vp_stage: int | None = None):
    """Block spec for any coom config: dense or MoE, MHA/GQA or MLA.

    megatron-core's decoder block spec places MoE layers by
    ``moe_layer_freq`` and honours the pipeline layout; TE modules are
    used where :func:`use_transformer_engine`, else megatron-core's
    local modules, with SDPA core attention where :func:`sdpa.usable`
    (else megatron-core's, or :class:`LocalMLACoreAttention` for MLA).
    """
    if getattr(config, "attention_gate", False):
        raise NotImplementedError("attention_gate: gated attention spec not available yet")
    te = use_transformer_engine()
    block = get_gpt_decoder_block_spec(config, use_transformer_engine=te,
                                       normalization=config.normalization, vp_stage=vp_stage)
    if not te:
        _bind_missing_te_names()
        core = _core_attention_without_te(config)
        for layer in block.layer_specs:
            layer.submodules.self_attention.submodules.core_attention = core
    return block


def _core_attention_without_te(config):
    if sdpa.usable(config):
        return sdpa.SDPACoreAttention
    if getattr(config, "multi_latent_attention", False):
        return LocalMLACoreAttention
    return DotProductAttention
