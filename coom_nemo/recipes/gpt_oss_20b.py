"""GPT-OSS 20B recipes.

Pretraining: ``coom_gpt_oss_20b`` and its gated-attention variant
``coom_gpt_oss_20b_gated``. Fine-tuning from an imported checkpoint
(:func:`coom_nemo.models.gpt_oss_hf.import_from_hf`) on local JSONL:
``coom_gpt_oss_20b_lora`` (adapters on attention) and
``coom_gpt_oss_20b_sft`` (all weights).
"""

# No `from __future__ import annotations`: NeMo-Run reads the
# factories' annotations as types to parse CLI arguments.
import dataclasses
from pathlib import Path
from typing import Optional

import nemo_run as run
from nemo.collections import llm

from coom_nemo.data import sft_data
from coom_nemo.factory import launch_arguments
from coom_nemo.models.gpt_oss import gpt_oss_model
from coom_nemo.peft import LoRA
from coom_nemo.recipe import (
    Cluster,
    Extras,
    Layout,
    Optim,
    Preset,
    Schedule,
    debug_preset,
    finetune_recipe,
    from_preset,
)

PRESETS = {
    "20b": Preset(
        model=gpt_oss_model("20b"),
        layout=Layout(tp=1, pp=1, ep=8, etp=1),
        cluster=Cluster(num_nodes=1, gpus_per_node=8),
        global_batch_size=256,
        micro_batch_size=1,
        optim=Optim(lr=3e-4, warmup_steps=2000),
        schedule=Schedule(max_steps=100_000, val_check_interval=500),
        tokenizer="null:201088",
    ),
    "debug": debug_preset(gpt_oss_model("debug"), layout=Layout(etp=1)),
}

GATED_PRESETS = {size: dataclasses.replace(preset, model=gpt_oss_model(size, attention_gate=True))
                 for size, preset in PRESETS.items()}

# Expert biases need expert TP 1 (ETP1 in every layout), whatever the
# TP. Fine-tuning differs from pretraining in layout, batch and
# optimizer only; the 20b values follow NeMo 2.7.3's gpt_oss_20b
# finetune_recipe (LoRA at 1e-4, full SFT on EP4 x PP2 at 5e-6). LoRA
# keeps EP8: the plan check counts gradients and Adam state for every
# weight, so it refuses NeMo's EP1 (162 GiB estimated) though frozen
# weights need neither.
FINETUNE = {
    ("20b", "lora"): dict(layout=Layout(ep=8, etp=1), global_batch_size=32,
                          optim=Optim(lr=1e-4, warmup_steps=50, weight_decay=0.0)),
    ("20b", "sft"): dict(layout=Layout(pp=2, ep=4, etp=1), global_batch_size=32,
                         optim=Optim(lr=5e-6, warmup_steps=50)),
    ("debug", "lora"): dict(layout=Layout(etp=1), global_batch_size=4,
                            optim=Optim(lr=1e-2, warmup_steps=2, weight_decay=0.0)),
    ("debug", "sft"): dict(layout=Layout(etp=1), global_batch_size=4,
                           optim=Optim(lr=1e-3, warmup_steps=2)),
}
FINETUNE_SCHEDULE = {"20b": Schedule(max_steps=1000, val_check_interval=50),
                     "debug": Schedule(max_steps=10, val_check_interval=5, limit_val_batches=1)}


@run.cli.factory(target=llm.pretrain, name="coom_gpt_oss_20b")
@launch_arguments(size="20b")
def pretrain_recipe(restore_path: Optional[str] = None, **launch) -> run.Partial:
    """GPT-OSS 20B; ``size="debug"`` is the same recipe, tiny.
    ``restore_path``: start from these weights (e.g. a grown
    checkpoint, :mod:`coom_nemo.grow`)."""
    return from_preset(PRESETS, family="gpt_oss", extras=Extras(restore_path=restore_path),
                       **launch)


@run.cli.factory(target=llm.pretrain, name="coom_gpt_oss_20b_gated")
@launch_arguments(size="20b")
def pretrain_recipe_gated(restore_path: Optional[str] = None, **launch) -> run.Partial:
    """``coom_gpt_oss_20b`` with gated attention (Qiu et al., 2025)."""
    return from_preset(GATED_PRESETS, family="gpt_oss_gated",
                       extras=Extras(restore_path=restore_path), **launch)


def checkpoint_model(path) -> run.Config:
    """The model config (architecture and tokenizer) saved with a NeMo
    checkpoint, e.g. one made by ``import_from_hf``."""
    from nemo.lightning import io

    context = Path(path or "<not given>") / "context"
    if not context.is_dir():
        raise FileNotFoundError(
            f"restore_path: {context} does not exist; import the HF checkpoint first "
            "(coom_nemo.models.gpt_oss_hf.import_from_hf) and give its output directory")
    return io.load_context(str(context), subpath="model", build=False)


def _finetune(method, restore_path, data_dir, size, name, dir, num_nodes, gpus_per_node,
              global_batch_size, micro_batch_size, seq_length, max_steps, precision, layout,
              cpu):
    if (size, method) not in FINETUNE:
        raise ValueError(f"size: {size!r} is not one of {', '.join(PRESETS)}")
    if data_dir is None:
        raise ValueError("data_dir: not given; name a directory with training.jsonl and "
                         "validation.jsonl")
    tuning = FINETUNE[size, method]
    preset = PRESETS[size]
    model = checkpoint_model(restore_path)
    schedule = FINETUNE_SCHEDULE[size]
    if max_steps:
        schedule = dataclasses.replace(schedule, max_steps=max_steps)
    peft = None
    if method == "lora":
        peft = run.Config(LoRA, target_modules=["linear_qkv", "linear_proj"])
    return finetune_recipe(
        restore_path=str(restore_path), peft=peft, name=name or f"gpt_oss_{size}_{method}",
        model=model,
        data=sft_data(data_dir, seq_length or model.config.seq_length,
                      global_batch_size or tuning["global_batch_size"],
                      micro_batch_size or preset.micro_batch_size, cpu=cpu),
        layout=tuning["layout"].updated(layout),
        cluster=Cluster(num_nodes=num_nodes or preset.cluster.num_nodes,
                        gpus_per_node=gpus_per_node or preset.cluster.gpus_per_node,
                        gpu_memory_gb=preset.cluster.gpu_memory_gb),
        schedule=schedule, optim=tuning["optim"], precision=precision, dir=dir, cpu=cpu,
    )


# Fine-tuning data is a directory of JSONL files, not indexed prefixes.
_FINETUNE_ARGUMENTS = launch_arguments(size="20b", exclude=("data_paths", "tokenizer"))


@run.cli.factory(target=llm.finetune, name="coom_gpt_oss_20b_lora")
@_FINETUNE_ARGUMENTS
def lora_recipe(restore_path: Optional[str] = None, data_dir: Optional[str] = None,
                **launch) -> run.Partial:
    """LoRA on the attention projections of an imported GPT-OSS."""
    return _finetune("lora", restore_path, data_dir, **launch)


@run.cli.factory(target=llm.finetune, name="coom_gpt_oss_20b_sft")
@_FINETUNE_ARGUMENTS
def sft_recipe(restore_path: Optional[str] = None, data_dir: Optional[str] = None,
               **launch) -> run.Partial:
    """Full supervised fine-tuning of an imported GPT-OSS."""
    return _finetune("sft", restore_path, data_dir, **launch)
