"""Train a debug recipe over several gloo ranks; every rank writes its
losses to ``<dir>/losses_rank<r>.json``.

Usage: python tests/rank_losses.py FACTORY DIR GPUS LAYOUT [MAX_STEPS]
Lightning re-runs this script for ranks 1..GPUS-1, so it must be a file.
Heavy imports stay inside ``main``: checkpoint writers spawn processes
that re-import this file.
"""

import json
import sys
from pathlib import Path


def main(factory, out, gpus, layout, max_steps="12"):
    import fiddle as fdl
    import lightning.pytorch as pl
    import nemo_run as run

    from coom_nemo.recipes import FACTORIES

    class RankLosses(pl.Callback):
        def __init__(self):
            self.losses = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.losses.append(float(loss))

        def on_train_end(self, trainer, pl_module):
            path = Path(out, f"losses_rank{trainer.global_rank}.json")
            path.write_text(json.dumps(self.losses))

    recipe = FACTORIES[factory](size="debug", cpu=True, dir=out, gpus_per_node=int(gpus),
                                layout=layout, max_steps=int(max_steps))
    recipe.trainer.callbacks.append(run.Config(RankLosses))
    fdl.build(recipe)()


if __name__ == "__main__":
    main(*sys.argv[1:])
