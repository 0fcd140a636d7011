"""Llama 3.1 405B as MLPerf's benchmark: the reference's numbers, the
layout and its memory plan, the launcher."""

from types import SimpleNamespace

import pytest
from conftest import PYTHON, ROOT

from coom_nemo import c4
from coom_nemo.mlperf import Benchmark, EvalCadence, QualityTarget, RecordHyperparameters
from coom_nemo.plan import Plan, PlanError
from coom_nemo.recipe import FixedCosineAnnealingScheduler
from coom_nemo.recipes import llama31_405b

MLPERF = Benchmark()

# pretrain_llama31.py and compliance_checker/training_5.1.0 (closed)
# at GBS 1152, and the RCP file's warmup at 2304 and 4608.
REFERENCE = {
    1152: dict(lr=8e-5, warmup=8000, max_steps=1_200_000, every=16, first=224, batches=5),
    2304: dict(lr=1.6e-4, warmup=4000, max_steps=600_000, every=8, first=136, batches=3),
    4608: dict(lr=3.2e-4, warmup=2000, max_steps=300_000, every=4, first=92, batches=2),
    576: dict(lr=4e-5, warmup=16000, max_steps=2_400_000, every=32, first=416, batches=10),
}


@pytest.mark.parametrize("gbs", sorted(REFERENCE))
def test_schedule_formulas_match_the_reference(gbs):
    ref = REFERENCE[gbs]
    assert MLPERF.lr(gbs) == pytest.approx(ref["lr"], rel=1e-12)
    assert MLPERF.lr(gbs) * 1152 == pytest.approx(gbs * 8e-5)  # compliance check
    assert MLPERF.warmup(gbs) == ref["warmup"]
    assert MLPERF.max_steps(gbs) == ref["max_steps"]
    assert MLPERF.eval_interval(gbs) == ref["every"]
    assert MLPERF.first_eval(gbs) == ref["first"]
    assert MLPERF.eval_batches(gbs) == ref["batches"]


def test_warmup_follows_the_code_not_the_readme_where_they_differ():
    # README: 8000 x ceil(1152 / GBS) = 8000; code and checker:
    # ceil(8000 x 1152 / GBS) = 2000, the RCP's value at GBS 4608.
    assert MLPERF.warmup(4608) == 2000


# rcp_checker/training_5.1.0/rcps_llama31_405b.json: samples at which
# the reference's six runs per batch size reached 5.6.
RCP_CONVERGED = {
    1152: [313344, 313344, 313344, 331776, 313344, 294912],
    2304: [368640, 350208, 387072, 368640, 368640, 368640],
    4608: [497664, 497664, 460800, 497664, 479232, 497664],
}


@pytest.mark.parametrize("gbs", sorted(RCP_CONVERGED))
def test_reference_convergence_points_are_our_evaluation_steps(gbs):
    first, every = MLPERF.first_eval(gbs), MLPERF.eval_interval(gbs)
    for samples in RCP_CONVERGED[gbs]:
        step, rest = divmod(samples, gbs)
        assert rest == 0 and step >= first and (step - first) % every == 0, samples


def test_405b_recipe_carries_the_reference_settings(capsys):
    recipe = llama31_405b.pretrain_recipe()
    strategy = recipe.trainer.strategy
    layout = (strategy.tensor_model_parallel_size, strategy.pipeline_model_parallel_size,
              strategy.virtual_pipeline_model_parallel_size, strategy.context_parallel_size)
    assert layout == (8, 9, 7, 4) and strategy.sequence_parallel
    assert (recipe.trainer.num_nodes, recipe.trainer.devices) == (288, 8)
    assert (recipe.data.global_batch_size, recipe.data.micro_batch_size) == (1152, 1)
    assert recipe.model.config.seq_length == 8192

    opt = recipe.optim.config
    assert (opt.optimizer, opt.lr, opt.weight_decay, opt.adam_beta1, opt.adam_beta2,
            opt.adam_eps, opt.clip_grad) == ("adam", 8e-5, 0.1, 0.9, 0.95, 1e-5, 1.0)
    sched = recipe.optim.lr_scheduler
    assert sched.__fn_or_cls__ is FixedCosineAnnealingScheduler
    assert (sched.warmup_steps, sched.max_steps, sched.min_lr) == (8000, 1_200_000, 8e-7)
    assert recipe.trainer.max_steps == 1_200_000
    assert (recipe.trainer.val_check_interval, recipe.trainer.limit_val_batches) == (224, 5)

    callbacks = {c.__fn_or_cls__: c for c in recipe.trainer.callbacks}
    assert callbacks[QualityTarget].target == 5.6
    assert (callbacks[EvalCadence].first_step, callbacks[EvalCadence].every_n_steps) == (224, 16)
    # MLPerf mode: a random seed per run (the reference's range)
    assert 0 <= callbacks[RecordHyperparameters].values["seed"] <= 32767
    assert recipe.data.__fn_or_cls__.__name__ == "MockData"  # no index to fix
    out = capsys.readouterr().out
    assert "model=llama31_405b params=405.85B " in out  # 405.9B +-0.5%
    assert "layout=TP8.PP9.CP4.EP1.VP7 gpus=2304" in out


def test_other_batch_size_rescales_and_max_steps_keeps_the_lr_schedule():
    recipe = llama31_405b.pretrain_recipe(global_batch_size=2304, max_steps=100)
    assert recipe.optim.config.lr == pytest.approx(1.6e-4)
    sched = recipe.optim.lr_scheduler
    assert (sched.warmup_steps, sched.max_steps) == (4000, 600_000)
    # a run shorter than the first evaluation evaluates at its end
    assert (recipe.trainer.max_steps, recipe.trainer.val_check_interval) == (100, 100)
    assert recipe.trainer.limit_val_batches == 3


