"""DeepSeek-style MoE recipes.

Pretraining: ``coom_deepseek`` (16B, default) and ``coom_deepseek_v3``
(671B). Fine-tuning from an imported HF checkpoint
(:func:`coom_nemo.models.deepseek.import_from_hf`) on local JSONL:
``coom_deepseek_16b_lora``, ``coom_deepseek_16b_sft``,
``coom_deepseek_v3_lora``, ``coom_deepseek_v3_sft`` (each also takes
``size=debug``, the tiny models of the tests).
"""

# No `from __future__ import annotations`: NeMo-Run reads the
# factories' annotations as types to parse CLI arguments.
import dataclasses
from typing import Optional

import nemo_run as run
from nemo.collections import llm

from coom_nemo.factory import launch_arguments
from coom_nemo.finetune import Tuning, finetune
from coom_nemo.models.deepseek import deepseek_model
from coom_nemo.moe_metrics import ExpertLoadMetrics
from coom_nemo.plan import PlanError
from coom_nemo.recipe import (
    Cluster,
    Extras,
    Layout,
    Optim,
    Preset,
    Schedule,
    debug_preset,
    from_preset,
)

PRESETS = {
    "16b": Preset(
        model=deepseek_model("16b"),
        layout=Layout(tp=1, pp=1, ep=8),
        cluster=Cluster(num_nodes=1, gpus_per_node=8),
        global_batch_size=512,
        micro_batch_size=1,
        optim=Optim(lr=4.2e-4, warmup_steps=2000),
        schedule=Schedule(max_steps=100_000, val_check_interval=500),
        tokenizer="null:102400",
    ),
    "v3": Preset(
        # NeMo's DeepSeek-V3 recipe recomputes these too: without them
        # the plan puts a first-stage GPU at 88 GiB (1F1B keeps 16
        # micro-batches of activations there)
        model=deepseek_model("v3", recompute_granularity="selective",
                             recompute_modules=["mla_up_proj", "layernorm"]),
        # 61 layers = 3 (first stage, with the embedding) + 14 x 4 + 2
        # (last stage, with the output layer and MTP)
        layout=Layout(tp=2, pp=16, ep=64, etp=1, first_stage_layers=3, last_stage_layers=2),
        cluster=Cluster(num_nodes=128, gpus_per_node=8),
        global_batch_size=4096,
        micro_batch_size=1,
        optim=Optim(lr=2.2e-4, warmup_steps=2000),
        schedule=Schedule(max_steps=100_000, val_check_interval=500),
        tokenizer="null:129280",
    ),
    "debug": debug_preset(deepseek_model("debug")),
}


def moe_overrides(mtp_layers=None, mtp_loss_weight=None, expert_bias_rate=None,
                  aux_loss_coeff=None, capacity_factor=None) -> dict:
    """Model config fields for the factories' MoE/MTP arguments."""
    given = dict(mtp_layers=mtp_layers, mtp_loss_weight=mtp_loss_weight,
                 expert_bias_rate=expert_bias_rate, aux_loss_coeff=aux_loss_coeff)
    for name, value in given.items():
        if value is not None and value < 0:
            raise ValueError(f"{name}: {value} is negative; use 0 or more")
    if capacity_factor is not None and capacity_factor <= 0:
        raise ValueError(f"capacity_factor: {capacity_factor} would drop every token; use "
                         "a value above 0 (1.0 = an even share), or None for no dropping")
    fields = {}
    if mtp_layers is not None:
        fields["mtp_num_layers"] = mtp_layers or None  # 0: no MTP
        if not mtp_layers:
            fields["mtp_loss_scaling_factor"] = None
    if mtp_loss_weight is not None:
        fields["mtp_loss_scaling_factor"] = mtp_loss_weight
    if expert_bias_rate is not None:
        fields["moe_router_enable_expert_bias"] = expert_bias_rate > 0
        fields["moe_router_bias_update_rate"] = expert_bias_rate
    if aux_loss_coeff is not None:
        fields["moe_aux_loss_coeff"] = aux_loss_coeff
    if capacity_factor is not None:
        fields["moe_expert_capacity_factor"] = capacity_factor
    return fields


def check_has_mtp_weights(path: str) -> None:
    """Refuse to restore MTP layers from a checkpoint without them
    (megatron-core would fail deep inside the load)."""
    from pathlib import Path

    from megatron.core.dist_checkpointing import load_tensors_metadata

    weights = Path(path) / "weights"
    if not weights.is_dir():
        return  # not on this host (e.g. a cluster path): checked at load
    if not any(".mtp." in name for name in load_tensors_metadata(str(weights))):
        raise PlanError("restore_path", f"{path} holds no MTP weights (an HF import has none)",
                        "pass mtp_layers=0 to train from it without MTP")


def print_kv_cache_report(recipe) -> None:
    """Inference KV cache per token: this model's (MLA caches the
    latent) vs the same model with GQA or MHA."""
    import fiddle as fdl

    from coom_nemo import console
    from coom_nemo.model_math import kv_cache_report

    if console.is_rank_zero():
        print(kv_cache_report(fdl.build(recipe.model.config)), flush=True)


