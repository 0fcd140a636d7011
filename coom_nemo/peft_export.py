"""LoRA adapters of a NeMo fine-tuning run in Hugging Face PEFT's
format.

NeMo's LoRA adds ``B @ A * alpha / dim`` beside a megatron-core linear;
PEFT adds ``lora_B @ lora_A * lora_alpha / r`` beside each HF linear.
A fused megatron-core linear (``linear_qkv``: q, k and v;
``linear_fc1``: gate and up) is several HF linears that read the same
input, so each of them gets the same ``A`` and its own rows of ``B``,
split the way the weights are (:mod:`coom_nemo.models.hf_mapping`);
a linear of TransformerEngine's grouped experts (one adapter for all
of a layer's experts) is every HF expert's linear, with the same
adapter.
The result loads with ``peft.PeftModel.from_pretrained`` onto the HF
base model.

:data:`TARGETS` is the per-family table of adapted modules; a family's
names go there (``*`` is a layer number).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from nemo.lightning import io

from coom_nemo.models.conversion import nemo_checkpoint, new_output, on_this_host
from coom_nemo.models.hf_mapping import (
    QKV,
    GatedMLP,
    Mapping,
    megatron_core,
)


@dataclass(frozen=True)
class Target:
    """A megatron-core linear LoRA may adapt and the HF linear(s) it
    is; ``split`` divides its output rows among them."""

    megatron: str
    hf: tuple[str, ...]
    split: type[Mapping] = Mapping


def _mlp(megatron: str, hf: str) -> list[Target]:
    """A gated MLP's two linears: ``linear_fc1`` is gate and up."""
    return [Target(megatron + "linear_fc1", (hf + "gate_proj", hf + "up_proj"), GatedMLP),
            Target(megatron + "linear_fc2", (hf + "down_proj",))]


_LAYER, _HF = "decoder.layers.*.", "model.layers.*."
_ATTENTION = [
    Target(_LAYER + "self_attention.linear_qkv",
           tuple(f"{_HF}self_attn.{p}_proj" for p in "qkv"), QKV),
    Target(_LAYER + "self_attention.linear_proj", (_HF + "self_attn.o_proj",)),
]
# MLA's linears are one HF linear each, imported unchanged (no row
# permutation: transformers de-interleaves RoPE at run time,
# modeling_deepseek_v3.py apply_rotary_pos_emb_interleave, and so does
# megatron-core). Routed experts: megatron-core's local spec has one
# linear per expert (``local_experts.<e>``); TE's grouped experts are
# one module, so NeMo's LoRA gives them one adapter that every expert
# shares (a remaining ``*`` on the HF side: every expert).
_MLA = [Target(_LAYER + f"self_attention.{megatron}", (f"{_HF}self_attn.{hf}",))
        for megatron, hf in (("linear_q_proj", "q_proj"), ("linear_q_down_proj", "q_a_proj"),
                             ("linear_q_up_proj", "q_b_proj"),
                             ("linear_kv_down_proj", "kv_a_proj_with_mqa"),
                             ("linear_kv_up_proj", "kv_b_proj"), ("linear_proj", "o_proj"))]
TARGETS = {
    "llama": _ATTENTION + _mlp(_LAYER + "mlp.", _HF + "mlp."),
    "gpt_oss": _ATTENTION,
    "deepseek": _MLA + [target for megatron, hf in (
        ("mlp.", "mlp."), ("mlp.shared_experts.", "mlp.shared_experts."),
        ("mlp.experts.local_experts.*.", "mlp.experts.*."), ("mlp.experts.", "mlp.experts.*."))
        for target in _mlp(_LAYER + megatron, _HF + hf)],
}


class _Loader(io.ModelConnector):
    """Only for ``nemo_load``: a checkpoint's model, adapters in."""


# config class -> family
FAMILIES = {"CoomLlama31Config": "llama", "CoomGptOssConfig": "gpt_oss",
            "CoomDeepSeekConfig": "deepseek"}


