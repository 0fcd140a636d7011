"""Hugging Face import, logits, export and PEFT export on a GPU node,
every family.

Marked ``gpu``; skipped on a host without CUDA (``pytest -m gpu``,
``scripts/gpu_check.sh`` runs it with TransformerEngine and with it
hidden). Where TE imports, the layer spec is TE's, whose parameter
names the CPU tests only see renamed (``helpers.te_names``): norms
fused into the next linear (``linear_qkv.layer_norm_weight``, MLA's
``linear_q_up_proj``/``linear_kv_up_proj.layer_norm_weight``, a dense
layer's ``linear_fc1.layer_norm_weight``) and grouped experts
(``linear_fc1.weight<e>``, one LoRA adapter per layer). Each test
builds its tiny random HF model (every weight random, norms, biases,
sinks and expert bias included) in ``tmp_path``; nothing is
downloaded; one GPU, a few seconds each.

Tolerance: the weights are fp32 and transformers computes the
reference on the CPU in fp32; on the GPU, TE's and cuBLAS's fp32 GEMMs
may run as TF32 (10-bit mantissa, relative error ~1e-3 a GEMM), so
logits (up to ~5) may move by a few 1e-3 over the tiny models' layers:
TOLERANCE 2e-2. What the tests guard against is far above it: the norm
weights left at 1.0 moved Llama's logits by 0.42, megatron-core's
group routing DeepSeek's by 0.11, and a tensor in the wrong place moves
them by O(1). Export must give every tensor back bit for bit.
"""

import json
import time

import pytest
import torch
from deepseek_tiny import make_tiny_deepseek
from gpt_oss_tiny import make_tiny_gpt_oss
from test_gpu import record

from coom_nemo.models import deepseek, gpt_oss_hf, llama_hf
from coom_nemo.models.base import has_transformer_engine
from coom_nemo.models.conversion import loaded, read_safetensors
from coom_nemo.models.hf_mapping import megatron_state
from coom_nemo.tiny import make_tiny_llama

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TE = has_transformer_engine()
TOLERANCE = 2e-2  # fp32 weights, TF32 GEMMs on the GPU (module docstring)
TOKENS = torch.randint(0, 384, (2, 24), generator=torch.Generator().manual_seed(1))


# family -> (make the HF model, module with import_from_hf/export_to_hf,
# names only the TE spec has, names only the local spec has)
FAMILIES = {
    "llama": (make_tiny_llama, llama_hf,
              ["decoder.layers.0.self_attention.linear_qkv.layer_norm_weight",
               "decoder.layers.0.mlp.linear_fc1.layer_norm_weight"],
              ["decoder.layers.0.input_layernorm.weight",
               "decoder.layers.0.pre_mlp_layernorm.weight"]),
    "gpt_oss": (make_tiny_gpt_oss, gpt_oss_hf,
                ["decoder.layers.0.self_attention.linear_qkv.layer_norm_weight",
                 "decoder.layers.0.mlp.experts.linear_fc1.weight3",
                 "decoder.layers.0.mlp.experts.linear_fc1.bias3"],
                ["decoder.layers.0.input_layernorm.weight",
                 "decoder.layers.0.mlp.experts.local_experts.3.linear_fc1.bias"]),
    # the debug shape: low-rank q (q norm), a dense first layer, 16
    # experts in 4 groups
    "deepseek": (make_tiny_deepseek, deepseek,
                 ["decoder.layers.0.self_attention.linear_q_up_proj.layer_norm_weight",
                  "decoder.layers.0.self_attention.linear_kv_up_proj.layer_norm_weight",
                  "decoder.layers.0.mlp.linear_fc1.layer_norm_weight",
                  "decoder.layers.1.mlp.experts.linear_fc1.weight15"],
                 ["decoder.layers.0.self_attention.q_layernorm.weight",
                  "decoder.layers.0.pre_mlp_layernorm.weight",
                  "decoder.layers.1.mlp.experts.local_experts.15.linear_fc1.weight"]),
}
# NeMo LoRA targets reaching every linear of the family
LORA_TARGETS = {
    "llama": ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"],
    "deepseek": ["linear_q_proj", "linear_q_down_proj", "linear_q_up_proj",
                 "linear_kv_down_proj", "linear_kv_up_proj", "linear_proj",
                 "linear_fc1", "linear_fc2"],
}


