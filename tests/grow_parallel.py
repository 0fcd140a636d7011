"""Random debug-Llama checkpoints saved by 2 gloo processes at TP2 and
at PP2, through the recipe (start it with torchrun).

Usage: torchrun --nproc-per-node 2 tests/grow_parallel.py OUT_DIR
Writes OUT_DIR/<layout>/llama31_debug/checkpoints/<step>-last. The
learning rate is 0, so the saved weights are the random ones.
"""

import sys

import lightning.pytorch as pl
import nemo_run as run


class Randomize(pl.Callback):
    """Every weight random before the first step; replicated weights
    alike on every rank, a tensor-parallel shard by its rank, a
    pipeline stage's layers by their stage."""

    def on_train_start(self, trainer, pl_module):
        from grow_tools import randomize
        from megatron.core import parallel_state as ps

        def salt(name, p):
            tp = ps.get_tensor_model_parallel_rank()
            return f"{tp if getattr(p, 'tensor_model_parallel', False) else '-'}." \
                   f"{ps.get_pipeline_model_parallel_rank()}."

        randomize(pl_module.module, salt)


def main(out):
    from helpers import one_process_group_each, train

    from coom_nemo.recipes import FACTORIES

    for layout in one_process_group_each(["TP2", "PP2"]):
        recipe = FACTORIES["coom_llama31_405b"](size="debug", cpu=True, dir=f"{out}/{layout}",
                                                gpus_per_node=2, layout=layout, max_steps=1,
                                                mlperf=False)
        recipe.optim.config.lr = 0.0
        recipe.optim.lr_scheduler.min_lr = 0.0
        recipe.trainer.callbacks.append(run.Config(Randomize))
        train(recipe)


if __name__ == "__main__":
    main(*sys.argv[1:])
