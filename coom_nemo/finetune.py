"""Fine-tuning from an imported checkpoint, for every family.

A family's fine-tuning factories differ only in a table of
:class:`Tuning` values (layout, batch, optimizer, schedule per size and
method) and the names LoRA adapts; :func:`finetune` turns one into the
``run.Partial`` of :func:`coom_nemo.recipe.finetune_recipe` on local
JSONL data (:func:`coom_nemo.data.sft_data`), with the architecture
and tokenizer read from the checkpoint.
"""

# No `from __future__ import annotations`: run.Config reads the types.
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import nemo_run as run

from coom_nemo.recipe import Cluster, Layout, Optim, Schedule, finetune_recipe

METHODS = ("lora", "sft")


@dataclass(frozen=True)
class Tuning:
    """Defaults of one (size, method): what a launch may change."""

    layout: Layout
    cluster: Cluster
    global_batch_size: int
    optim: Optim
    schedule: Schedule
    micro_batch_size: int = 1
    seq_length: int | None = None  # None: the checkpoint's
    lora_dim: int = 32  # LoRA rank (NeMo's default)
    lora_alpha: int = 32  # adapters are scaled by alpha / dim


def checkpoint_model(path, importer: str) -> run.Config:
    """The model config (architecture and tokenizer) saved with a NeMo
    checkpoint, e.g. one made by ``importer``."""
    from nemo.lightning import io

    context = Path(path or "<not given>") / "context"
    if not context.is_dir():
        raise FileNotFoundError(
            f"restore_path: {context} does not exist; import the HF checkpoint first "
            f"({importer}) and give its output directory")
    return io.load_context(str(context), subpath="model", build=False)


def finetune(tunings: dict, method: str, *, family: str, lora_targets: list[str],
             importer: str, restore_path, data_dir, size: str, name=None, dir=None,
             num_nodes=None, gpus_per_node=None, global_batch_size=None,
             micro_batch_size=None, seq_length=None, max_steps=None, precision="bf16",
             layout=None, cpu=False) -> run.Partial:
    """LoRA (``method="lora"``, adapters on ``lora_targets``) or full
    SFT of the checkpoint at ``restore_path`` on ``data_dir``'s JSONL,
    with ``tunings[size, method]`` and the launch arguments
    (:mod:`coom_nemo.factory`) over it."""
    from coom_nemo.data import sft_data
    from coom_nemo.peft import LoRA

    if (size, method) not in tunings:
        sizes = sorted({s for s, _ in tunings})
        raise ValueError(f"size: {size!r} is not one of {', '.join(sizes)}")
    if data_dir is None:
        raise ValueError("data_dir: not given; name a directory with training.jsonl and "
                         "validation.jsonl")
    tuning = tunings[size, method]
    model = checkpoint_model(restore_path, importer)
    schedule = tuning.schedule
    if max_steps:
        # the data module sizes its set to max_steps batches and
        # Lightning refuses a validation interval beyond them
        schedule = dataclasses.replace(
            schedule, max_steps=max_steps,
            val_check_interval=min(schedule.val_check_interval, max_steps))
    peft = None
    if method == "lora":
        peft = run.Config(LoRA, target_modules=list(lora_targets), dim=tuning.lora_dim,
                          alpha=tuning.lora_alpha)
    seq = seq_length or tuning.seq_length or model.config.seq_length
    return finetune_recipe(
        restore_path=str(restore_path), peft=peft, name=name or f"{family}_{size}_{method}",
        model=model,
        data=sft_data(data_dir, seq, global_batch_size or tuning.global_batch_size,
                      micro_batch_size or tuning.micro_batch_size, cpu=cpu),
        layout=tuning.layout.updated(layout),
        cluster=dataclasses.replace(tuning.cluster,
                                    num_nodes=num_nodes or tuning.cluster.num_nodes,
                                    gpus_per_node=gpus_per_node or tuning.cluster.gpus_per_node),
        schedule=schedule, optim=tuning.optim, precision=precision, dir=dir, cpu=cpu,
    )
