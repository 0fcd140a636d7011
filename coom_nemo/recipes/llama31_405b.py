"""Llama 3.1 405B pretraining (``coom_llama31_405b``)."""

# No `from __future__ import annotations`: NeMo-Run reads the
# factories' annotations as types to parse CLI arguments.
from typing import Optional

import nemo_run as run
from nemo.collections import llm

from coom_nemo.models.llama import llama31_model
from coom_nemo.recipe import Cluster, Layout, Optim, Preset, Schedule, from_preset

PRESETS = {
    "405b": Preset(
        model=llama31_model("405b"),
        # 126 layers = 18 stages x 7 chunks of 1 layer; 288 GPUs a
        # replica
        # (the plan check finds PP=9 over 80 GB in bf16), so 72 nodes of
        # 8
        # give DP=2 and GBS 1152 = 2 x 576 micro-batches.
        layout=Layout(tp=8, pp=18, vp=7, cp=2),
        cluster=Cluster(num_nodes=72, gpus_per_node=8),
        global_batch_size=1152,
        micro_batch_size=1,
        optim=Optim(lr=8e-5, min_lr=8e-7, warmup_steps=8000),
        schedule=Schedule(max_steps=1_200_000, val_check_interval=16),
        tokenizer="null:128256",
    ),
    "debug": Preset(
        model=llama31_model("debug"),
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


@run.cli.factory(target=llm.pretrain, name="coom_llama31_405b")
def pretrain_recipe(
    dir: Optional[str] = None,
    name: Optional[str] = None,
    size: str = "405b",
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
    """Llama 3.1 405B; ``size="debug"`` is the same recipe, tiny."""
    return from_preset(
        PRESETS, size, name=name or f"llama31_{size}", dir=dir, num_nodes=num_nodes,
        gpus_per_node=gpus_per_node, global_batch_size=global_batch_size,
        micro_batch_size=micro_batch_size, seq_length=seq_length, max_steps=max_steps,
        precision=precision, layout=layout, data_paths=data_paths, tokenizer=tokenizer, cpu=cpu,
    )
