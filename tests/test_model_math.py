"""Parameter, FLOP and KV-cache arithmetic (no NeMo import needed)."""

from types import SimpleNamespace

import pytest

from coom_nemo.model_math import (
    count_params,
    human,
    kv_cache_bytes_per_token,
    model_flops_per_token,
)

LLAMA_405B = SimpleNamespace(
    num_layers=126, hidden_size=16384, ffn_hidden_size=53248, num_attention_heads=128,
    num_query_groups=8, gated_linear_unit=True, normalization="RMSNorm", vocab_size=128256,
    make_vocab_size_divisible_by=128, share_embeddings_and_output_weights=False,
    seq_length=8192,
)


def test_llama31_405b_parameters_match_meta():
    params = count_params(LLAMA_405B)
    assert params.total == pytest.approx(405.9e9, rel=0.005)
    # the input embedding is a lookup, not part of the active weights
    assert params.total - params.active == 128256 * 16384


def test_dense_flops_are_six_times_params_plus_attention():
    seq = LLAMA_405B.seq_length
    params = count_params(LLAMA_405B)
    attention = 3 * 126 * 2 * (seq / 2) * 128 * (128 + 128)
    assert model_flops_per_token(LLAMA_405B) == pytest.approx(6 * params.active + attention)


def test_sliding_window_caps_attention_context():
    full = SimpleNamespace(**{**LLAMA_405B.__dict__, "num_layers": 2})
    windowed = SimpleNamespace(**{**full.__dict__, "window_size": (128, 0)})
    every_other = SimpleNamespace(**{**windowed.__dict__, "window_attn_skip_freq": 2})
    f, w, e = (model_flops_per_token(c) for c in (full, windowed, every_other))
    assert w < e < f


def test_moe_active_counts_top_k_experts_only():
    cfg = SimpleNamespace(
        num_layers=24, hidden_size=2880, ffn_hidden_size=2880, num_attention_heads=64,
        num_query_groups=8, kv_channels=64, gated_linear_unit=True, normalization="RMSNorm",
        add_bias_linear=True, vocab_size=201088, make_vocab_size_divisible_by=128,
        num_moe_experts=32, moe_ffn_hidden_size=2880, moe_router_topk=4,
        softmax_type="learnable")
    params = count_params(cfg)
    # OpenAI's gpt-oss model card: 20.91B total, 3.61B active
    assert human(params.total) == "20.91B"
    assert human(params.active) == "3.61B"


def test_mla_caches_the_latent_not_the_heads():
    mla = SimpleNamespace(num_layers=2, multi_latent_attention=True, kv_lora_rank=512,
                          qk_pos_emb_head_dim=64, num_attention_heads=128, hidden_size=7168)
    mha = SimpleNamespace(num_layers=2, num_attention_heads=128, kv_channels=128,
                          hidden_size=7168)
    assert kv_cache_bytes_per_token(mla) == 2 * (512 + 64) * 2
    assert kv_cache_bytes_per_token(mha) == 2 * 2 * 128 * 128 * 2


def test_llama31_8b_flops_equal_nemos_llama3_formula():
    """The formula behind every model TFLOP/s figure here is NeMo's own
    Llama 3 formula (nemo/utils/flops_formulas.py:llama3), the one
    NVIDIA's published per-GPU figures use: 51.47 GFLOP a token at
    seq 8192, so 744 model TFLOP/s/GPU is 14.46K tokens/s/GPU. Ours also
    counts the RMSNorm weights (2 x hidden a layer): 3e-5 more."""
    import fiddle as fdl
    from nemo.utils.flops_formulas import FLOPSConfig, llama3

    from coom_nemo.models.llama import llama31_config

    cfg = fdl.build(llama31_config("8b"))
    seq, gbs = 8192, 1
    nemo = llama3(FLOPSConfig(gbs=gbs, enc_seq_len=seq, layers=cfg.num_layers,
                              hs=cfg.hidden_size, ffn_hs=cfg.ffn_hidden_size,
                              attention_heads=cfg.num_attention_heads,
                              query_groups=cfg.num_query_groups, vocab_size=cfg.vocab_size))
    ours = model_flops_per_token(cfg, seq) * gbs * seq
    assert ours == pytest.approx(nemo * (1 + 2 * 4096 * 32 * 6 / (nemo / seq)), rel=1e-9)
    assert ours / seq == pytest.approx(51.47e9, rel=1e-3)
