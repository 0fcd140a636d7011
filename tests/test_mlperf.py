"""MLPerf mode of the Llama 3.1 benchmark recipes: MLLOG output that
MLPerf's own compliance checker accepts, the 8B benchmark's rules
against the reference's code, what MLPerf mode changes in a recipe."""

import math
from types import SimpleNamespace

import fiddle as fdl
import pytest
import torch
from mlperf_check import compliance_failures, mllog_events

from coom_nemo.mllog import MLPerfLogger
from coom_nemo.mlperf import EvalCadence, QualityTarget
from coom_nemo.plan import PlanError
from coom_nemo.recipes import llama31_8b_mlperf, llama31_405b

FACTORIES = {"llama31_405b": llama31_405b.pretrain_recipe,
             "llama31_8b": llama31_8b_mlperf.pretrain_recipe}


def mllog_callback(recipe) -> MLPerfLogger:
    configs = [c for c in recipe.trainer.callbacks if c.__fn_or_cls__ is MLPerfLogger]
    assert len(configs) == 1
    return fdl.build(configs[0])


def log_without_training(recipe, directory, val_loss: float):
    """The MLLOG file of a run of ``recipe`` that is set up, starts, and
    evaluates once at its first evaluation step with ``val_loss``, with
    no weights: the optimizer, model config and layout are the
    full-size recipe's own, built."""
    callback = mllog_callback(recipe)
    callback.log_dir = str(directory)
    config = recipe.trainer.strategy
    strategy = SimpleNamespace(barrier=lambda: None, **{
        key: getattr(config, key) for key in (
            "seed", "tensor_model_parallel_size", "pipeline_model_parallel_size",
            "context_parallel_size", "expert_model_parallel_size")})
    trainer = SimpleNamespace(
        global_rank=0, global_step=0, sanity_checking=False, should_stop=False,
        world_size=recipe.trainer.num_nodes * recipe.trainer.devices, strategy=strategy,
        callback_metrics={}, default_root_dir=str(directory),
        datamodule=SimpleNamespace(global_batch_size=recipe.data.global_batch_size,
                                   micro_batch_size=recipe.data.micro_batch_size))
    module = SimpleNamespace(optim=fdl.build(recipe.optim), config=fdl.build(recipe.model.config))
    callback.setup(trainer, module, "fit")
    callback.on_train_start(trainer, module)
    callback.on_train_epoch_start(trainer, module)
    trainer.global_step = recipe.trainer.val_check_interval
    callback.on_validation_start(trainer, module)
    trainer.callback_metrics["val_loss"] = torch.tensor(val_loss)
    callback.on_validation_end(trainer, module)
    callback.on_train_end(trainer, module)
    return callback.path


@pytest.mark.parametrize("benchmark, gbs, ruleset", [
    ("llama31_405b", 1152, "6.0.0"), ("llama31_405b", 2304, "6.0.0"),
    ("llama31_8b", 32, "6.1.0"), ("llama31_8b", 128, "6.1.0")])
def test_full_size_log_passes_the_compliance_checker(benchmark, gbs, ruleset, tmp_path):
    """Every key and value the newest ruleset with the benchmark checks
    passes, but one: no run without training can reach the quality
    target, so the evaluation logs an untrained model's loss,
    ln(vocabulary), and ``eval_accuracy``'s "at least one evaluation at
    or below the target" is the only failure."""
    recipe = FACTORIES[benchmark](global_batch_size=gbs, seed=4242)
    path = log_without_training(recipe, tmp_path, val_loss=math.log(128256))
    assert path == tmp_path / f"mlperf_{benchmark}.log"
    failures = compliance_failures(path, ruleset)
    assert list(failures) == ["eval_accuracy"], failures
    target = {"llama31_405b": 5.6, "llama31_8b": 3.3}[benchmark]
    assert f"(v['value'] <= {target})" in failures["eval_accuracy"]

    events = {e["key"]: e for e in mllog_events(path)}
    assert events["seed"]["value"] == 4242
    assert events["global_batch_size"]["value"] == gbs
    assert events["submission_benchmark"]["value"] == benchmark
    assert events["eval_accuracy"]["metadata"]["samples_count"] == (
        recipe.trainer.val_check_interval * gbs)
    assert events["run_stop"]["metadata"]["status"] == "aborted"


def test_a_log_that_breaks_a_rule_fails_the_checker(tmp_path):
    """The checker does check values: an LR changed after the factory
    (as a ``key=value`` override does) shows in the log and fails, and
    so does a missing key, so the test above can fail."""
    recipe = llama31_405b.pretrain_recipe(seed=1)
    recipe.optim.config.lr *= 2
    logger = [c for c in recipe.trainer.callbacks if c.__fn_or_cls__ is MLPerfLogger][0]
    logger.configs = {k: v for k, v in logger.configs.items() if k != "eval_samples"}
    path = log_without_training(recipe, tmp_path, val_loss=5.5)
    failures = compliance_failures(path, "6.0.0")
    assert set(failures) == {"opt_base_learning_rate", "eval_samples"}, failures


