"""GPT-OSS 20B pretraining (``coom_gpt_oss_20b``)."""

# No `from __future__ import annotations`: NeMo-Run reads the
# factories' annotations as types to parse CLI arguments.
from typing import Optional

import nemo_run as run
from nemo.collections import llm

from coom_nemo.models.gpt_oss import gpt_oss_model
from coom_nemo.recipe import Cluster, Layout, Optim, Preset, Schedule, from_preset

PRESETS = {
    "20b": Preset(
        model=gpt_oss_model("20b"),
        layout=Layout(tp=1, pp=1, ep=8),
        cluster=Cluster(num_nodes=1, gpus_per_node=8),
        global_batch_size=256,
        micro_batch_size=1,
        optim=Optim(lr=3e-4, warmup_steps=2000),
        schedule=Schedule(max_steps=100_000, val_check_interval=500),
        tokenizer="null:201088",
    ),
    "debug": Preset(
        model=gpt_oss_model("debug"),
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


@run.cli.factory(target=llm.pretrain, name="coom_gpt_oss_20b")
def pretrain_recipe(
    dir: Optional[str] = None,
    name: Optional[str] = None,
    size: str = "20b",
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
    """GPT-OSS 20B; ``size="debug"`` is the same recipe, tiny."""
    return from_preset(
        PRESETS, size, name=name or f"gpt_oss_{size}", dir=dir, num_nodes=num_nodes,
        gpus_per_node=gpus_per_node, global_batch_size=global_batch_size,
        micro_batch_size=micro_batch_size, seq_length=seq_length, max_steps=max_steps,
        precision=precision, layout=layout, data_paths=data_paths, tokenizer=tokenizer, cpu=cpu,
    )
