"""Loss curves of one debug recipe under several parallel layouts, all
from one multi-process job (start it with torchrun).

Usage: torchrun --nproc-per-node 2 tests/parallel_equivalence.py \
    [--gpu] FACTORY OUT_DIR INIT_WEIGHTS STEPS NUM_LAYERS \
    LAYOUT [LAYOUT ...]
(CPU mode, gloo and fp32 unless ``--gpu``: NCCL and the recipe's bf16.)
Every rank writes ``OUT_DIR/<layout>.rank<r>.json`` (its losses). Every
layout starts from INIT_WEIGHTS (helpers.SaveInitialWeights), which
megatron-core's distributed checkpoint reshards to the layout.
"""

import json
import sys
from pathlib import Path


def main(factory, out, init_weights, steps, num_layers, *layouts, cpu=True):
    from helpers import comparable, one_process_group_each, train

    from coom_nemo.recipes import FACTORIES

    for layout in one_process_group_each(layouts):
        # VP is set after the model is made deeper: the debug size has
        # too few layers for it at the factory's plan check.
        base, _, vp = layout.partition(".VP")
        recipe = FACTORIES[factory](size="debug", cpu=cpu, dir=f"{out}/{layout}",
                                    gpus_per_node=2, layout=base, max_steps=int(steps))
        comparable(recipe, int(num_layers), start_from=init_weights)
        if vp:
            recipe.trainer.strategy.virtual_pipeline_model_parallel_size = int(vp)
        recorder, trainer = train(recipe)
        Path(out, f"{layout}.rank{trainer.global_rank}.json").write_text(
            json.dumps(recorder.losses))

if __name__ == "__main__":
    args = sys.argv[1:]
    main(*[a for a in args if a != "--gpu"], cpu="--gpu" not in args)
