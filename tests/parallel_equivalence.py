"""Loss curves of one debug recipe under several parallel layouts, all
from one multi-process job (start it with torchrun).

Usage: torchrun --nproc-per-node 2 tests/parallel_equivalence.py \
    FACTORY OUT_DIR INIT_WEIGHTS STEPS NUM_LAYERS LAYOUT [LAYOUT ...]
Every rank writes ``OUT_DIR/<layout>.rank<r>.json`` (its losses). Every
layout starts from INIT_WEIGHTS (helpers.SaveInitialWeights), which
megatron-core's distributed checkpoint reshards to the layout.
"""

import json
import sys
from pathlib import Path


def main(factory, out, init_weights, steps, num_layers, *layouts):
    import os

    import fiddle as fdl
    import nemo_run as run
    from helpers import LossRecorder, comparable

    from coom_nemo.recipes import FACTORIES

    # Each layout starts a new process group; a fresh store per group
    # (not torchrun's agent store, which keeps the last group's keys).
    os.environ["TORCHELASTIC_USE_AGENT_STORE"] = "False"
    first_port = int(os.environ["MASTER_PORT"]) + 1
    for index, layout in enumerate(layouts):
        os.environ["MASTER_PORT"] = str(first_port + index)
        # VP is set after the model is made deeper: the debug size has
        # too few layers for it at the factory's plan check.
        base, _, vp = layout.partition(".VP")
        recipe = FACTORIES[factory](size="debug", cpu=True, dir=f"{out}/{layout}",
                                    gpus_per_node=2, layout=base, max_steps=int(steps))
        comparable(recipe, int(num_layers), start_from=init_weights)
        if vp:
            recipe.trainer.strategy.virtual_pipeline_model_parallel_size = int(vp)
        recipe.trainer.callbacks.append(run.Config(LossRecorder))
        fn = fdl.build(recipe)
        recorder = next(c for c in fn.keywords["trainer"].callbacks
                        if isinstance(c, LossRecorder))
        fn()
        rank = fn.keywords["trainer"].global_rank
        Path(out, f"{layout}.rank{rank}.json").write_text(json.dumps(recorder.losses))


if __name__ == "__main__":
    main(*sys.argv[1:])
