"""Parallel layouts on CPU (2 gloo processes) through the real recipes.

Each layout starts from the weights a single-process run started from
(megatron-core's distributed checkpoint reshards them) and must then
produce the single-process loss curve, on every rank.
"""

import json

import nemo_run as run
import pytest
from conftest import PYTHON, ROOT, free_port
from helpers import SaveInitialWeights, comparable, falls, train

from coom_nemo.plan import PlanError
from coom_nemo.recipes import FACTORIES

STEPS = 10


def reference_then_layouts(run_cmd, tmp_path, factory, num_layers, layouts):
    """Single-process losses, then {layout: [rank 0's, rank 1's]}."""
    recipe = FACTORIES[factory](size="debug", cpu=True, dir=str(tmp_path / "ref"),
                                max_steps=STEPS)
    comparable(recipe, num_layers)
    init = str(tmp_path / "init")
    recipe.trainer.callbacks.append(run.Config(SaveInitialWeights, path=init))
    reference, _ = train(recipe)
    code, out = run_cmd([PYTHON, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                         "--master-port", str(free_port()),
                         str(ROOT / "tests" / "parallel_equivalence.py"), factory,
                         str(tmp_path), init, str(STEPS), str(num_layers), *layouts],
                        env={"PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"})
    assert code == 0, out[-3000:]
    curves = {layout: [json.loads((tmp_path / f"{layout}.rank{r}.json").read_text())
                       for r in range(2)] for layout in layouts}
    return reference.losses, curves


def assert_all_follow(reference, curves):
    """Every layout's rank 0 follows the reference; ranks that compute
    the loss themselves agree (with PP, rank 0 receives it)."""
    assert falls(reference), reference
    for layout, (rank0, rank1) in curves.items():
        assert rank0 == pytest.approx(reference, rel=1e-5), layout
        if not layout.startswith("PP"):
            assert rank1 == pytest.approx(rank0, rel=1e-6), layout


@pytest.mark.multiproc
def test_llama_dp2_tp2_pp2_match_single_process(run_cmd, tmp_path):
    assert_all_follow(*reference_then_layouts(run_cmd, tmp_path, "coom_llama31_405b", 4,
                                              ["TP1", "TP2", "PP2"]))


def test_interleaving_with_two_pipeline_stages_is_refused():
    with pytest.raises(PlanError, match="VP needs PP > 2"):
        FACTORIES["coom_llama31_405b"](size="debug", cpu=True, gpus_per_node=2,
                                       layout="PP2.VP2")


@pytest.mark.multiproc
def test_deepseek_dp2_ep2_pp2_match_single_process(run_cmd, tmp_path):
    """MLA + MoE (sigmoid routing, expert bias, aux loss) + MTP."""
    assert_all_follow(*reference_then_layouts(run_cmd, tmp_path, "coom_deepseek", 2,
                                              ["TP1", "TP1.EP2", "PP2"]))