def test_nodes_change_data_parallelism_only():
    recipe = llama31_405b.pretrain_recipe(num_nodes=72)
    strategy = recipe.trainer.strategy
    assert (strategy.tensor_model_parallel_size, strategy.pipeline_model_parallel_size,
            strategy.context_parallel_size) == (8, 9, 4)
    assert recipe.trainer.num_nodes == 72


def test_layout_that_does_not_fit_the_nodes_fails_naming_the_field():
    with pytest.raises(PlanError) as error:
        llama31_405b.pretrain_recipe(num_nodes=100)  # 800 GPUs, 288 a replica
    assert error.value.field == "trainer.num_nodes"
    assert "not a multiple of TP*PP*CP = 288" in str(error.value)


def test_missing_data_fails_before_launch(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        llama31_405b.pretrain_recipe(size="debug", cpu=True, c4_dir=str(tmp_path))
    assert str(error.value) == (f"c4_dir: {tmp_path} holds no C4 indexed files; build them "
                                "with python -m data_prep.c4 or point c4_dir at MLPerf's "
                                "preprocessed C4")
    (tmp_path / "c4-train.en_6_text_document.bin").touch()
    with pytest.raises(FileNotFoundError, match="lacks c4-train.en_6_text_document.idx, "
                       "c4-train.en_7_text_document.bin, .* of the reference layout"):
        llama31_405b.pretrain_recipe(size="debug", cpu=True, c4_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="restore_path: .* is not a NeMo checkpoint"):
        llama31_405b.pretrain_recipe(size="debug", cpu=True, restore_path=str(tmp_path))


def test_c4_dir_of_data_prep_or_of_the_reference(tmp_path):
    for name in ("train", "validation"):
        for suffix in (".bin", ".idx"):
            (tmp_path / f"{name}{suffix}").touch()
    paths = c4.mlperf_paths(str(tmp_path))
    assert paths == {"train": [f"{tmp_path}/train"], "validation": [f"{tmp_path}/validation"],
                     "test": [f"{tmp_path}/validation"]}
    reference = tmp_path / "reference"
    reference.mkdir()
    for prefix in ("c4-train.en_6", "c4-train.en_7", "c4-validation-91205-samples.en"):
        for suffix in (".bin", ".idx"):
            (reference / f"{prefix}_text_document{suffix}").touch()
    paths = c4.mlperf_paths(str(reference))
    assert paths["train"] == ["50", f"{reference}/c4-train.en_6_text_document",
                              "50", f"{reference}/c4-train.en_7_text_document"]
    assert paths["validation"] == [f"{reference}/c4-validation-91205-samples.en_text_document"]


LLAMA_405B = SimpleNamespace(
    num_layers=126, hidden_size=16384, ffn_hidden_size=53248, num_attention_heads=128,
    num_query_groups=8, gated_linear_unit=True, normalization="RMSNorm", vocab_size=128256,
    make_vocab_size_divisible_by=128, share_embeddings_and_output_weights=False)


def plan_405b(nodes, tp, pp, vp, cp, **kwargs):
    return Plan(name="405b", cfg=LLAMA_405B, num_nodes=nodes, gpus_per_node=8, tp=tp, pp=pp,
                vp=vp, cp=cp, sp=True, mbs=1, gbs=1152, seq_length=8192, **kwargs)


def test_memory_estimate_agrees_with_runs_that_are_known_to_fit():
    # The reference's layout, at its 288 nodes and at 72.
    for nodes in (288, 72):
        assert plan_405b(nodes, 8, 9, 7, 4).memory_estimate_gb()["total"] < 80
    # NVIDIA's H100 MLPerf v5.0 submission (64 nodes, TP8 PP8 VP8 CP2,
    # grad_reduce_in_fp32=False): fits with bf16 gradients ...
    nvidia = plan_405b(64, 8, 8, 8, 2, fp32_grads=False).memory_estimate_gb()
    assert nvidia["total"] < 80
    # ... while fp32 gradients would add 2 bytes per parameter.
    assert plan_405b(64, 8, 8, 8, 2).memory_estimate_gb()["total"] > 80


def test_distributed_optimizer_shards_over_data_and_context_parallel():
    cp4 = plan_405b(72, 8, 9, 7, 4).memory_estimate_gb()["optimizer"]  # DP 2 x CP 4
    cp2 = plan_405b(36, 8, 9, 7, 2).memory_estimate_gb()["optimizer"]  # DP 2 x CP 2
    assert cp2 == pytest.approx(2 * cp4)


def test_slurm_dry_run_prints_the_job_and_the_summary(run_cmd, tmp_path):
    code, out = run_cmd([PYTHON, str(ROOT / "recipes" / "llama31_405b.py"), "--executor",
                         "slurm", "--nodes", "72", "--dryrun", "--target-log-ppl", "5.5",
                         "--job-dir", str(tmp_path / "jobs")],
                        env={"SLURM_ACCOUNT": "mlperf", "CONT": "registry/nemo:tag",
                             "COLUMNS": "200"})
    assert code == 0, out[-3000:]
    assert "#SBATCH --nodes=72" in out and "#SBATCH --account=mlperf" in out
    assert "--container-image registry/nemo:tag" in out
    assert ("model=llama31_405b params=405.85B active_params=403.75B "
            "layout=TP8.PP9.CP4.EP1.VP7 gpus=576") in out
    assert "target=5.5" in out  # the recipe-specific flag reached the factory
