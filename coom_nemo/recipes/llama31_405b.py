"""Llama 3.1 405B pretraining as MLPerf Training's benchmark
(``coom_llama31_405b``).

Every number below comes from the reference, mlcommons/training
``large_language_model_pretraining/nemo`` (master, 95f90e85):

- Model: README.md "Model details" (126 layers, hidden 16384, FFN
  53248, 128 heads, 8 KV heads, RoPE with Llama 3.1 scaling, SwiGLU,
  RMSNorm, context 8192); NeMo's ``Llama31Config405B`` built in
  pretrain_llama31.py. The vocabulary is the tokenizer's: Llama 3.1's
  128256 by default (405.85B parameters), the reference's Mixtral
  8x22B tokenizer (32768) or any other given with ``tokenizer``.
- Layout: NeMo 24.12's ``llama31_405b`` recipe that the reference
  builds on (TP8, PP9, CP4, sequence parallel) with the reference's
  ``virtual_pipeline_model_parallel_size = 7``; 288 nodes of 8 GPUs
  (config.sh ``NNODES=288``) give DP 8, i.e. 144 micro-batches of 1
  per step at GBS 1152 (the RCP file's gradient_accumulation_steps).
- GBS 1152 and MBS 1: get_parser defaults, config.sh ``GBS``/``MBS``.
- Optimizer, LR schedule, evaluation, target: :mod:`coom_nemo.mlperf`.
- Data: C4 split and file layouts, :mod:`coom_nemo.c4`.
- Start from HF weights: the reference restores a NeMo conversion of
  the HF 405B checkpoint (utils/nemo_convert.py, ``--resume_from_hf``:
  ``AutoResume(restore_config=RestoreConfig(path))``, weights only);
  here ``restore_path`` names the output of
  ``recipes/llama31_import_hf.py``.
- Seeds: one seed seeds the model (strategy) and the data order
  (the reference's per-run ``--seeds``), and is logged at start;
  MLPerf mode draws a random one per run unless given.
- MLPerf mode (default on): :func:`coom_nemo.mlperf.benchmark_recipe`.

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

PRESETS = {
    "405b": benchmark_preset(
        Benchmark(),
        model=llama31_model("405b"),
        layout=Layout(tp=8, pp=9, vp=7, cp=4),
        cluster=Cluster(num_nodes=288, gpus_per_node=8),
        global_batch_size=1152,
        micro_batch_size=1,
        tokenizer="null:128256",
    ),
    # The reference's 8b debugging size (NeMo's llama3_8b layout, peak
    # LR 3e-4, 2000 warmup steps) under the same schedule formulas.
    "8b": benchmark_preset(
        Benchmark(base_lr=3e-4, min_lr=3e-5, warmup_steps=2000),
        model=llama31_model("8b"),
        layout=Layout(tp=1, pp=1, cp=2),
        cluster=Cluster(num_nodes=1, gpus_per_node=8),
        global_batch_size=1152,
        micro_batch_size=1,
        tokenizer="null:128256",
    ),
    "debug": benchmark_preset(
        Benchmark(base_gbs=8, base_lr=3e-3, min_lr=3e-5, warmup_steps=5, total_steps=64,
                  eval_every=64, eval_sequences=16, eval_start=(0, 1), target_log_ppl=None),
        model=llama31_model("debug"),
        layout=Layout(),
        cluster=Cluster(num_nodes=1, gpus_per_node=1),
        global_batch_size=8,
        micro_batch_size=2,
        tokenizer="null:1024",
        mock_distinct_samples=32,
    ),
}


@run.cli.factory(target=llm.pretrain, name="coom_llama31_405b")
@launch_arguments(size="405b")
def pretrain_recipe(c4_dir: Optional[str] = None, seed: Optional[int] = None,
                    target_log_ppl: Optional[float] = None, restore_path: Optional[str] = None,
                    mlperf: bool = True, save_checkpoints: bool = False,
                    **launch) -> run.Partial:
    """Llama 3.1 405B, MLPerf's benchmark; ``size="debug"`` is the same
    recipe, tiny. ``max_steps`` stops early; the LR schedule and the
    data order keep the benchmark's length.

    Args:
        c4_dir: Directory with the benchmark's C4 indexed files, as
            data_prep or the reference writes them
            (:mod:`coom_nemo.c4`); without it (and ``data_paths``) the
            data is mock tokens.
        seed: Seeds the weights and the data order; logged at start.
            Default: random per run in MLPerf mode, else 1234.
        target_log_ppl: Stop at this validation log perplexity (default:
            the benchmark's, 5.6; none for ``debug``).
        restore_path: NeMo checkpoint to start from, weights only (e.g.
            HF weights converted by ``recipes/llama31_import_hf.py``).
        mlperf: MLPerf mode: MLLOG file and lines, random seed, no
            checkpoints, the reference's data index
            (:func:`coom_nemo.mlperf.benchmark_recipe`).
        save_checkpoints: In MLPerf mode, save checkpoints anyway.
    """
    return benchmark_recipe(PRESETS, family="llama31", factory="coom_llama31_405b",
                            c4_dir=c4_dir, seed=seed, target_log_ppl=target_log_ppl,
                            restore_path=restore_path, mlperf=mlperf,
                            save_checkpoints=save_checkpoints, launch=launch)
