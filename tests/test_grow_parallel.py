"""Growth of checkpoints saved by 2 processes (TP2, PP2), loaded whole
in one process; the grown model restored by the recipe."""

import pytest
from conftest import PYTHON, ROOT, free_port
from grow_tools import head_logits
from helpers import train

from coom_nemo import grow
from coom_nemo.grow import Growth
from coom_nemo.recipes import FACTORIES


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{layout: checkpoint} saved by 2 gloo processes."""
    from conftest import run_process

    out = tmp_path_factory.mktemp("parallel")
    code, log = run_process([PYTHON, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                             "--master-port", str(free_port()),
                             str(ROOT / "tests" / "grow_parallel.py"), str(out)], cwd=out,
                            env={"PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"})
    assert code == 0, log[-3000:]
    return {layout: next(out.glob(f"{layout}/*/checkpoints/*-last"))
            for layout in ("TP2", "PP2")}


@pytest.mark.multiproc
def test_growth_command_on_a_tp2_checkpoint(saved, tmp_path, run_cmd):
    """``python -m coom_nemo.grow`` on the TP2 checkpoint; the grown
    model, loaded at TP1, computes the source's logits."""
    out = tmp_path / "grown"
    code, log = run_cmd([PYTHON, "-m", "coom_nemo.grow", str(saved["TP2"]), str(out),
                         "--layers", "4", "--preserve", "--hidden", "256", "--ffn", "768"],
                        env={"PYTHONPATH": str(ROOT)}, timeout=120)
    assert code == 0, log[-3000:]
    assert "grow: layers 2->4 ([0, 1, 0, 1], zeroed [2, 3]), hidden_size 128->256, " \
           "ffn_hidden_size 384->768" in log
    source, state, _ = head_logits(saved["TP2"])
    grown, _, config = head_logits(out)
    assert (config.num_layers, config.hidden_size) == (4, 256)
    assert (grown[0] - source[0]).abs().max() < 1e-5
    # the two TP shards differ: a saved shard was not repeated for both
    qkv = state["decoder.layers.0.self_attention.linear_qkv.weight"]
    assert not qkv[:qkv.shape[0] // 2].equal(qkv[qkv.shape[0] // 2:])
    code, log = run_cmd([PYTHON, "-m", "coom_nemo.grow", str(saved["TP2"]), str(out),
                         "--layers", "4"], env={"PYTHONPATH": str(ROOT)}, timeout=120)
    assert code == 2 and f"error: output: {out} already exists" in log


@pytest.mark.multiproc
def test_pp2_checkpoint_grows_and_the_recipe_restores_it(saved, tmp_path):
    """MIDAS-placed zeroed copies + width from the PP2 checkpoint; the
    recipe given the grown checkpoint builds the grown model and its
    first loss is the source's, on the same batch."""
    out = tmp_path / "grown"
    grow.grow_checkpoint(saved["PP2"], out, Growth(layers=3, depth="midas", preserve=True,
                                                    hidden=256, ffn=768, warmup_steps=2))
    source, _, _ = head_logits(saved["PP2"])
    grown, _, _ = head_logits(out)
    assert (grown[0] - source[0]).abs().max() < 1e-5

    losses = {}
    for name, path in (("source", saved["PP2"]), ("grown", out)):
        recipe = FACTORIES["coom_llama31_405b"](size="debug", cpu=True, max_steps=1,
                                                dir=str(tmp_path / name), restore_path=str(path),
                                                mlperf=False)
        # the recipe's own tokenizer: NeMo 2.7.3 cannot load a training
        # run's context after another load in the same process
        # (nemo/lightning/io/mixin.py:674-681 reads a one-argument
        # callback such as StepMetrics(1) as a pickle path)
        recipe.resume.restore_config.load_artifacts = False
        recipe.log.ckpt = None
        recipe.trainer.enable_checkpointing = False
        losses[name] = train(recipe)[0].losses
        if name == "grown":
            assert recipe.model.config.num_layers == 3
            assert recipe.model.config.hidden_size == 256
            assert recipe.optim.lr_scheduler.warmup_steps == 2
    assert losses["grown"][0] == pytest.approx(losses["source"][0], abs=1e-5)
