"""LoRA adapters of a NeMo fine-tuning run in Hugging Face PEFT's
format.

NeMo's LoRA adds ``B @ A * alpha / dim`` beside a megatron-core linear;
PEFT adds ``lora_B @ lora_A * lora_alpha / r`` beside each HF linear.
Which HF linear(s) an adapted megatron-core linear is comes from the
family's weight mapping table (:mod:`coom_nemo.models.hf_mapping`),
the one its import and export read: a row that only splits or reorders
a weight's output rows (``splits_rows``) maps ``B`` the same way. A
fused linear (``linear_qkv``: q, k and v; ``linear_fc1``: gate and
up) is several HF linears that read the same input, so each gets the
same ``A`` and its own rows of ``B``; a linear of TransformerEngine's
grouped experts (one adapter for all of a layer's experts) is every HF
expert's linear, with the same adapter. The result loads with
``peft.PeftModel.from_pretrained`` onto the HF base model.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from nemo.lightning import io

from coom_nemo.models import deepseek, gpt_oss_hf, llama_hf
from coom_nemo.models.conversion import loaded, nemo_checkpoint, new_output
from coom_nemo.models.hf_mapping import filled, megatron_core, name_pattern

# config class -> the family's mapping table (config -> rows)
FAMILIES = {"CoomLlama31Config": llama_hf.mappings, "CoomGptOssConfig": gpt_oss_hf.mappings,
            "CoomDeepSeekConfig": deepseek.mappings}

_WEIGHT = re.compile(r"\.weight\*?$")  # a linear's weight (TE grouped: weight<e>)


def _linears(mappings):
    """(megatron-core linear pattern, HF linear names, row) of every
    row that maps one linear's weight row by row."""
    for row in mappings:
        if row.splits_rows and len(row.megatron) == 1 and all(
                _WEIGHT.search(name) for name in row.megatron + row.hf):
            yield (name_pattern(_WEIGHT.sub("", row.megatron[0])),
                   [_WEIGHT.sub("", name) for name in row.hf], row)


def lora_tensors(model, config, mappings) -> tuple[dict[str, torch.Tensor], int, float]:
    """PEFT's tensors of every LoRA adapter in ``model`` (a NeMo model),
    with the rank and alpha, through the family's ``mappings``; an
    adapter of no HF linear is refused in one line."""
    adapters = {name.removesuffix(".adapter"): module
                for name, module in megatron_core(model).named_modules()
                if name.endswith(".adapter")}
    if not adapters:
        raise ValueError("checkpoint: it holds no LoRA adapters; give the checkpoint of a "
                         "LoRA run (a full fine-tuning exports with export_to_hf)")
    linears = list(_linears(mappings))
    experts = getattr(config, "num_moe_experts", None) or 0
    tensors, ranks = {}, set()
    for name, adapter in adapters.items():
        hit = next(((m, hf, row) for p, hf, row in linears if (m := p.fullmatch(name))), None)
        if hit is None:
            raise ValueError(f"{name}: a LoRA adapter of no HF linear (PEFT has no name for "
                             "it); train without it (peft.target_modules)")
        match, hf_modules, row = hit
        a = adapter.linear_in.weight.detach().float().cpu()
        b = adapter.linear_out.weight.detach().float().cpu()
        ranks.add((adapter.dim, float(adapter.alpha)))
        parts = row.to_hf([b], config)
        for hf_module, b_part in zip(hf_modules, parts, strict=True):
            b_part = b_part.contiguous()
            # a ``*`` left over: TE's grouped experts, one adapter
            # for all of them
            for module in filled([hf_module], match.groups(), experts):
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
    mappings = FAMILIES.get(type(config).__name__)
    if mappings is None:
        raise ValueError(f"checkpoint: a {type(config).__name__} model has no PEFT export; "
                         f"known: {', '.join(FAMILIES)}")
    with loaded(source) as model:
        tensors, rank, alpha = lora_tensors(model, config, mappings(config))
    dtype = config.params_dtype if isinstance(config.params_dtype, torch.dtype) else None
    write_adapter(output, tensors, rank, alpha, base_model, dtype or torch.float32)
    return output
