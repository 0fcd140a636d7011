"""Layer specs, chosen on the node that builds the model."""

from __future__ import annotations

import functools

import torch
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.tensor_parallel import RowParallelLinear
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.moe.experts import SequentialMLP

from coom_nemo.models import sdpa
from coom_nemo.models.base import has_transformer_engine
from coom_nemo.models.gated_attention import gate_layer


def use_transformer_engine() -> bool:
    """TE modules where TE imports and a GPU runs them."""
    return has_transformer_engine() and torch.cuda.is_available()


class LocalCoreAttention(DotProductAttention):
    """megatron-core's local core attention with its sinks initialised.

    megatron/core/transformer/dot_product_attention.py:120-128 makes the
    learnable softmax offset (GPT-OSS attention sinks) with
    ``torch.empty`` and nothing initialises it: garbage such as 1e18
    silences whole heads. Start it at 0, as TransformerEngine does.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if isinstance(self.softmax_offset, torch.nn.Parameter):
            with torch.no_grad():
                self.softmax_offset.zero_()


class LocalMLACoreAttention(LocalCoreAttention):
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


class LocalExpertRowParallelLinear(RowParallelLinear):
    """megatron-core's local ``linear_fc2`` for experts with a bias.

    With EP=1 and expert TP=1, RowParallelLinear sends its output
    through a no-op all-reduce Function that returns its input, a view;
    megatron/core/transformer/mlp.py:231 then adds the expert bias in
    place, which autograd refuses ("Output 0 of
    _ReduceFromModelParallelRegion is a view"). Experts leave that
    communication to the token dispatcher, as they do for EP > 1 (and
    shared_experts.py:100 sets the same flag), so mark it explicit.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.explicit_expert_comm = self.is_expert


class StatelessExtraState:
    """For megatron-core's TE grouped linears (the experts): checkpoints
    under FP8 recipes that keep no state (current scaling, blockwise).

    TE 2.20 writes "no FP8 state" as an empty tensor; megatron-core
    0.15.3 decodes it as FP8 metadata whenever FP8 runs and fails in
    the save ("'NoneType' object is not subscriptable",
    megatron/core/extensions/transformer_engine.py:1302-1310; seen on
    an H100, 2026-12-07). Each expert gets the empty state instead, as
    Megatron-LM's later fix (PR #6509) does."""

    def _split_extra_state(self, state):
        if isinstance(state, torch.Tensor) and state.numel() == 0:
            return [state] * self.num_gemms
        return super()._split_extra_state(state)


@functools.cache
def with_stateless_extra_state(cls: type) -> type:
    """``cls``, a TE grouped linear, with the fix above."""
    return type(cls.__name__, (StatelessExtraState, cls), {"__module__": __name__})


def _grouped_experts_with_stateless_state(experts) -> None:
    for name in ("linear_fc1", "linear_fc2"):
        linear = getattr(experts.submodules, name, None)
        if (isinstance(linear, type) and hasattr(linear, "_split_extra_state")
                and not issubclass(linear, StatelessExtraState)):
            setattr(experts.submodules, name, with_stateless_extra_state(linear))


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
    local modules with the fixes above (expert biases, sinks, MLA;
    with TE, the experts' checkpoint state) and SDPA core attention
    where :func:`sdpa.usable` (with TE too, where the config asks for
    ``sdpa_with_te``).
    ``attention_gate`` swaps in gated attention (``gated_attention``).
    """
    te = use_transformer_engine()
    block = get_gpt_decoder_block_spec(config, use_transformer_engine=te,
                                       normalization=config.normalization, vp_stage=vp_stage)
    if not te:
        _bind_missing_te_names()
        core = _core_attention_without_te(config)
    elif getattr(config, "sdpa_with_te", False) and sdpa.usable(config):
        core = sdpa.SDPACoreAttention
    else:
        core = None  # TE's own
    for layer in block.layer_specs:
        if core is not None:
            layer.submodules.self_attention.submodules.core_attention = core
        experts = getattr(layer.submodules.mlp.submodules, "experts", None)
        if experts is not None and te:
            _grouped_experts_with_stateless_state(experts)
        elif experts is not None and experts.module is SequentialMLP:
            experts.submodules.linear_fc2 = LocalExpertRowParallelLinear
        if getattr(config, "attention_gate", False):
            gate_layer(layer, use_transformer_engine=te)
    return block


def _core_attention_without_te(config):
    if sdpa.usable(config):
        return sdpa.SDPACoreAttention
    if getattr(config, "multi_latent_attention", False):
        return LocalMLACoreAttention
    return LocalCoreAttention