def _every_expert(hf_module: str, config) -> list[str]:
    """``hf_module`` for every routed expert where a ``*`` is left."""
    if "*" not in hf_module:
        return [hf_module]
    return [hf_module.replace("*", str(e)) for e in range(config.num_moe_experts)]


def lora_tensors(model, config, family: str) -> tuple[dict[str, torch.Tensor], int, float]:
    """PEFT's tensors of every LoRA adapter in ``model`` (a NeMo model),
    with the rank and alpha; an adapter the table does not name is
    refused in one line."""
    if family not in TARGETS:
        raise ValueError(f"family: {family!r} has no PEFT names; add its rows to "
                         f"coom_nemo.peft_export.TARGETS (known: {', '.join(TARGETS)})")
    adapters = {name.removesuffix(".adapter"): module
                for name, module in megatron_core(model).named_modules()
                if name.endswith(".adapter")}
    if not adapters:
        raise ValueError("checkpoint: it holds no LoRA adapters; give the checkpoint of a "
                         "LoRA run (a full fine-tuning exports with export_to_hf)")
    patterns = [(t, re.compile(re.escape(t.megatron).replace(r"\*", r"(\d+)")))
                for t in TARGETS[family]]
    tensors, ranks = {}, set()
    for name, adapter in adapters.items():
        hit = next(((t, m) for t, p in patterns if (m := p.fullmatch(name))), None)
        if hit is None:
            raise ValueError(f"{name}: a LoRA adapter with no PEFT name for {family}; add it "
                             "to coom_nemo.peft_export.TARGETS or train without it")
        target, match = hit
        a = adapter.linear_in.weight.detach().float().cpu()
        b = adapter.linear_out.weight.detach().float().cpu()
        ranks.add((adapter.dim, float(adapter.alpha)))
        parts = target.split(target.megatron, target.hf).to_hf(b, config)
        for hf_module, b_part in zip(target.hf, parts, strict=True):
            b_part = b_part.contiguous()
            for number in match.groups():
                hf_module = hf_module.replace("*", number, 1)
            for module in _every_expert(hf_module, config):
                prefix = f"base_model.model.{module}"
                tensors[f"{prefix}.lora_A.weight"] = a.clone()
                tensors[f"{prefix}.lora_B.weight"] = b_part.clone()
    if len(ranks) != 1:
        raise ValueError(f"adapters: ranks and alphas differ ({sorted(ranks)}); PEFT's "
                         "format holds one pair per adapter file")
    (rank, alpha), = ranks
    return tensors, rank, alpha


def write_adapter(output: Path, tensors: dict[str, torch.Tensor], rank: int, alpha: float,
                  base_model: str | None = None, dtype: torch.dtype = torch.float32) -> Path:
    """``adapter_config.json`` and ``adapter_model.safetensors``."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    modules = sorted({name.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
                      for name in tensors})
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=modules, lora_dropout=0.0,
                        bias="none", task_type="CAUSAL_LM", base_model_name_or_path=base_model)
    output.mkdir(parents=True)
    config.save_pretrained(str(output))
    save_file({k: v.to(dtype) for k, v in tensors.items()},
              str(output / "adapter_model.safetensors"))
    return output


def export_lora(checkpoint, output_path, base_model: str | None = None) -> Path:
    """Write the LoRA adapters of a NeMo checkpoint (a LoRA run's
    ``*-last``) as a PEFT adapter directory; ``base_model`` (e.g. the
    HF directory imported) goes into its config."""
    source = nemo_checkpoint(checkpoint)
    output = new_output(output_path)
    config = io.load_context(str(source), subpath="model.config")
    family = FAMILIES.get(type(config).__name__)
    if family is None:
        raise ValueError(f"checkpoint: a {type(config).__name__} model has no PEFT export; "
                         f"known: {', '.join(FAMILIES)}")
    with on_this_host():
        model, _ = _Loader(str(source)).nemo_load(str(source))
        tensors, rank, alpha = lora_tensors(model, config, family)
    dtype = config.params_dtype if isinstance(config.params_dtype, torch.dtype) else None
    write_adapter(output, tensors, rank, alpha, base_model, dtype or torch.float32)
    return output
