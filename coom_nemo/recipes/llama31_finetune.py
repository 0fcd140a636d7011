"""Llama 3.1 fine-tuning from an imported Hugging Face checkpoint.

``coom_llama31_<size>_lora`` trains LoRA adapters on every linear of
the attention and MLP blocks (``linear_qkv``, ``linear_proj``,
``linear_fc1``, ``linear_fc2``), ``coom_llama31_<size>_sft`` all
weights, for sizes ``8b``, ``70b``, ``405b`` (and ``debug`` through the
``size`` argument), on local JSONL (:func:`coom_nemo.data.sft_data`).
Start from :func:`coom_nemo.models.llama_hf.import_from_hf`'s output;
export with :func:`coom_nemo.models.llama_hf.export_to_hf` (SFT) or
:func:`coom_nemo.peft_export.export_lora` (LoRA, PEFT format).

Layouts, batch, learning rates and LoRA rank follow NeMo 2.7.3's
``llama31_8b``/``llama31_70b``/``llama31_405b`` ``finetune_recipe``
(nemo/collections/llm/recipes/), but 405B SFT runs on 14 nodes:
NeMo's 12 hold 96 GPUs, fewer than its TP8 x PP14 = 112.
"""

# No `from __future__ import annotations`: NeMo-Run reads the
# factories' annotations as types to parse CLI arguments.
from typing import Optional

import nemo_run as run
from nemo.collections import llm

from coom_nemo.factory import launch_arguments
from coom_nemo.finetune import METHODS, Tuning, finetune
from coom_nemo.recipe import Cluster, Layout, Optim, Schedule

LORA_TARGETS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
SIZES = ("8b", "70b", "405b")

_NODE = Cluster(num_nodes=1, gpus_per_node=8)
_SCHEDULE = Schedule(max_steps=1000, val_check_interval=50)
# NeMo: LR 1e-4 (LoRA) / 5e-6 (SFT), 50 warmup steps, betas 0.9/0.98
_LORA = Optim(lr=1e-4, min_lr=0.0, warmup_steps=50, weight_decay=0.0, betas=(0.9, 0.98))
_SFT = Optim(lr=5e-6, min_lr=0.0, warmup_steps=50, betas=(0.9, 0.98))
FINETUNE = {
    ("8b", "lora"): Tuning(layout=Layout(), cluster=_NODE, global_batch_size=128,
                          seq_length=2048, schedule=_SCHEDULE, optim=_LORA,
                          lora_dim=8, lora_alpha=16),
    ("8b", "sft"): Tuning(layout=Layout(tp=2), cluster=_NODE, global_batch_size=128,
                         seq_length=2048, schedule=_SCHEDULE, optim=_SFT),
    ("70b", "lora"): Tuning(layout=Layout(tp=8), cluster=_NODE, global_batch_size=128,
                           seq_length=2048, schedule=_SCHEDULE, optim=_LORA,
                           lora_dim=16, lora_alpha=32),
    ("70b", "sft"): Tuning(layout=Layout(tp=8, pp=4), cluster=Cluster(num_nodes=4),
                          global_batch_size=128, seq_length=2048, schedule=_SCHEDULE,
                          optim=_SFT),
    ("405b", "lora"): Tuning(layout=Layout(tp=4, pp=6, vp=7), cluster=Cluster(num_nodes=3),
                             global_batch_size=6, seq_length=2048, schedule=_SCHEDULE,
                             optim=_LORA, lora_dim=16, lora_alpha=32),
    ("405b", "sft"): Tuning(layout=Layout(tp=8, pp=14), cluster=Cluster(num_nodes=14),
                            global_batch_size=6, seq_length=2048, schedule=_SCHEDULE,
                            optim=_SFT),
    # the same code path on a CPU in seconds (tests, README)
    ("debug", "lora"): Tuning(layout=Layout(), cluster=Cluster(num_nodes=1, gpus_per_node=1),
                             global_batch_size=4, micro_batch_size=2,
                             schedule=Schedule(max_steps=10, val_check_interval=5,
                                               limit_val_batches=1),
                             optim=Optim(lr=1e-2, warmup_steps=2, weight_decay=0.0),
                             lora_dim=8, lora_alpha=16),
    ("debug", "sft"): Tuning(layout=Layout(), cluster=Cluster(num_nodes=1, gpus_per_node=1),
                            global_batch_size=4, micro_batch_size=2,
                            schedule=Schedule(max_steps=10, val_check_interval=5,
                                              limit_val_batches=1),
                            optim=Optim(lr=1e-3, warmup_steps=2)),
}


def _factory(size: str, method: str):
    name = f"coom_llama31_{size}_{method}"

    # Fine-tuning data is a directory of JSONL files, not indexed
    # prefixes, and the tokenizer is the checkpoint's.
    @run.cli.factory(target=llm.finetune, name=name)
    @launch_arguments(size=size, exclude=("data_paths", "tokenizer"))
    def factory(restore_path: Optional[str] = None, data_dir: Optional[str] = None,
                **launch) -> run.Partial:
        return finetune(FINETUNE, method, family="llama31", lora_targets=LORA_TARGETS,
                        importer="python recipes/llama31_hf.py import HF_DIR OUT",
                        restore_path=restore_path, data_dir=data_dir, **launch)

    what = "LoRA adapters on" if method == "lora" else "full supervised fine-tuning of"
    factory.__doc__ = f"{what} an imported Llama 3.1 ({size} by default)."
    factory.__name__ = factory.__qualname__ = f"{method}_recipe_{size}"
    return factory


FACTORIES = {f"coom_llama31_{size}_{method}": _factory(size, method)
             for size in SIZES for method in METHODS}
