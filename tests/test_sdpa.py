"""The TE-free fast path: SDPA core attention equals megatron-core's
local attention, module by module and through training."""

from types import SimpleNamespace

import pytest
import torch
from helpers import train
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnBackend, AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from coom_nemo.models import sdpa
from coom_nemo.models.specs import LocalCoreAttention, LocalMLACoreAttention, layer_spec
from coom_nemo.recipes import llama31_405b

ONE_RANK = SimpleNamespace(tp=SimpleNamespace(size=lambda: 1))


def config(**kwargs):
    base = dict(num_layers=2, hidden_size=64, num_attention_heads=8, num_query_groups=2,
                use_cpu_initialization=True, masked_softmax_fusion=False,
                bias_dropout_fusion=False, attention_softmax_in_fp32=True,
                attention_dropout=0.0)
    return TransformerConfig(**{**base, **kwargs})


def attend(module, q, k, v, mask=None):
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out = module(q, k, v, mask)
    out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
    return out, q.grad, k.grad, v.grad


@pytest.mark.parametrize("window", [None, (5, 0)])
def test_sdpa_matches_local_attention_gqa(model_parallel, window):
    cfg = config(window_size=window)
    local = DotProductAttention(cfg, 1, AttnMaskType.causal, "self", pg_collection=ONE_RANK)
    fast = sdpa.SDPACoreAttention(cfg, 1, AttnMaskType.causal, "self", pg_collection=ONE_RANK)
    s, b, d = 16, 3, cfg.kv_channels
    g = torch.Generator().manual_seed(0)
    q = torch.randn(s, b, 8, d, generator=g)
    k, v = (torch.randn(s, b, 2, d, generator=g) for _ in range(2))
    # the local attention reads a causal mask from the data (NeMo
    # makes one without TE); SDPA needs none
    causal = torch.triu(torch.ones(s, s, dtype=torch.bool), 1).view(1, 1, s, s)
    expected = attend(local, q, k, v, causal)
    got = attend(fast, q, k, v, causal)
    assert got[0].shape == (s, b, 8 * d)
    for e, o in zip(expected, got, strict=True):
        torch.testing.assert_close(o, e, rtol=1e-5, atol=1e-5)


def kernels_enabled(monkeypatch, cfg) -> dict[str, bool]:
    """The SDPA backends enabled while the module of ``cfg`` calls
    SDPA (a causal GQA call), by name."""
    seen = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        cuda = torch.backends.cuda
        seen.append(dict(flash=cuda.flash_sdp_enabled(),
                         efficient=cuda.mem_efficient_sdp_enabled(),
                         math=cuda.math_sdp_enabled(), cudnn=cuda.cudnn_sdp_enabled()))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    module = sdpa.SDPACoreAttention(cfg, 1, AttnMaskType.causal, "self", pg_collection=ONE_RANK)
    module(torch.randn(8, 1, 8, 8), torch.randn(8, 1, 2, 8), torch.randn(8, 1, 2, 8), None)
    return seen[0]


@pytest.mark.parametrize("deterministic", [False, True])
def test_deterministic_mode_runs_the_math_kernels(model_parallel, monkeypatch, deterministic):
    """The flash and memory-efficient backwards use atomics; with
    ``deterministic_mode`` only the math path may run."""
    enabled = kernels_enabled(monkeypatch, config(deterministic_mode=deterministic))
    assert enabled["math"]
    assert (enabled["flash"] or enabled["efficient"]) != deterministic
    assert torch.backends.cuda.flash_sdp_enabled()  # restored afterwards


@pytest.mark.parametrize("with_te", [False, True])
def test_sdpa_with_te_keeps_cudnn_attention_out(model_parallel, monkeypatch, with_te):
    """``sdpa_with_te`` is there to route around cuDNN's attention, so
    SDPA must not pick cuDNN's kernel then; else PyTorch chooses."""
    cfg = config()
    cfg.sdpa_with_te = with_te
    enabled = kernels_enabled(monkeypatch, cfg)
    assert enabled["flash"] and enabled["cudnn"] != with_te
    assert torch.backends.cuda.cudnn_sdp_enabled()  # restored afterwards


