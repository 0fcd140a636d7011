"""Gated attention and gated MLA against plain PyTorch, TP=1 and TP=2.

The reference is the paper's formula written out with full (unsharded)
weights: ``out = (attention(x) * sigmoid(x @ W_gate.T)) @ W_proj.T``.
Each TP rank's output must equal it, and each rank's gradient shards
must equal the matching slices of the reference gradients.
"""

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port

SEQ, BATCH, HIDDEN, HEADS, GROUPS, HEAD_DIM = 8, 2, 32, 4, 2, 8


def _causal_mask(device="cpu"):
    return torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool, device=device), 1).view(
        1, 1, SEQ, SEQ)


def _config(tp, mla=False):
    from megatron.core.transformer.transformer_config import (
        MLATransformerConfig,
        TransformerConfig,
    )

    common = dict(num_layers=1, hidden_size=HIDDEN, num_attention_heads=HEADS,
                  ffn_hidden_size=64, tensor_model_parallel_size=tp,
                  use_cpu_initialization=True, params_dtype=torch.float32,
                  attention_dropout=0.0, hidden_dropout=0.0, normalization="RMSNorm",
                  add_bias_linear=False, gated_linear_unit=True,
                  masked_softmax_fusion=False, bias_dropout_fusion=False,
                  bias_activation_fusion=False, apply_rope_fusion=False,
                  persist_layer_norm=False, gradient_accumulation_fusion=False)
    if mla:
        cfg = MLATransformerConfig(**common, q_lora_rank=16, kv_lora_rank=16, qk_head_dim=8,
                                   qk_pos_emb_head_dim=4, v_head_dim=HEAD_DIM,
                                   rope_type="rope", rotary_base=10000)
    else:
        cfg = TransformerConfig(**common, num_query_groups=GROUPS, kv_channels=HEAD_DIM)
    cfg.attention_gate = True
    return cfg


def _build(cfg):
    from megatron.core.transformer.spec_utils import build_module

    from coom_nemo.models.specs import layer_spec

    spec = layer_spec(cfg).layer_specs[0].submodules.self_attention
    return build_module(spec, config=cfg, layer_number=1)


def _shard(full, rank, world, dim):
    return full.chunk(world, dim=dim)[rank]


def _gather(local, world, dim):
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local.contiguous())
    return torch.cat(parts, dim=dim)


def _random(*shapes, scale, device):
    return [torch.randn(*shape).to(device) * s for shape, s in zip(shapes, scale, strict=True)]


