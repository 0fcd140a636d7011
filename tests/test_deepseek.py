"""coom_deepseek: EP=2 training with MTP and expert-load metrics, the
expert bias balancing load, token dropping, HF import, bad input."""

import json
import math
import os
import time
from types import SimpleNamespace

import lightning.pytorch as pl
import nemo_run as run
import pytest
import torch
from conftest import PYTHON, ROOT
from helpers import falls, train
from test_cli import NEMO
from test_parallel_cpu import _free_port

from coom_nemo import launch
from coom_nemo.model_math import kv_cache_report
from coom_nemo.models.base import has_transformer_engine
from coom_nemo.models.deepseek import SIZES, CoomDeepSeekConfig, config_from_hf
from coom_nemo.moe_metrics import ExpertLoadMetrics
from coom_nemo.plan import PlanError
from coom_nemo.recipes import deepseek

STEPS = 30  # the expert bias moves 1e-3 a step: 30 steps show it


@pytest.mark.multiproc
def test_ep2_trains_logs_mtp_and_load_and_the_expert_bias_balances(run_cmd, tmp_path):
    # EP2 with the expert bias at megatron-core's default rate, then
    # off (same seed and data); then PP2, whose rank 0 has no MoE layer
    code, out = run_cmd([PYTHON, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                         "--master-port", str(_free_port()),
                         str(ROOT / "tests" / "deepseek_ep.py"), str(tmp_path),
                         f"EP2:0.001:{STEPS}", f"EP2:0:{STEPS}", "PP2:0.001:3"],
                        env={"PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])})
    assert code == 0, out[-3000:]
    runs = {name: [json.loads((tmp_path / f"{name}.rank{r}.json").read_text())
                   for r in range(2)] for name in ("EP2_rate0.001", "EP2_rate0", "PP2_rate0.001")}
    with_bias, _ = runs["EP2_rate0.001"]
    # EP=2 x DP=2: both ranks report the global batch's loss and load
    for name in ("EP2_rate0.001", "EP2_rate0"):
        assert runs[name][0] == runs[name][1]
    losses = with_bias["losses"]
    assert len(losses) == STEPS and falls(losses), losses
    mtp = [step["mtp_1_loss"] for step in with_bias["metrics"]]
    assert falls(mtp), mtp  # logged apart from the LM loss
    # ... and printed, with the load, each step and in the summary
    assert sum("| mtp_1 loss " in line and "max/mean load" in line
               for line in out.splitlines()) == 2 * STEPS + 3
    assert f"expert load over {STEPS} steps" in out and "layer 2: max/mean" in out
    tags = _tensorboard_tags(tmp_path / "EP2_rate0.001")
    assert {"mtp_1_loss", "moe/layer2/max_mean_load", "moe/mtp1/max_mean_load",
            "moe/layer2/bias_max", "moe/layer2/dropped_tokens", "moe/aux_loss"} <= tags

    def late_load(metrics):  # mean max/mean ratio, last 10 steps
        return sum(step["moe/max_mean_load"] for step in metrics[-10:]) / 10

    balanced = late_load(with_bias["metrics"])
    unbalanced = late_load(runs["EP2_rate0"][0]["metrics"])
    print(f"max/mean load, steps {STEPS - 9}-{STEPS}: expert bias {balanced:.3f}, "
          f"none {unbalanced:.3f}")
    assert balanced < unbalanced - 0.05
    assert with_bias["metrics"][-1]["moe/layer2/bias_max"] > 0
    assert "moe/layer2/bias_max" not in runs["EP2_rate0"][0]["metrics"][-1]

    # PP2: the first stage (rank 0, which logs) has no MoE layer and no
    # MTP; it still reports the last stage's
    first, last = (run["metrics"][-1] for run in runs["PP2_rate0.001"])
    assert first == last
    assert first["moe/layer2/max_mean_load"] >= 1 and math.isfinite(first["mtp_1_loss"])


def _tensorboard_tags(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = run_dir.rglob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    return set(accumulator.Tags()["scalars"])


def test_capacity_factor_drops_tokens_and_the_metrics_count_them(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_PROJECT", "coom-test")  # W&B gets the metrics too
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
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
    import wandb

    wandb.finish()  # flush the offline run
    (run_file,) = tmp_path.rglob("offline-run-*/*.wandb")
    # wandb's service process may still be writing after finish()
    deadline = time.monotonic() + 60
    while b"moe/layer2/dropped_tokens" not in run_file.read_bytes():
        assert time.monotonic() < deadline, "W&B run file never got the MoE metrics"
        time.sleep(0.5)

    # the router: sigmoid scores, top-4 experts from at most 2 of the 4
    # groups of 4
    from megatron.core.transformer.moe.router import TopKRouter

    router = next(m for m in trainer.lightning_module.modules() if isinstance(m, TopKRouter))
    router.config.moe_expert_capacity_factor = None  # routing alone
    with torch.no_grad():
        probs, chosen = router.eval().routing(torch.randn(64, 2, 16))
    assert chosen.sum(dim=1).eq(4).all()
    assert chosen.view(-1, 4, 4).any(dim=2).sum(dim=1).le(2).all()
    assert probs.sum(dim=1) == pytest.approx(torch.full((128,), 2.5))  # normalized x 2.5


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
    tiny = SimpleNamespace(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=128)
    assert kv_cache_report(tiny) == ("kv_cache per token (16-bit, 2 layers): MHA 512 B; "
                                     "MHA at 128 tokens: 64.0 KiB")  # 2 x 2 x 4 x 16 x 2 B
    assert kv_cache_report(llama_405b) == (
        "kv_cache per token (16-bit, 126 layers): GQA-8 504.0 KiB | MHA 7.9 MiB (16.0x); "
        "GQA-8 at 8192 tokens: 3.9 GiB")


# -- HF import -------------------------------------------------------


def tiny_hf_deepseek(path):
    """A random DeepSeek-V3 in HF format, the debug size's shape."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, PreTrainedTokenizerFast

    debug = SIZES["debug"]
    config = DeepseekV3Config(
        vocab_size=debug["vocab_size"], hidden_size=debug["hidden_size"],
        intermediate_size=debug["ffn_hidden_size"],
        moe_intermediate_size=debug["moe_ffn_hidden_size"], num_hidden_layers=2,
        first_k_dense_replace=1, num_attention_heads=debug["num_attention_heads"],
        num_key_value_heads=debug["num_attention_heads"], n_shared_experts=1,
        n_routed_experts=debug["num_moe_experts"], num_experts_per_tok=4, n_group=4,
        topk_group=2, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, routed_scaling_factor=2.5,
        # DeepSeek-V3's own RoPE settings
        max_position_embeddings=163840,
        rope_scaling=dict(type="yarn", factor=40, original_max_position_embeddings=4096,
                          beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0),
        dtype="float32")
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(config).float()
    with torch.no_grad():  # norms and expert bias away from their init
        for name, tensor in model.state_dict().items():
            if name.endswith("norm.weight"):
                tensor.uniform_(0.5, 1.5)
            if name.endswith("e_score_correction_bias"):
                tensor.uniform_(-0.05, 0.05)
    model.save_pretrained(path)
    vocab = {f"t{i}": i for i in range(config.vocab_size)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, "t0")),
                                        unk_token="t0", eos_token="t1")
    tokenizer.save_pretrained(path)
    return model.eval()


class WeightsAtStart(pl.Callback):
    """The weights training starts from."""

    def on_train_start(self, trainer, pl_module):
        self.state = {name.split("module.")[-1]: tensor.detach().clone()
                      for name, tensor in pl_module.state_dict().items()
                      if torch.is_tensor(tensor)}


def test_hf_deepseek_v3_imports_with_matching_logits_and_fine_tunes(tmp_path):
    from nemo.collections import llm

    from coom_nemo import cpu_mode
    from coom_nemo.models.deepseek import CoomDeepSeekModel, HFCoomDeepSeekImporter

    hf = tiny_hf_deepseek(tmp_path / "hf")
    # the importer reads the HF config as the debug size's architecture
    from transformers import AutoConfig

    imported = config_from_hf(AutoConfig.from_pretrained(tmp_path / "hf"))
    debug = SIZES["debug"]
    shared = set(debug) & set(imported) - {"make_vocab_size_divisible_by", "mtp_num_layers",
                                           "mtp_loss_scaling_factor"}
    assert len(shared) == 17
    assert {k: imported[k] for k in shared} == {k: debug[k] for k in shared}

    ckpt = tmp_path / "nemo"
    with cpu_mode.cpu_mode():
        llm.import_ckpt(model=CoomDeepSeekModel(), source=f"hf://{tmp_path / 'hf'}",
                        output_path=ckpt)
        model, _ = HFCoomDeepSeekImporter(str(ckpt)).nemo_load(ckpt, cpu=True)
        tokens = torch.randint(0, 1024, (2, 64), generator=torch.Generator().manual_seed(0))
        positions = torch.arange(64).expand(2, 64)
        with torch.no_grad():
            logits = model(tokens, positions, None)
    with torch.no_grad():
        expected = hf(tokens).logits
    difference = float((logits - expected).abs().max())
    print(f"max |logits - HF logits| = {difference:.1e} "
          f"(logits up to {float(expected.abs().max()):.2f})")
    assert difference < 1e-4  # fp32 on both sides

    # fine-tuning starts from the imported weights; HF's model holds no
    # MTP layer, so MTP must be off
    with pytest.raises(PlanError, match="^restore_path: .* holds no MTP weights .*"
                                        "pass mtp_layers=0"):
        deepseek.pretrain_recipe(size="debug", cpu=True, restore_path=str(ckpt))
    recipe = deepseek.pretrain_recipe(size="debug", cpu=True, dir=str(tmp_path / "ft"),
                                      max_steps=2, restore_path=str(ckpt), mtp_layers=0)
    recipe.trainer.callbacks.append(run.Config(WeightsAtStart))
    recorder, trainer = train(recipe)
    start = next(c for c in trainer.callbacks if isinstance(c, WeightsAtStart)).state
    hf_state = hf.state_dict()
    assert torch.equal(start["embedding.word_embeddings.weight"],
                       hf_state["model.embed_tokens.weight"])
    assert torch.equal(start["decoder.layers.1.mlp.router.expert_bias"],
                       hf_state["model.layers.1.mlp.gate.e_score_correction_bias"])
    assert len(recorder.losses) == 2


# -- bad input --------------------------------------------------------


def test_experts_not_divisible_by_ep_fail_before_launch(run_cmd):
    message = ("trainer.strategy.expert_model_parallel_size: EP=3 does not divide the 16 "
               "experts; use an EP that divides 16")
    code, out = run_cmd([PYTHON, str(ROOT / "recipes" / "deepseek_moe.py"), "--size", "debug",
                         "--cpu", "--gpus-per-node", "3", "--layout", "EP3"])
    assert code == 2
    assert [line for line in out.splitlines() if line.startswith("error:")] == [
        f"error: {message}"]
    code, out = run_cmd([NEMO, "llm", "pretrain", "--factory",
                         "coom_deepseek(size=debug, cpu=True, gpus_per_node=3, layout=EP3)",
                         "--yes"])
    assert code != 0 and "Dry run" not in out
    assert out.strip().splitlines()[-1] == f"Unexpected error: {message}"  # nemo_run's prefix


@pytest.mark.skipif(has_transformer_engine(), reason="TransformerEngine imports here")
@pytest.mark.parametrize("precision, scaling", [("fp8-delayed", "delayed"),
                                                ("fp8-current", "tensorwise"),
                                                ("fp8-blockwise", "blockwise")])
def test_fp8_without_transformer_engine_fails_before_a_local_launch(precision, scaling, capsys):
    code = launch.main(deepseek.pretrain_recipe, "16b",
                       ["--size", "debug", "--gpus-per-node", "1", "--precision", precision])
    assert code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert errors == [f"error: trainer.plugins: FP8 ({scaling} scaling) needs "
                      "TransformerEngine, which does not import on this host; use "
                      "precision='bf16', or run in a container with TransformerEngine "
                      "(nvcr.io/nvidia/nemo:26.02)"]


def test_fp8_in_cpu_mode_is_refused_not_silently_dropped():
    with pytest.raises(PlanError, match="^precision: fp8-current needs TransformerEngine"):
        deepseek.pretrain_recipe(size="debug", cpu=True, precision="fp8-current")
