"""DeepSeek-style MoE recipes: coom_deepseek, coom_deepseek_v3."""

# No `from __future__ import annotations`: NeMo-Run reads the
# factories' annotations as types to parse CLI arguments.
from typing import Optional

import nemo_run as run
from nemo.collections import llm

from coom_nemo.models.deepseek import deepseek_model
from coom_nemo.recipe import Cluster, Layout, Optim, Preset, Schedule, from_preset

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
        model=deepseek_model("v3"),
        # 61 layers = 3 (first stage, with the embedding) + 14 x 4 + 2
        # (last
        # stage, with the output layer and MTP)
        layout=Layout(tp=2, pp=16, ep=64, etp=1, first_stage_layers=3, last_stage_layers=2),
        cluster=Cluster(num_nodes=128, gpus_per_node=8),
        global_batch_size=4096,
        micro_batch_size=1,
        optim=Optim(lr=2.2e-4, warmup_steps=2000),
        schedule=Schedule(max_steps=100_000, val_check_interval=500),
        tokenizer="null:129280",
    ),
    "debug": Preset(
        model=deepseek_model("debug"),
        layout=Layout(),
        cluster=Cluster(num_nodes=1, gpus_per_node=1),
        global_batch_size=8,
        micro_batch_size=2,
        optim=Optim(lr=3e-3, warmup_steps=5),
        schedule=Schedule(max_steps=20, val_check_interval=10, limit_val_batches=2),
        tokenizer="null:1024",
        mock_distinct_samples=32,
    ),
}


def _recipe(size, name, dir, num_nodes, gpus_per_node, global_batch_size, micro_batch_size,
            seq_length, max_steps, precision, layout, data_paths, tokenizer, cpu):
    return from_preset(
        PRESETS, size, name=name or f"deepseek_{size}", dir=dir, num_nodes=num_nodes,
        gpus_per_node=gpus_per_node, global_batch_size=global_batch_size,
        micro_batch_size=micro_batch_size, seq_length=seq_length, max_steps=max_steps,
        precision=precision, layout=layout, data_paths=data_paths, tokenizer=tokenizer, cpu=cpu,
    )


@run.cli.factory(target=llm.pretrain, name="coom_deepseek")
def pretrain_recipe(
    dir: Optional[str] = None,
    name: Optional[str] = None,
    size: str = "16b",
    num_nodes: Optional[int] = None,
    gpus_per_node: Optional[int] = None,
    global_batch_size: Optional[int] = None,
    micro_batch_size: Optional[int] = None,
    seq_length: Optional[int] = None,
    max_steps: Optional[int] = None,
    precision: str = "bf16",
    layout: Optional[str] = None,
    data_paths: Optional[list[str]] = None,
    tokenizer: Optional[str] = None,
    cpu: bool = False,
) -> run.Partial:
    """DeepSeek-style MoE, ~16B total / ~2.5B active by default."""
    return _recipe(size, name, dir, num_nodes, gpus_per_node, global_batch_size,
                   micro_batch_size, seq_length, max_steps, precision, layout, data_paths,
                   tokenizer, cpu)


@run.cli.factory(target=llm.pretrain, name="coom_deepseek_v3")
def pretrain_recipe_v3(
    dir: Optional[str] = None,
    name: Optional[str] = None,
    num_nodes: Optional[int] = None,
    global_batch_size: Optional[int] = None,
    max_steps: Optional[int] = None,
    precision: str = "bf16",
    layout: Optional[str] = None,
    data_paths: Optional[list[str]] = None,
    tokenizer: Optional[str] = None,
) -> run.Partial:
    """The 671B DeepSeek-V3 size of ``coom_deepseek``."""
    return _recipe("v3", name, dir, num_nodes, None, global_batch_size, None, None, max_steps,
                   precision, layout, data_paths, tokenizer, False)