def hf_model(directory):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                attn_implementation="eager").eval()


def nemo_logits(model, device="cuda"):
    model = model.to(device).eval()
    positions = torch.arange(TOKENS.shape[1]).expand_as(TOKENS)
    with torch.no_grad():
        return model(TOKENS.to(device), positions.to(device), None).float().cpu()


def imported(family, tmp_path):
    make, module, _, _ = FAMILIES[family]
    hf = make(tmp_path / "hf")
    return hf, module.import_from_hf(hf, tmp_path / "nemo")


@pytest.mark.parametrize("family", FAMILIES)
def test_import_matches_transformers_and_exports_every_tensor(family, tmp_path):
    started = time.time()
    _, module, te_names, local_names = FAMILIES[family]
    hf, checkpoint = imported(family, tmp_path)
    with loaded(checkpoint) as model:
        names = set(megatron_state(model))
        ours = nemo_logits(model)
    expected, other = (te_names, local_names) if TE else (local_names, te_names)
    assert set(expected) <= names and not set(other) & names, sorted(names)
    with torch.no_grad():
        theirs = hf_model(hf)(TOKENS).logits
    difference = float((ours - theirs).abs().max())
    assert difference < TOLERANCE, difference

    exported = module.export_to_hf(checkpoint, tmp_path / "exported")
    original, back = read_safetensors(hf), read_safetensors(exported)
    assert back.keys() == original.keys()
    unequal = [name for name in original if not torch.equal(back[name], original[name])]
    assert not unequal, unequal
    record(test="hf_import_export", family=family, max_logit_difference=difference,
           tensors=len(original), seconds=round(time.time() - started, 1))


@pytest.mark.parametrize("family", LORA_TARGETS)
def test_lora_adapters_export_to_peft(family, tmp_path):
    """LoRA on every linear of an import (``A`` and ``B`` random, so
    every adapter counts), exported in PEFT's format: transformers with
    peft computes what the NeMo model computes. With TE this covers the
    adapters on fused-norm linears (they read the normalized input) and
    the one adapter TE's grouped experts share."""
    from peft import PeftModel

    from coom_nemo.peft import LoRA
    from coom_nemo.peft_export import FAMILIES as TABLES
    from coom_nemo.peft_export import lora_tensors, write_adapter

    hf, checkpoint = imported(family, tmp_path)
    with loaded(checkpoint) as model:
        # PEFT.__call__ also freezes, which asks for a trainer
        # (nemo/lightning/pytorch/callbacks/peft.py:133): only the walk
        model.walk(LoRA(target_modules=LORA_TARGETS[family], dim=4, alpha=8).transform)
        adapters = [m for n, m in model.named_modules() if n.endswith(".adapter")]
        assert adapters
        # a loaded model is built without initialisation (the weights
        # come from the checkpoint), so the new adapters hold whatever
        # memory held: set both factors
        with torch.no_grad():
            for adapter in adapters:
                adapter.linear_in.weight.normal_(0.0, 0.2)
                adapter.linear_out.weight.normal_(0.0, 0.2)
        ours = nemo_logits(model)
        config = model.config
        tensors, rank, alpha = lora_tensors(model, config, TABLES[type(config).__name__](config))
    adapter_dir = write_adapter(tmp_path / "adapter", tensors, rank, alpha, str(hf))
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["r"] == 4
    base = hf_model(hf)
    with torch.no_grad():
        untuned = base(TOKENS).logits
        theirs = PeftModel.from_pretrained(base, adapter_dir).eval()(TOKENS).logits
    difference = float((ours - theirs).abs().max())
    assert difference < TOLERANCE, difference
    assert (theirs - untuned).abs().max() > 0.1  # the adapters count
    record(test="hf_lora_peft", family=family, max_logit_difference=difference,
           adapters=len(adapters))
