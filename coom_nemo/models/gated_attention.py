"""Gated attention (Qiu et al., 2025, "Gated Attention for Large
Language Models"), for megatron-core's standard attention and MLA.

Each layer gets a head-specific, query-dependent sigmoid gate, computed
from the attention block's input ``x`` (after the input norm), that
multiplies each head's attention output elementwise before the output
projection::

    out = linear_proj(attention(x) * sigmoid(x @ W_gate.T))

``W_gate`` (``self_attention.linear_gate.weight``, no bias) is a
column-parallel linear ``hidden -> heads * head_dim_v``: under tensor
parallelism a rank holds the gate columns of exactly the heads it
computes. Switched on by ``attention_gate=True`` on any coom config;
:func:`gate_layer` rewrites a layer spec, so it works with TE modules,
local modules, GQA, sliding windows, attention sinks and MLA.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.multi_latent_attention import MLASelfAttention
from megatron.core.transformer.spec_utils import ModuleSpec, build_module


class _OutputGate:
    """Mixin for an attention module: gate the core attention output."""

    def _init_gate(self, gate_linear) -> None:
        # heads x value width, the layout of core attention's output
        self.linear_gate = build_module(
            gate_linear,
            self.config.hidden_size,
            self.query_projection_size,
            config=self.config,
            init_method=self.config.init_method,
            gather_output=False,
            bias=False,
            skip_bias_add=False,
            is_expert=False,
            tp_comm_buffer_name="gate",
        )
        self._gate_logits = None
        # megatron-core calls linear_proj(core_attn_out) in every
        # forward path; gating its input leaves those paths untouched.
        self.linear_proj.register_forward_pre_hook(self._gate_projection_input)

    def _gate_projection_input(self, module, args):
        if self._gate_logits is None:
            return None
        return (args[0] * torch.sigmoid(self._gate_logits), *args[1:])

    def forward(self, hidden_states, *args, **kwargs):
        self._gate_logits, _ = self.linear_gate(hidden_states)
        try:
            return super().forward(hidden_states, *args, **kwargs)
        finally:
            self._gate_logits = None


class GatedSelfAttention(_OutputGate, SelfAttention):
    """``SelfAttention`` (MHA/GQA, windows, sinks), output gated."""

    def __init__(self, *args, gate_linear=ColumnParallelLinear, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_gate(gate_linear)


class GatedMLASelfAttention(_OutputGate, MLASelfAttention):
    """Multi-latent attention, each head's output gated."""

    def __init__(self, *args, gate_linear=ColumnParallelLinear, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_gate(gate_linear)


_GATED = {SelfAttention: GatedSelfAttention, MLASelfAttention: GatedMLASelfAttention}


def gate_layer(layer: ModuleSpec, use_transformer_engine: bool) -> None:
    """Give one transformer layer spec the gated attention, in place.

    Idempotent: a block spec may share one layer spec between layers.
    """
    attention = layer.submodules.self_attention
    if attention.module in _GATED.values():
        return
    if attention.module not in _GATED:
        raise ValueError(f"attention_gate: no gated version of {attention.module.__name__}")
    attention.module = _GATED[attention.module]
    gate_linear = ColumnParallelLinear
    if use_transformer_engine:
        from megatron.core.extensions.transformer_engine import (
            TEColumnParallelLinear,
            TELayerNormColumnParallelLinear,
            TENorm,
        )

        gate_linear = TEColumnParallelLinear
        if getattr(attention.submodules, "linear_qkv", None) is TELayerNormColumnParallelLinear:
            # The gate must see the normalized input too: unfuse the
            # norm from the QKV projection so attention receives it.
            attention.submodules.linear_qkv = TEColumnParallelLinear
            layer.submodules.input_layernorm = TENorm
    attention.params = {**attention.params, "gate_linear": gate_linear}
