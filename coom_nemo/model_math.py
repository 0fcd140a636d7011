"""Parameter, FLOP and KV-cache arithmetic from a transformer config.

Works on any object with megatron-core ``TransformerConfig`` field names
(a built NeMo config, or a plain namespace in tests), so a 405B or 671B
plan can be checked without allocating a single weight.

Model FLOPs (``model_flops_per_token``) follow the usual convention:
training costs 3 passes (forward + 2x backward) of 2 FLOPs per
multiply-add, so ``6 * active matmul parameters`` per token, plus causal
self-attention: per layer, ``QK^T`` and ``AV`` each cost
``2 * context * heads * head_dim`` per token, and a causal mask halves
the context to ``seq / 2`` (a sliding window caps it at the window).
Activation recompute is not counted (model FLOPs, not hardware FLOPs).
"""

from __future__ import annotations

from dataclasses import dataclass


def _get(cfg, name, default=None):
    value = getattr(cfg, name, default)
    return default if value is None else value


def padded_vocab_size(cfg, tensor_parallel: int = 1) -> int:
    """Vocabulary rows as megatron-core allocates them."""
    vocab = int(_get(cfg, "vocab_size", 0))
    multiple = int(_get(cfg, "make_vocab_size_divisible_by", 128)) * tensor_parallel
    if not getattr(cfg, "should_pad_vocab", True) or multiple <= 1:
        return vocab
    return -(-vocab // multiple) * multiple


def is_moe_layer(cfg, layer: int) -> bool:
    """Whether layer ``layer`` (from 0) has experts."""
    if not _get(cfg, "num_moe_experts", 0):
        return False
    freq = _get(cfg, "moe_layer_freq", 1)
    if isinstance(freq, int):
        return layer % freq == 0
    return bool(list(freq)[layer])


def _window(cfg, layer: int):
    """Sliding-window size of a layer, or None for full attention."""
    window = _get(cfg, "window_size")
    if not window:
        return None
    skip = _get(cfg, "window_attn_skip_freq")
    if isinstance(skip, int) and skip > 0 and (layer + 1) % skip == 0:
        return None
    if isinstance(skip, (list, tuple)) and not skip[layer]:
        return None
    return int(window[0])


@dataclass(frozen=True)
class AttentionShape:
    params: int
    qk_dim: int  # per-head query/key width
    v_dim: int  # per-head value width
    heads: int


def attention_shape(cfg) -> AttentionShape:
    h = int(cfg.hidden_size)
    heads = int(cfg.num_attention_heads)
    bias = bool(_get(cfg, "add_bias_linear", False))
    if _get(cfg, "multi_latent_attention", False):
        qk_head = int(cfg.qk_head_dim)
        rope = int(cfg.qk_pos_emb_head_dim)
        v_head = int(cfg.v_head_dim)
        q_lora = _get(cfg, "q_lora_rank")
        kv_lora = int(cfg.kv_lora_rank)
        q_width = heads * (qk_head + rope)
        if q_lora:
            q = h * q_lora + q_lora + q_lora * q_width  # down, norm, up
        else:
            q = h * q_width
        kv = h * (kv_lora + rope) + kv_lora + kv_lora * heads * (qk_head + v_head)
        out = heads * v_head * h + (h if bias else 0)
        params = q + kv + out
        qk_dim, v_dim = qk_head + rope, v_head
    else:
        head = int(_get(cfg, "kv_channels") or h // heads)
        groups = int(_get(cfg, "num_query_groups") or heads)
        qkv_width = (heads + 2 * groups) * head
        qkv_bias = bool(_get(cfg, "add_qkv_bias", False)) or bias
        params = h * qkv_width + (qkv_width if qkv_bias else 0)
        params += heads * head * h + (h if bias else 0)
        if _get(cfg, "qk_layernorm", False):
            params += 2 * head
        qk_dim = v_dim = head
    if _get(cfg, "softmax_type", "vanilla") == "learnable":
        params += heads  # one learnable sink logit per head
    params += attention_gate_params(cfg, heads * v_dim)
    return AttentionShape(params=params, qk_dim=qk_dim, v_dim=v_dim, heads=heads)


def attention_gate_params(cfg, gated_width: int) -> int:
    """Weights of the gated-attention projection (Qiu et al., 2025).

    The gate is a linear map of the block input to one sigmoid per
    element of the attention output (elementwise, head-specific).
    """
    if not _get(cfg, "attention_gate", False):
        return 0
    return int(cfg.hidden_size) * gated_width


def _mlp_params(cfg, ffn: int) -> int:
    h = int(cfg.hidden_size)
    up = 2 * ffn if _get(cfg, "gated_linear_unit", False) else ffn
    params = h * up + ffn * h
    if _get(cfg, "add_bias_linear", False):
        params += up + h
    return params


def _norm_params(cfg) -> int:
    h = int(cfg.hidden_size)
    return h if _get(cfg, "normalization", "LayerNorm") == "RMSNorm" else 2 * h


@dataclass(frozen=True)
class ParamCount:
    """Parameter totals.

    ``active`` counts the weights one token multiplies through: routed
    experts only top-k, the output layer, but not the input embedding
    table (a lookup, one row per token), as model cards count it.
    """

    total: int
    active: int
    embedding: int  # input embedding + untied output layer
    routed_experts: int = 0  # all routed-expert weights (EP shards these)


def _layer_params(cfg, layer: int) -> tuple[int, int, int]:
    """(total, active, routed-expert) parameters of one layer."""
    attn = attention_shape(cfg).params + _norm_params(cfg)
    h = int(cfg.hidden_size)
    if not is_moe_layer(cfg, layer):
        mlp = _mlp_params(cfg, int(cfg.ffn_hidden_size)) + _norm_params(cfg)
        return attn + mlp, attn + mlp, 0
    experts = int(cfg.num_moe_experts)
    topk = int(_get(cfg, "moe_router_topk", 2))
    expert = _mlp_params(cfg, int(_get(cfg, "moe_ffn_hidden_size") or cfg.ffn_hidden_size))
    shared_width = int(_get(cfg, "moe_shared_expert_intermediate_size", 0))
    shared = _mlp_params(cfg, shared_width) if shared_width else 0
    router = h * experts + (experts if _get(cfg, "add_bias_linear", False) else 0)
    fixed = attn + _norm_params(cfg) + router + shared
    return fixed + experts * expert, fixed + topk * expert, experts * expert


def count_params(cfg, tensor_parallel: int = 1) -> ParamCount:
    """Total and active parameters, as megatron-core would allocate."""
    h = int(cfg.hidden_size)
    layers = int(cfg.num_layers)
    total = active = routed = 0
    for layer in range(layers):
        t, a, r = _layer_params(cfg, layer)
        total, active, routed = total + t, active + a, routed + r
    output_layer = padded_vocab_size(cfg, tensor_parallel) * h
    tied = _get(cfg, "share_embeddings_and_output_weights", False)
    embedding = output_layer if tied else 2 * output_layer
    final_norm = _norm_params(cfg)
    mtp_total = mtp_active = 0
    for _ in range(int(_get(cfg, "mtp_num_layers", 0))):
        # enorm + hnorm + eh_proj (2h -> h) + one transformer layer +
        # norm
        t, a, r = _layer_params(cfg, layers - 1)
        extra = 3 * _norm_params(cfg) + 2 * h * h
        mtp_total, mtp_active = mtp_total + t + extra, mtp_active + a + extra
        routed += r
    total += embedding + final_norm + mtp_total
    active += output_layer + final_norm + mtp_active
    return ParamCount(total=total, active=active, embedding=embedding, routed_experts=routed)


def model_flops_per_token(cfg, seq_length: int | None = None) -> float:
    """Training model FLOPs per token (see module docstring)."""
    seq = int(seq_length or cfg.seq_length)
    h = int(cfg.hidden_size)
    layers = int(cfg.num_layers)
    shape = attention_shape(cfg)
    matmul = 0
    attention = 0.0
    for layer in range(layers):
        matmul += _layer_params(cfg, layer)[1]
        window = _window(cfg, layer)
        context = seq / 2 if window is None else min(window, seq / 2)
        attention += 2 * context * shape.heads * (shape.qk_dim + shape.v_dim)
    logits = padded_vocab_size(cfg) * h
    mtp = int(_get(cfg, "mtp_num_layers", 0))
    if mtp:
        per_mtp = _layer_params(cfg, layers - 1)[1] + 2 * h * h + logits
        matmul += mtp * per_mtp
        attention += mtp * 2 * (seq / 2) * shape.heads * (shape.qk_dim + shape.v_dim)
    matmul += logits
    return 6.0 * matmul + 3.0 * attention


def kv_cache_bytes_per_token(cfg, bytes_per_element: int = 2) -> int:
    """Inference KV-cache bytes one token adds, summed over layers.

    MLA caches the compressed latent and the shared RoPE key
    (``kv_lora_rank + qk_pos_emb_head_dim``); GQA/MHA cache a key and a
    value per query group.
    """
    layers = int(cfg.num_layers)
    if _get(cfg, "multi_latent_attention", False):
        per_layer = int(cfg.kv_lora_rank) + int(cfg.qk_pos_emb_head_dim)
    else:
        heads = int(cfg.num_attention_heads)
        head = int(_get(cfg, "kv_channels") or int(cfg.hidden_size) // heads)
        groups = int(_get(cfg, "num_query_groups") or heads)
        per_layer = 2 * groups * head
    return layers * per_layer * bytes_per_element


def kv_cache_report(cfg, bytes_per_element: int = 2, gqa_groups: int = 8) -> str:
    """One line: inference KV-cache bytes per token of this model vs
    the same model with GQA (``gqa_groups`` KV heads) and with MHA.

    The alternatives keep the heads and their key/value widths (for
    MLA: ``qk_head_dim + qk_pos_emb_head_dim`` and ``v_head_dim``) and
    cache a key and a value per KV head, where MLA caches one latent.
    """
    layers = int(cfg.num_layers)
    shape = attention_shape(cfg)
    per_head = layers * (shape.qk_dim + shape.v_dim) * bytes_per_element
    groups = int(_get(cfg, "num_query_groups") or shape.heads)
    own = kv_cache_bytes_per_token(cfg, bytes_per_element)
    if _get(cfg, "multi_latent_attention", False):
        kind = "MLA"
    else:
        kind = "MHA" if groups == shape.heads else f"GQA-{groups}"
    options = [("MHA", shape.heads * per_head)]
    if gqa_groups < shape.heads:
        options.insert(0, (f"GQA-{gqa_groups}", gqa_groups * per_head))
    parts = [f"{kind} {_bytes(own)}"] + [
        f"{name} {_bytes(size)} ({size / own:.1f}x)" for name, size in options
        if name != kind and size != own]
    seq = int(_get(cfg, "seq_length", 4096))
    return (f"kv_cache per token ({8 * bytes_per_element}-bit, {layers} layers): "
            + " | ".join(parts) + f"; {kind} at {seq} tokens: {_bytes(own * seq)}")


def _bytes(n: float) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def human(n: float) -> str:
    """1234567 -> '1.23M' (B for billions, as model cards write it)."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"