def test_sdpa_with_te_replaces_te_core_attention_in_the_spec(model_parallel, monkeypatch):
    """On a TE node ``sdpa_with_te`` swaps only the core attention;
    attention sinks, which SDPA cannot do, keep TE's. (TE's spec needs
    TE: megatron-core's local spec stands in for it.)"""
    from coom_nemo.models import specs

    build = specs.get_gpt_decoder_block_spec
    monkeypatch.setattr(specs, "use_transformer_engine", lambda: True)
    monkeypatch.setattr(specs, "get_gpt_decoder_block_spec",
                        lambda cfg, **kw: build(cfg, **{**kw, "use_transformer_engine": False}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a TE node has CUDA

    def core(with_te, **kw):
        cfg = config(**kw)
        cfg.sdpa_with_te = with_te
        layer = layer_spec(cfg).layer_specs[0]
        return layer.submodules.self_attention.submodules.core_attention

    assert core(False) is DotProductAttention  # the spec's own
    assert core(True) is sdpa.SDPACoreAttention
    assert core(True, softmax_type="learnable") is DotProductAttention


def test_sliding_window_changes_the_result(model_parallel):
    q = torch.randn(16, 1, 8, 8)
    k, v = torch.randn(16, 1, 2, 8), torch.randn(16, 1, 2, 8)
    full = sdpa.SDPACoreAttention(config(), 1, AttnMaskType.causal, "self",
                                  pg_collection=ONE_RANK)
    windowed = sdpa.SDPACoreAttention(config(window_size=(3, 0)), 1, AttnMaskType.causal,
                                      "self", pg_collection=ONE_RANK)
    a, b = full(q, k, v, None), windowed(q, k, v, None)
    # the first 4 queries see the same keys either way; later ones not
    torch.testing.assert_close(a[:4], b[:4])
    assert not torch.allclose(a[4:], b[4:])


def test_mla_widths_match_local_mla_attention(model_parallel):
    cfg = config(num_query_groups=8, kv_channels=24)
    kw = dict(pg_collection=ONE_RANK, k_channels=24, v_channels=16, softmax_scale=0.3)
    local = LocalMLACoreAttention(cfg, 1, AttnMaskType.causal, "self", **kw)
    fast = sdpa.SDPACoreAttention(cfg, 1, AttnMaskType.causal, "self", **kw)
    q, k = torch.randn(12, 2, 8, 24), torch.randn(12, 2, 8, 24)
    v = torch.randn(12, 2, 8, 16)
    causal = torch.triu(torch.ones(12, 12, dtype=torch.bool), 1).view(1, 1, 12, 12)
    for e, o in zip(attend(local, q, k, v, causal), attend(fast, q, k, v, causal),
                    strict=True):
        torch.testing.assert_close(o, e, rtol=1e-5, atol=1e-5)


def test_spec_choice_follows_attention_backend(model_parallel):
    def core(**kw):
        block = layer_spec(config(**kw))
        return block.layer_specs[0].submodules.self_attention.submodules.core_attention

    assert core() is LocalCoreAttention  # auto on a CPU host: local
    assert core(attention_backend=AttnBackend.flash) is sdpa.SDPACoreAttention
    assert core(attention_backend=AttnBackend.unfused) is LocalCoreAttention
    # attention sinks need the local attention
    assert core(attention_backend=AttnBackend.flash,
                softmax_type="learnable") is LocalCoreAttention


def test_training_with_sdpa_follows_the_local_losses(tmp_path, monkeypatch):
    def losses(backend):
        # megatron-core pins TE's backend switches per process
        for name in ("NVTE_FLASH_ATTN", "NVTE_FUSED_ATTN", "NVTE_UNFUSED_ATTN"):
            monkeypatch.delenv(name, raising=False)
        recipe = llama31_405b.pretrain_recipe(size="debug", cpu=True, max_steps=6,
                                              dir=str(tmp_path / backend.name), mlperf=False)
        recipe.model.config.attention_backend = backend
        recipe.log.ckpt = None
        recorder, trainer = train(recipe)
        cores = {type(m) for m in trainer.lightning_module.modules()}
        return recorder.losses, cores

    local, local_cores = losses(AttnBackend.auto)
    fast, fast_cores = losses(AttnBackend.flash)
    assert LocalCoreAttention in local_cores and sdpa.SDPACoreAttention in fast_cores
    assert len(fast) == 6
    assert fast == pytest.approx(local, abs=2e-4)