def test_log_file_is_never_appended_to(tmp_path):
    recipe = llama31_8b_mlperf.pretrain_recipe(seed=1)
    first = log_without_training(recipe, tmp_path, val_loss=3.0)
    text = first.read_text()
    second = log_without_training(recipe, tmp_path, val_loss=3.0)
    assert second == tmp_path / "mlperf_llama31_8b.2.log" and first.read_text() == text
    # the target reached: a successful run, no block after the last eval
    events = mllog_events(second)
    assert events[-2]["key"] == "run_stop" and events[-2]["metadata"]["status"] == "success"
    assert [e["key"] for e in events[-5:-2]] == ["eval_start", "eval_accuracy", "eval_stop"]


# small_llm_pretraining/nemo/pretrain_llama31.py, written out at each
# GBS of the RCP table (rcps_llama31_8b.json): max_steps is the
# --max_steps default whatever the GBS, min LR 0.1 x max_lr, decay over
# max_steps - warmup, evaluation every ceil(12288 / GBS) steps on
# ceil(1024 / GBS) batches, index for max_steps x GBS samples.
RCP_8B = {16: (4e-4, 256), 32: (8e-4, 4096), 64: (8e-4, 6144), 96: (1e-3, 16348),
          128: (2e-3, 32768)}


def reference_8b(gbs):
    max_lr, warmup_samples = RCP_8B[gbs]
    warmup_steps = math.ceil(warmup_samples / gbs)
    max_steps = 1200000
    return dict(lr=max_lr, min_lr=max_lr * 0.1, warmup=warmup_steps, max_steps=max_steps,
                decay=max_steps - warmup_steps, every=math.ceil(12288 / gbs),
                batches=math.ceil(1024 / gbs), samples=max_steps * gbs)


@pytest.mark.parametrize("gbs", sorted(RCP_8B))
def test_8b_formulas_match_the_reference(gbs):
    ref, rules = reference_8b(gbs), llama31_8b_mlperf.LLAMA31_8B
    assert (rules.lr(gbs), rules.end_lr(gbs)) == (ref["lr"], ref["min_lr"])
    assert rules.warmup(gbs) == ref["warmup"]
    assert rules.max_steps(gbs) == ref["max_steps"]
    assert rules.max_steps(gbs) - rules.warmup(gbs) == ref["decay"]
    assert rules.eval_interval(gbs) == rules.first_eval(gbs) == ref["every"]
    assert rules.eval_batches(gbs) == ref["batches"]
    assert rules.train_samples(gbs) == ref["samples"]


# rcps_llama31_8b.json "Epochs to converge" (samples) of the reference
# runs at GBS 16, 32, 64 and 128. (At GBS 96 they are multiples of 129
# steps, not of ceil(12288 / 96) = 128: that run's evaluation cadence
# was not the code's formula.)
RCP_8B_CONVERGED = {
    16: [159744, 172032], 32: [196608, 172032, 184320], 64: [233472, 208896, 245760, 221184],
    128: [368640, 344064, 356352, 405504, 307200, 331776, 380928, 319488],
}


@pytest.mark.parametrize("gbs", sorted(RCP_8B_CONVERGED))
def test_8b_reference_convergence_points_are_our_evaluation_steps(gbs):
    rules = llama31_8b_mlperf.LLAMA31_8B
    for samples in RCP_8B_CONVERGED[gbs]:
        step, rest = divmod(samples, gbs)
        assert rest == 0 and step % rules.eval_interval(gbs) == 0, samples


def test_8b_recipe_carries_the_reference_settings(capsys):
    recipe = llama31_8b_mlperf.pretrain_recipe()
    strategy = recipe.trainer.strategy
    assert (strategy.tensor_model_parallel_size, strategy.pipeline_model_parallel_size,
            strategy.context_parallel_size) == (1, 1, 1)
    assert (recipe.trainer.num_nodes, recipe.trainer.devices) == (1, 8)
    assert (recipe.data.global_batch_size, recipe.data.micro_batch_size) == (32, 1)
    config = recipe.model.config
    assert (config.num_layers, config.hidden_size, config.ffn_hidden_size,
            config.num_attention_heads, config.num_query_groups, config.seq_length,
            config.vocab_size) == (32, 4096, 14336, 32, 8, 8192, 128256)
    opt = recipe.optim.config
    assert (opt.lr, opt.weight_decay, opt.adam_beta1, opt.adam_beta2, opt.adam_eps,
            opt.clip_grad) == (8e-4, 0.1, 0.9, 0.95, 1e-5, 1.0)
    sched = recipe.optim.lr_scheduler
    assert (sched.warmup_steps, sched.max_steps, sched.min_lr) == (128, 1_200_000, 8e-4 * 0.1)
    assert (recipe.trainer.val_check_interval, recipe.trainer.limit_val_batches) == (384, 32)
    callbacks = {c.__fn_or_cls__: c for c in recipe.trainer.callbacks}
    assert callbacks[QualityTarget].target == 3.3
    assert (callbacks[EvalCadence].first_step, callbacks[EvalCadence].every_n_steps) == (384, 384)
    assert "model=llama31_mlperf_8b params=8.03B " in capsys.readouterr().out


