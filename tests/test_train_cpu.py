"""Tiny end-to-end pretraining on CPU through the real recipe code."""

from pathlib import Path

from helpers import falls, train

from coom_nemo.model_math import count_params
from coom_nemo.recipes import llama31_405b


def test_debug_llama_trains_checkpoints_and_resumes(tmp_path):
    recipe = llama31_405b.pretrain_recipe(size="debug", cpu=True, dir=str(tmp_path),
                                          max_steps=16, mlperf=False)
    recorder, trainer = train(recipe)
    assert len(recorder.losses) == 16
    assert falls(recorder.losses), recorder.losses
    assert recorder.val_losses, "periodic validation did not run"

    # the analytic count matches the weights megatron-core allocated
    module = trainer.lightning_module
    assert sum(p.numel() for p in module.parameters()) == count_params(module.config).total

    checkpoints = tmp_path / "llama31_debug" / "checkpoints"
    saved = sorted(p.name for p in checkpoints.iterdir() if (p / "weights").is_dir())
    assert any(name.startswith("step=15") for name in saved), saved
    assert list(Path(tmp_path, "tb_logs").rglob("events.out.tfevents.*"))

    # a rerun with a longer schedule resumes from the last checkpoint
    # and
    # leaves what the first run wrote in place
    longer = llama31_405b.pretrain_recipe(size="debug", cpu=True, dir=str(tmp_path),
                                          max_steps=20, mlperf=False)
    resumed, _ = train(longer)
    assert resumed.steps[0] == recorder.steps[-1] + 1 and len(resumed.losses) == 4
    after = {p.name for p in checkpoints.iterdir()}
    assert any(name.startswith("step=19") for name in after)
    assert resumed.losses[0] < recorder.losses[0]


def test_wandb_logs_offline_when_configured(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_PROJECT", "coom-test")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    recipe = llama31_405b.pretrain_recipe(size="debug", cpu=True, dir=str(tmp_path),
                                          max_steps=2)
    assert recipe.log.wandb is not None
    train(recipe)
    runs = list(tmp_path.rglob("offline-run-*"))
    assert runs and any(p.suffix == ".wandb" for p in runs[0].iterdir()), runs