def _recipe(mtp_layers: Optional[int] = None, mtp_loss_weight: Optional[float] = None,
            expert_bias_rate: Optional[float] = None, aux_loss_coeff: Optional[float] = None,
            capacity_factor: Optional[float] = None, restore_path: Optional[str] = None,
            **launch) -> run.Partial:
    """DeepSeek-style MoE: ``coom_deepseek`` is ~16B total / ~2.5B
    active by default, ``coom_deepseek_v3`` the 671B V3 size.

    MoE/MTP arguments (None keeps the size's default): ``mtp_layers``
    (MTP depth, 0 = off), ``mtp_loss_weight``, ``expert_bias_rate``
    (aux-loss-free balancing bias step per update, 0 = off),
    ``aux_loss_coeff`` (sequence-wise aux loss), ``capacity_factor``
    (drop tokens over this multiple of an even share; None = no
    dropping). ``restore_path``: start from these weights, e.g. a
    DeepSeek-V3 HF checkpoint imported with ``llm.import_ckpt`` (it
    holds no MTP weights: pair it with ``mtp_layers=0``).
    """
    moe = moe_overrides(mtp_layers, mtp_loss_weight, expert_bias_rate, aux_loss_coeff,
                        capacity_factor)
    size = launch["size"]
    presets = PRESETS
    if moe and size in PRESETS:
        model = deepseek_model(size, **moe)
        presets = {**PRESETS, size: dataclasses.replace(PRESETS[size], model=model)}
    extras = Extras(callbacks=[run.Config(ExpertLoadMetrics)], restore_path=restore_path)
    recipe = from_preset(presets, family="deepseek", extras=extras, **launch)
    if restore_path and recipe.model.config.mtp_num_layers:
        check_has_mtp_weights(restore_path)
    print_kv_cache_report(recipe)
    return recipe


pretrain_recipe = run.cli.factory(target=llm.pretrain, name="coom_deepseek")(
    launch_arguments(size="16b")(_recipe))
pretrain_recipe_v3 = run.cli.factory(target=llm.pretrain, name="coom_deepseek_v3")(
    launch_arguments(size="v3")(_recipe))


# Fine-tuning keeps each size's pretraining layout: the plan check
# counts gradients and Adam state for frozen weights too, so LoRA gets
# no smaller layout than SFT. LoRA at 1e-4, SFT at 5e-6 (NeMo 2.7.3's
# deepseek_v3 finetune_recipe values).
_FT_SCHEDULE = Schedule(max_steps=1000, val_check_interval=50)
_FT_DEBUG = Schedule(max_steps=10, val_check_interval=5, limit_val_batches=1)
_LORA_OPTIM = Optim(lr=1e-4, warmup_steps=50, weight_decay=0.0)
_SFT_OPTIM = Optim(lr=5e-6, warmup_steps=50)
FINETUNE = {
    **{(size, method): Tuning(layout=PRESETS[size].layout, cluster=PRESETS[size].cluster,
                              global_batch_size=batch, schedule=_FT_SCHEDULE, optim=optim)
       for size, batch in (("16b", 32), ("v3", 128))
       for method, optim in (("lora", _LORA_OPTIM), ("sft", _SFT_OPTIM))},
    ("debug", "lora"): Tuning(layout=Layout(), cluster=PRESETS["debug"].cluster,
                              global_batch_size=4, micro_batch_size=2, schedule=_FT_DEBUG,
                              optim=Optim(lr=1e-2, warmup_steps=2, weight_decay=0.0)),
    ("debug", "sft"): Tuning(layout=Layout(), cluster=PRESETS["debug"].cluster,
                             global_batch_size=4, micro_batch_size=2, schedule=_FT_DEBUG,
                             optim=Optim(lr=1e-3, warmup_steps=2)),
}

# MLA's projections, as megatron-core names them with and without TE
# (q_proj where q is full-rank, q_down/q_up where it is low-rank)
LORA_TARGETS = ["linear_q_proj", "linear_q_down_proj", "linear_q_up_proj",
                "linear_kv_down_proj", "linear_kv_up_proj", "linear_proj"]


def _finetune(method, restore_path, data_dir, **launch):
    recipe = finetune(FINETUNE, method, family="deepseek", lora_targets=LORA_TARGETS,
                      importer="coom_nemo.models.deepseek.import_from_hf",
                      restore_path=restore_path, data_dir=data_dir, **launch)
    if method == "lora":
        # megatron-core steps the expert bias (a buffer, not a frozen
        # weight) after every batch (finalize_model_grads.py:467-468,
        # 285-307), but a LoRA checkpoint keeps the adapters only: the
        # fine-tuned model would route by a bias no export holds
        # (measured: PEFT logits 3.7 from NeMo's after 10 steps). Keep
        # the imported bias.
        recipe.model.config.moe_router_bias_update_rate = 0.0
    return recipe


def _finetune_factory(method: str, size: str, name: str, doc: str):
    def factory(restore_path: Optional[str] = None, data_dir: Optional[str] = None,
                **launch) -> run.Partial:
        return _finetune(method, restore_path, data_dir, **launch)

    factory.__doc__ = doc
    factory.__name__ = factory.__qualname__ = name.removeprefix("coom_") + "_recipe"
    # fine-tuning data: a directory of JSONL files, not indexed prefixes
    arguments = launch_arguments(size=size, exclude=("data_paths", "tokenizer"))
    return run.cli.factory(target=llm.finetune, name=name)(arguments(factory))


_LORA_DOC = "LoRA on MLA's projections of an imported DeepSeek-V3 checkpoint."
_SFT_DOC = "Full supervised fine-tuning of an imported DeepSeek-V3 checkpoint."
lora_recipe_16b = _finetune_factory("lora", "16b", "coom_deepseek_16b_lora", _LORA_DOC)
sft_recipe_16b = _finetune_factory("sft", "16b", "coom_deepseek_16b_sft", _SFT_DOC)
lora_recipe_v3 = _finetune_factory("lora", "v3", "coom_deepseek_v3_lora", _LORA_DOC)
sft_recipe_v3 = _finetune_factory("sft", "v3", "coom_deepseek_v3_sft", _SFT_DOC)