def test_8b_batch_size_without_reference_hyperparameters_is_refused():
    with pytest.raises(PlanError, match=r"data.global_batch_size: llama31_8b has reference "
                       r"hyperparameters \(RCPs\) for GBS 16, 32, 64, 96, 128 only, not 48"):
        llama31_8b_mlperf.pretrain_recipe(global_batch_size=48)


def test_8b_c4_dir_needs_the_reference_layout(tmp_path):
    for name in ("train", "validation"):
        for suffix in (".bin", ".idx"):
            (tmp_path / f"{name}{suffix}").touch()
    with pytest.raises(FileNotFoundError, match="build them with python -m data_prep.c4 "
                       "--layout reference"):
        llama31_8b_mlperf.pretrain_recipe(size="debug", cpu=True, c4_dir=str(tmp_path))


def test_mlperf_mode_settings(tmp_path):
    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    for name in ("train", "validation"):  # one tiny document each (checked before launch)
        builder = IndexedDatasetBuilder(str(tmp_path / f"{name}.bin"), dtype=np.int32)
        builder.add_document(torch.tensor([1, 2, 3]), [3])
        builder.finalize(str(tmp_path / f"{name}.idx"))
    data = {"train": [str(tmp_path / "train")], "validation": [str(tmp_path / "validation")]}
    recipe = llama31_405b.pretrain_recipe(global_batch_size=2304, max_steps=10, data_paths=data)
    # the index is the reference's whatever max_steps says
    assert recipe.data.num_train_samples == 600_000 * 2304
    assert recipe.data.dataset_cls.__name__ == "InOrderEvalDataset"
    assert recipe.log.ckpt is None and recipe.trainer.enable_checkpointing is False
    seeds = {llama31_405b.pretrain_recipe(size="debug", cpu=True).trainer.strategy.seed
             for _ in range(4)}
    assert len(seeds) > 1 and all(0 <= s <= 32767 for s in seeds)

    kept = llama31_405b.pretrain_recipe(data_paths=data, save_checkpoints=True)
    assert kept.log.ckpt is not None and kept.trainer.enable_checkpointing is not False
    plain = llama31_405b.pretrain_recipe(data_paths=data, mlperf=False, max_steps=10)
    assert plain.trainer.strategy.seed == 1234 and plain.log.ckpt is not None
    assert not any(c.__fn_or_cls__ is MLPerfLogger for c in plain.trainer.callbacks)
    assert getattr(plain.data, "num_train_samples", None) is None


def test_every_rank_of_a_launch_draws_the_same_seed(monkeypatch):
    from coom_nemo.mlperf import run_seed

    for key in ("TORCHELASTIC_RUN_ID", "LOCAL_RANK", "COOM_MLPERF_SEED"):
        monkeypatch.delenv(key, raising=False)
    drawn = run_seed(None)  # rank 0 of a CPU-mode launch draws ...
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert run_seed(None) == drawn  # ... and the ranks it starts inherit it
    assert run_seed(5) == 5
    # torchrun: each rank derives it from the launch's rendezvous
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    seeds = set()
    for rank in ("0", "1"):
        monkeypatch.setenv("LOCAL_RANK", rank)
        seeds.add(run_seed(None))
    monkeypatch.setenv("MASTER_PORT", "29501")
    assert len(seeds) == 1 and run_seed(None) != seeds.pop()


def test_a_rerun_with_checkpoints_keeps_the_seed_of_the_run_it_resumes(tmp_path):
    """MLPerf mode draws a seed per launch: a rerun after a kill drew
    another (904, then 10777), so the resumed steps went on with another
    data order. The newest complete checkpoint's seed is kept."""
    import json

    from coom_nemo.recipes import llama31_405b

    checkpoint = tmp_path / "llama31_debug" / "checkpoints" / "step=7-consumed_samples=64.0"
    (checkpoint / "weights").mkdir(parents=True)
    (checkpoint / "weights" / "metadata.json").write_text("{}")
    (checkpoint / "context").mkdir()
    (checkpoint / "context" / "model.yaml").write_text("config: {}\n")
    leaf = {"type": "leaf", "value": 904, "paths": ["<root>.trainer.strategy.seed"]}
    (checkpoint / "context" / "io.json").write_text(json.dumps(
        {"objects": {"coom_megatron_strategy_1": {"items": [["Attr(name='seed')", leaf]]}}}))

    def seed(**kwargs):
        return llama31_405b.pretrain_recipe(size="debug", cpu=True, dir=str(tmp_path),
                                            max_steps=12, **kwargs).trainer.strategy.seed

    assert seed(save_checkpoints=True) == 904
    assert seed(save_checkpoints=True, seed=5) == 5  # a seed given wins
    checkpoint.with_name(checkpoint.name + "-unfinished").touch()  # incomplete: a new seed
    assert {seed(save_checkpoints=True) for _ in range(3)} != {904}