def _check_standard(rank, world, device, tol):
    torch.manual_seed(0)  # same full weights and inputs on every rank
    w_qkv, w_gate, w_proj, x, dy = _random(
        (GROUPS * (HEADS // GROUPS + 2) * HEAD_DIM, HIDDEN), (HEADS * HEAD_DIM, HIDDEN),
        (HIDDEN, HEADS * HEAD_DIM), (SEQ, BATCH, HIDDEN), (SEQ, BATCH, HIDDEN),
        scale=(0.2, 0.5, 0.2, 1, 1), device=device)

    attn = _build(_config(world)).to(device)
    assert type(attn).__name__ == "GatedSelfAttention"
    with torch.no_grad():
        attn.linear_qkv.weight.copy_(_shard(w_qkv, rank, world, 0))
        attn.linear_gate.weight.copy_(_shard(w_gate, rank, world, 0))
        attn.linear_proj.weight.copy_(_shard(w_proj, rank, world, 1))
    x_mod = x.clone().requires_grad_()
    out, _ = attn(x_mod, attention_mask=_causal_mask(device))
    (out * dy).sum().backward()

    # plain PyTorch, full weights
    ref_w = [w.clone().requires_grad_() for w in (w_qkv, w_gate, w_proj)]
    x_ref = x.clone().requires_grad_()
    per_group = HEADS // GROUPS
    qkv = (x_ref @ ref_w[0].T).view(SEQ, BATCH, GROUPS, (per_group + 2) * HEAD_DIM)
    q, k, v = qkv.split([per_group * HEAD_DIM, HEAD_DIM, HEAD_DIM], dim=-1)
    q = q.reshape(SEQ, BATCH, HEADS, HEAD_DIM)
    k = k.repeat_interleave(per_group, dim=2)
    v = v.repeat_interleave(per_group, dim=2)
    scores = torch.einsum("sbhd,tbhd->bhst", q, k) / math.sqrt(HEAD_DIM)
    scores = scores.masked_fill(_causal_mask(device), float("-inf"))
    context = torch.einsum("bhst,tbhd->sbhd", scores.softmax(-1), v).reshape(SEQ, BATCH, -1)
    gate = torch.sigmoid(x_ref @ ref_w[1].T)
    ref = (context * gate) @ ref_w[2].T
    (ref * dy).sum().backward()

    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    torch.testing.assert_close(x_mod.grad, x_ref.grad, rtol=10 * tol, atol=tol)
    for param, full_grad, dim in ((attn.linear_qkv.weight, ref_w[0].grad, 0),
                                  (attn.linear_gate.weight, ref_w[1].grad, 0),
                                  (attn.linear_proj.weight, ref_w[2].grad, 1)):
        torch.testing.assert_close(param.grad, _shard(full_grad, rank, world, dim),
                                   rtol=10 * tol, atol=tol)


def _check_mla(rank, world, device, tol):
    """MLA's own math is megatron-core's; the gate around it is checked.

    The reference takes MLA's ungated per-head output ``A`` from the
    same module (its ``MLASelfAttention.forward``), gathers the heads of
    every rank, and applies the gate and output projection in plain
    PyTorch.
    """
    from megatron.core.transformer.multi_latent_attention import MLASelfAttention

    torch.manual_seed(0)
    w_gate, w_proj, x, dy = _random(
        (HEADS * HEAD_DIM, HIDDEN), (HIDDEN, HEADS * HEAD_DIM), (SEQ, BATCH, HIDDEN),
        (SEQ, BATCH, HIDDEN), scale=(0.5, 0.2, 1, 1), device=device)

    torch.manual_seed(1)
    attn = _build(_config(world, mla=True)).to(device)
    assert type(attn).__name__ == "GatedMLASelfAttention"
    with torch.no_grad():
        attn.linear_gate.weight.copy_(_shard(w_gate, rank, world, 0))
        attn.linear_proj.weight.copy_(_shard(w_proj, rank, world, 1))

    captured = []
    hook = attn.linear_proj.register_forward_hook(lambda m, args, out: captured.append(args[0]))
    MLASelfAttention.forward(attn, x.clone().requires_grad_(),
                             attention_mask=_causal_mask(device))
    hook.remove()
    heads_out = _gather(captured[0].detach(), world, dim=-1)  # A, all heads

    x_mod = x.clone().requires_grad_()
    out, _ = attn(x_mod, attention_mask=_causal_mask(device))
    (out * dy).sum().backward()

    ref_gate, ref_proj = (w.clone().requires_grad_() for w in (w_gate, w_proj))
    x_ref = x.clone().requires_grad_()
    ref = (heads_out * torch.sigmoid(x_ref @ ref_gate.T)) @ ref_proj.T
    (ref * dy).sum().backward()

    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    torch.testing.assert_close(attn.linear_gate.weight.grad,
                               _shard(ref_gate.grad, rank, world, 0), rtol=10 * tol, atol=tol)
    torch.testing.assert_close(attn.linear_proj.weight.grad,
                               _shard(ref_proj.grad, rank, world, 1), rtol=10 * tol, atol=tol)


def _worker(rank, world, port, device):
    import contextlib

    from megatron.core import parallel_state

    from coom_nemo import cpu_mode

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    on_gpu = device == "cuda"
    if on_gpu:
        torch.cuda.set_device(rank)
        # fp32 reference math: no TF32 in PyTorch's matmuls
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    dist.init_process_group("nccl" if on_gpu else "gloo", rank=rank, world_size=world)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    # CPU: fp32 kernels agree to 1e-5. GPU: TE and cuBLAS pick other
    # fp32 reduction orders (and TE may use TF32), so 2e-3 there; a
    # wrong gate or head order is off by O(1).
    tol = 2e-3 if on_gpu else 1e-5
    with contextlib.nullcontext() if on_gpu else cpu_mode.cpu_mode():
        _check_standard(rank, world, device, tol)
        _check_mla(rank, world, device, tol)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


@pytest.mark.parametrize("tp", [1, 2])
def test_gated_attention_matches_the_formula(tp):
    mp.spawn(_worker, args=(tp, free_port(), "cpu"), nprocs=tp, join=True)


@pytest.mark.gpu
@pytest.mark.parametrize("tp", [1, pytest.param(2, marks=pytest.mark.gpus2)])
def test_gated_attention_matches_the_formula_on_gpu(tp):
    """TE modules where TE imports, else local ones with SDPA."""
    if torch.cuda.device_count() < tp:
        pytest.skip(f"needs {tp} CUDA GPUs")
    mp.spawn(_worker, args=(tp, free_port(), "cuda"), nprocs=tp, join=True)


@pytest.mark.parametrize("factory", ["coom_llama31_405b", "coom_deepseek"])
def test_gated_models_train_end_to_end(factory, tmp_path):
    """Gated GQA (Llama) and gated MLA (DeepSeek) in real recipes."""
    from helpers import falls, train

    from coom_nemo.model_math import count_params
    from coom_nemo.recipes import FACTORIES

    recipe = FACTORIES[factory](size="debug", cpu=True, dir=str(tmp_path), max_steps=12)
    recipe.model.config.attention_gate = True
    recorder, trainer = train(recipe)
    module = trainer.lightning_module
    gates = [n for n, _ in module.named_parameters() if n.endswith("linear_gate.weight")]
    assert len(gates) == module.config.num_layers + (module.config.mtp_num_layers or 0)
    assert sum(p.numel() for p in module.parameters()) == count_params(module.config).total
    assert falls(recorder.losses), recorder.losses
