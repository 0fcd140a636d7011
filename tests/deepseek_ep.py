"""Train the debug coom_deepseek over 2 gloo ranks, once per RUN
(layout, expert-bias update rate, steps), all in one multi-process job
(start it with torchrun).

Usage: torchrun --nproc-per-node 2 tests/deepseek_ep.py OUT_DIR \
    LAYOUT:RATE:STEPS [LAYOUT:RATE:STEPS ...]
Every rank writes ``OUT_DIR/<LAYOUT>_rate<RATE>.rank<r>.json``: its
losses and ExpertLoadMetrics' per-step scalars. Every run has the same
seed.

The data: mock token sequences over a 64-token vocabulary (the model's
too, so there is no input-independent unigram to learn and collapse
to), repeating every 32 samples (memorizable: hidden states stay
token-specific). With few token types, routing is lumpy by type: a
systematic imbalance that the expert bias can take out. Over a 1024-
token vocabulary the lumps average out and the load is near even from
the start (max/mean ~1.06), so there would be nothing to balance.
"""

import json
import sys
from pathlib import Path

VOCAB = 64


def main(out, *runs):
    from helpers import comparable, one_process_group_each, train

    from coom_nemo.moe_metrics import ExpertLoadMetrics
    from coom_nemo.recipes.deepseek import pretrain_recipe

    for spec in one_process_group_each(runs):
        layout, rate, steps = spec.split(":")
        name = f"{layout}_rate{rate}"
        recipe = pretrain_recipe(size="debug", cpu=True, dir=f"{out}/{name}",
                                 gpus_per_node=2, layout=layout, max_steps=int(steps),
                                 tokenizer=f"null:{VOCAB}", expert_bias_rate=float(rate))
        recipe.model.config.vocab_size = VOCAB
        comparable(recipe)  # no checkpoints
        recipe.trainer.val_check_interval = int(steps)  # validate once, at the end
        recorder, trainer = train(recipe)
        metrics = next(c for c in trainer.callbacks if isinstance(c, ExpertLoadMetrics))
        Path(out, f"{name}.rank{trainer.global_rank}.json").write_text(
            json.dumps({"losses": recorder.losses, "metrics": list(metrics.history)}))

if __name__ == "__main__":
    main(*sys.argv[1:])
