"""Llama 3.1 8B pretraining as MLPerf Training's small-LLM benchmark
(``coom_llama31_8b_mlperf``).

Every number below comes from the reference, mlcommons/training
``small_llm_pretraining/nemo`` (HEAD aa344c7f):

- Model: pretrain_llama31.py ``get_pretrain`` (NeMo's
  ``Llama31Config8B``: 32 layers, hidden 4096, FFN 14336, 32 heads,
  8 KV heads, RoPE with Llama 3.1 scaling; sequence 8192); the
  vocabulary is the Llama 3.1 tokenizer's (128256; README.md
  "Tokenizer").
- Layout: TP1 PP1 CP1 (``get_pretrain``) on one node of 8 GPUs with
  GBS 32, MBS 2 (config_H200_1x8x1_8b.sh).
- Optimizer, LR schedule (RCP learning rates), evaluation, target 3.3:
  :mod:`coom_nemo.mlperf`.
- Data: C4 ``c4-train.en_6`` (shards 768-895) and the 91205-document
  validation file, :mod:`coom_nemo.c4`; validation in file order
  (README.md "Test data order": "We do not shuffle the validation
  dataset", which its code leaves to an unpatched megatron-core).
- MLPerf mode as for 405B: :func:`coom_nemo.mlperf.benchmark_recipe`.

``size="debug"`` is the same recipe and code path, shrunk to a 2-layer
model with its own small schedule; it trains on a CPU or one GPU.
"""

# No `from __future__ import annotations`: NeMo-Run reads the
# factories' annotations as types to parse CLI arguments.
from typing import Optional

import nemo_run as run
from nemo.collections import llm

from coom_nemo.factory import launch_arguments
from coom_nemo.mlperf import Benchmark, benchmark_preset, benchmark_recipe
from coom_nemo.models.llama import llama31_model
from coom_nemo.recipe import Cluster, Layout

# The rules that differ from the 405B benchmark's (coom_nemo.mlperf).
LLAMA31_8B = Benchmark(
    name="llama31_8b", ruleset="6.1.0", base_gbs=32, min_lr_ratio=0.1,
    total_steps=1_200_000, scale_total_steps=False,
    rcp=((16, 4e-4, 256), (32, 8e-4, 4096), (64, 8e-4, 6144), (96, 1e-3, 16348),
         (128, 2e-3, 32768)),
    eval_every=12288, eval_sequences=1024, eval_start=(0, 1), target_log_ppl=3.3,
    c4_layouts=("reference_8b",))

PRESETS = {
    "8b": benchmark_preset(
        LLAMA31_8B,
        model=llama31_model("8b"),
        layout=Layout(),
        cluster=Cluster(num_nodes=1, gpus_per_node=8, gpu_memory_gb=141.0),  # H200
        global_batch_size=32,
        # The reference's H200 config has MBS 2 with FP8; in bf16 (this
        # recipe's default) the plan estimates 139 GiB of an H200's 140
        # (the estimate is within 2.4% of measured peaks): MBS 1.
        micro_batch_size=1,
        tokenizer="null:128256",
    ),
    "debug": benchmark_preset(
        Benchmark(name="llama31_8b", ruleset="6.1.0", base_gbs=8, min_lr_ratio=0.1,
                  total_steps=64, scale_total_steps=False, rcp=((8, 3e-3, 40),),
                  eval_every=64, eval_sequences=16, eval_start=(0, 1), target_log_ppl=None,
                  c4_layouts=("reference_8b",)),
        model=llama31_model("debug"),
        layout=Layout(),
        cluster=Cluster(num_nodes=1, gpus_per_node=1),
        global_batch_size=8,
        micro_batch_size=2,
        tokenizer="null:1024",
        mock_distinct_samples=32,
    ),
}


@run.cli.factory(target=llm.pretrain, name="coom_llama31_8b_mlperf")
@launch_arguments(size="8b")
def pretrain_recipe(c4_dir: Optional[str] = None, seed: Optional[int] = None,
                    target_log_ppl: Optional[float] = None, restore_path: Optional[str] = None,
                    mlperf: bool = True, save_checkpoints: bool = False,
                    **launch) -> run.Partial:
    """Llama 3.1 8B, MLPerf's small-LLM benchmark; ``size="debug"`` is
    the same recipe, tiny. The arguments are those of
    ``coom_llama31_405b`` (target 3.3 here); ``c4_dir`` holds the
    reference's file layout (``python -m data_prep.c4 --layout
    reference --parts 6``, or MLCommons' preprocessed download).
    """
    return benchmark_recipe(PRESETS, family="llama31_mlperf", factory="coom_llama31_8b_mlperf",
                            c4_dir=c4_dir, seed=seed, target_log_ppl=target_log_ppl,
                            restore_path=restore_path, mlperf=mlperf,
                            save_checkpoints=save_checkpoints, launch=launch)
