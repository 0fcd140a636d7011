"""coom_deepseek: EP=2 training with MTP and expert-load metrics, the
expert bias balancing load, token dropping, the KV-cache report."""

import json
import math
import os
from types import SimpleNamespace

import pytest
from conftest import PYTHON, ROOT
from helpers import falls, train
from test_parallel_cpu import _free_port

from coom_nemo.model_math import kv_cache_report
from coom_nemo.models.deepseek import SIZES, CoomDeepSeekConfig
from coom_nemo.moe_metrics import ExpertLoadMetrics
from coom_nemo.recipes import deepseek

STEPS = 30  # the expert bias moves 1e-3 a step: 30 steps show it


@pytest.mark.multiproc
def test_ep2_trains_logs_mtp_and_load_and_the_expert_bias_balances(run_cmd, tmp_path):
    # same seed and data; expert bias at megatron-core's default rate,
    # then off
    code, out = run_cmd([PYTHON, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                         "--master-port", str(_free_port()),
                         str(ROOT / "tests" / "deepseek_ep.py"), str(tmp_path), str(STEPS),
                         "0.001", "0"],
                        env={"PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])})
    assert code == 0, out[-3000:]
    runs = {rate: [json.loads((tmp_path / f"rate{rate}.rank{r}.json").read_text())
                   for r in range(2)] for rate in ("0.001", "0")}
    with_bias, _ = runs["0.001"]
    # EP=2 x DP=2: both ranks report the global batch's loss and load
    for rank0, rank1 in runs.values():
        assert rank0 == rank1
    losses = with_bias["losses"]
    assert len(losses) == STEPS and falls(losses), losses
    mtp = [step["mtp_1_loss"] for step in with_bias["metrics"]]
    assert falls(mtp), mtp  # logged apart from the LM loss
    # ... and printed, with the load, each step and in the summary
    assert sum("| mtp_1 loss " in line and "max/mean load" in line
               for line in out.splitlines()) == 2 * STEPS
    assert f"expert load over {STEPS} steps" in out and "layer 2: max/mean" in out
    tags = _tensorboard_tags(tmp_path / "rate0.001")
    assert {"mtp_1_loss", "moe/layer2/max_mean_load", "moe/mtp1/max_mean_load",
            "moe/layer2/bias_max", "moe/layer2/dropped_tokens", "moe/aux_loss"} <= tags

    def late_load(metrics):  # mean max/mean ratio, last 10 steps
        return sum(step["moe/max_mean_load"] for step in metrics[-10:]) / 10

    balanced = late_load(with_bias["metrics"])
    unbalanced = late_load(runs["0"][0]["metrics"])
    print(f"max/mean load, steps {STEPS - 9}-{STEPS}: expert bias {balanced:.3f}, "
          f"none {unbalanced:.3f}")
    assert balanced < unbalanced - 0.05
    assert with_bias["metrics"][-1]["moe/layer2/bias_max"] > 0
    assert "moe/layer2/bias_max" not in runs["0"][0]["metrics"][-1]


def _tensorboard_tags(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = run_dir.rglob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    return set(accumulator.Tags()["scalars"])


def test_capacity_factor_drops_tokens_and_the_metrics_count_them(tmp_path):
    recipe = deepseek.pretrain_recipe(size="debug", cpu=True, dir=str(tmp_path), max_steps=3,
                                      capacity_factor=1.0)
    assert recipe.model.config.moe_expert_capacity_factor == 1.0
    recorder, trainer = train(recipe)
    assert all(math.isfinite(loss) for loss in recorder.losses)
    metrics = next(c for c in trainer.callbacks if isinstance(c, ExpertLoadMetrics))
    assert metrics.history[-1]["moe/dropped_fraction"] > 0
    # every token's top-4 picks are either kept by an expert or dropped
    tokens = 3 * 8 * 128  # steps x global batch x sequence
    for layer in metrics.summary():
        assert float(layer.tokens_per_expert.sum()) + layer.dropped == tokens * 4
        assert 0 < layer.dropped_fraction < 0.5


def test_factory_arguments_set_mtp_bias_aux_loss_and_capacity():
    config = deepseek.pretrain_recipe(size="debug", cpu=True, mtp_layers=2,
                                      mtp_loss_weight=0.3, expert_bias_rate=0.01,
                                      aux_loss_coeff=1e-3).model.config
    assert (config.mtp_num_layers, config.mtp_loss_scaling_factor) == (2, 0.3)
    assert config.moe_router_enable_expert_bias and config.moe_router_bias_update_rate == 0.01
    assert config.moe_aux_loss_coeff == 1e-3
    assert config.moe_expert_capacity_factor is None  # no dropping unless asked
    plain = deepseek.pretrain_recipe(size="debug", cpu=True, mtp_layers=0,
                                     expert_bias_rate=0).model.config
    assert plain.mtp_num_layers is None and not plain.moe_router_enable_expert_bias


def test_16b_default_is_deepseek_shaped_and_its_dry_run_reports_the_kv_cache(capsys):
    recipe = deepseek.pretrain_recipe()
    printed = capsys.readouterr().out
    assert "params=16.30B active_params=2.54B layout=TP1.PP1.CP1.EP8.VP1 gpus=8" in printed
    assert ("kv_cache per token (16-bit, 27 layers): MLA 30.4 KiB | GQA-8 135.0 KiB (4.4x) | "
            "MHA 270.0 KiB (8.9x)") in printed
    import fiddle as fdl

    config = fdl.build(recipe.model.config)
    assert config.multi_latent_attention and config.moe_layer_freq[0] == 0
    assert config.moe_router_score_function == "sigmoid"
    assert config.moe_router_enable_expert_bias
    assert config.moe_router_load_balancing_type == "seq_aux_loss"
    assert (config.moe_router_num_groups, config.moe_router_group_topk) == (8, 3)
    assert config.moe_shared_expert_intermediate_size == 2 * config.moe_ffn_hidden_size
    assert recipe.trainer.strategy.expert_model_parallel_size == 8


def test_kv_cache_report_of_deepseek_v3_and_of_a_gqa_model():
    config = CoomDeepSeekConfig(**SIZES["v3"])
    assert kv_cache_report(config).startswith(
        "kv_cache per token (16-bit, 61 layers): MLA 68.6 KiB | GQA-8 305.0 KiB (4.4x) | "
        "MHA 4.8 MiB (71.1x); MLA at 4096 tokens: 274.5 MiB")
    llama_405b = SimpleNamespace(num_layers=126, hidden_size=16384, num_attention_heads=128,
                                 num_query_groups=8, seq_length=8192)
    assert kv_cache_report(llama_405b) == (
        "kv_cache per token (16-bit, 126 layers): GQA-8 504.0 KiB | MHA 7.9 MiB (16.0x); "
        "GQA-8 at 8192 tokens: 3.9 GiB")
