"""Plan check: bad layouts and batch sizes fail early, naming the
field."""

import functools

import fiddle as fdl
import pytest
import torch

from coom_nemo.plan import PlanError
from coom_nemo.recipe import PRECISIONS, Layout, check_recipe
from coom_nemo.recipes import FACTORIES, llama31_405b


def debug_llama(**kwargs):
    return llama31_405b.pretrain_recipe(size="debug", cpu=True, **kwargs)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_every_factory_builds_a_recipe_that_passes_its_plan(name, capsys):
    recipe = FACTORIES[name]()
    plan = check_recipe(recipe)
    assert plan.world_size == recipe.trainer.num_nodes * recipe.trainer.devices
    assert f"gpus={plan.world_size}" in capsys.readouterr().out


def test_tp_not_dividing_heads_is_refused_by_the_factory():
    with pytest.raises(PlanError) as error:
        debug_llama(gpus_per_node=3, layout="TP3")
    assert error.value.field == "trainer.strategy.tensor_model_parallel_size"
    assert "4 attention heads" in str(error.value)
    assert "\n" not in str(error.value)


def test_gbs_not_divisible_by_mbs_times_dp():
    with pytest.raises(PlanError) as error:
        debug_llama(gpus_per_node=2, global_batch_size=6, micro_batch_size=2)
    assert error.value.field == "data.global_batch_size"
    assert "MBS*DP = 2*2 = 4" in str(error.value)


def test_layout_that_does_not_fit_the_nodes():
    with pytest.raises(PlanError) as error:
        llama31_405b.pretrain_recipe(num_nodes=70)
    assert error.value.field == "trainer.num_nodes"


def test_out_of_memory_plan_is_refused():
    with pytest.raises(PlanError) as error:
        llama31_405b.pretrain_recipe(layout="TP8.PP9.VP7.CP1")  # 8192 tokens a GPU
    assert "exceeds 95% of 80 GiB" in str(error.value)


def test_override_after_the_factory_is_checked_before_any_process_group():
    recipe = debug_llama(gpus_per_node=4, global_batch_size=8)
    recipe.trainer.strategy.tensor_model_parallel_size = 4  # 2 KV groups
    with pytest.raises(PlanError, match="parallel_size: TP=4 does not divide the 2 KV"):
        fdl.build(recipe)()
    assert not torch.distributed.is_initialized()


def test_fp8_without_transformer_engine_fails_on_the_host():
    recipe = llama31_405b.pretrain_recipe(size="debug", gpus_per_node=1,
                                          precision="fp8-delayed")
    with pytest.raises(PlanError) as error:
        fdl.build(recipe)()
    assert error.value.field == "trainer.plugins"
    assert "TransformerEngine" in str(error.value)


def test_layout_text_round_trips_through_the_summary_form():
    layout = Layout(tp=8, pp=9, vp=7, cp=2).updated("TP4.EP2.VP1")
    assert (layout.tp, layout.pp, layout.vp, layout.cp, layout.ep) == (4, 9, None, 2, 2)
    with pytest.raises(ValueError, match="cannot read 'XP2'"):
        Layout().updated("TP2.XP2")


def test_te_cross_entropy_counts_the_logits_once():
    """TE's fused cross entropy keeps only the 16-bit logits (its
    gradient goes into them in place); megatron-core's native one adds
    an fp32 copy: 4 bytes a logit more in the estimate. A host without
    TE builds the config with the native one (adapt_to_runtime); a GPU
    plan made there counts what the recipe asks for, TE's, as the
    node (the NeMo container) builds it."""
    from coom_nemo.plan import Plan
    from coom_nemo.recipe import _build

    recipe = FACTORIES["coom_llama31_405b"](size="8b", num_nodes=1, gpus_per_node=8,
                                            layout="TP2", micro_batch_size=1, mlperf=False)
    plan = Plan.from_parts(recipe.model, recipe.data, recipe.trainer, recipe.optim,
                           _build(recipe.plan))
    assert plan.cfg.cross_entropy_fusion_impl == "te" and plan.cfg.cross_entropy_loss_fusion
    te = plan.memory_estimate_gb()["activations"]
    plan.cfg.cross_entropy_fusion_impl = "native"
    native = plan.memory_estimate_gb()["activations"]
    tokens, vocab = plan.seq_length * plan.mbs / plan.cp, plan.cfg.vocab_size
    assert (native - te) * 1024**3 == pytest.approx(4 * tokens * vocab / plan.tp)
    plan.cfg.cross_entropy_loss_fusion = False  # unfused: the fp32 copy again
    assert plan.memory_estimate_gb()["activations"] == pytest.approx(native)


@pytest.mark.parametrize("backend", ["local", "unfused"])
def test_unfused_attention_counts_its_softmax_unless_recomputed(backend):
    """An attention backend that materialises its probabilities keeps
    heads/TP x s x s of them per layer and micro-batch in flight (PP1:
    every layer); flash and fused kernels (the default) and selective
    recompute keep none."""
    from megatron.core.transformer.enums import AttnBackend

    from coom_nemo.plan import Plan
    from coom_nemo.recipe import _build

    recipe = FACTORIES["coom_llama31_405b"](size="8b", num_nodes=1, gpus_per_node=8,
                                            layout="TP2.CP1", micro_batch_size=1, mlperf=False)
    plan = Plan.from_parts(recipe.model, recipe.data, recipe.trainer, recipe.optim,
                           _build(recipe.plan))
    flash = plan.memory_estimate_gb()["activations"]
    plan.cfg.attention_backend = AttnBackend[backend]
    unfused = plan.memory_estimate_gb()["activations"]
    c = plan.cfg
    probs = c.num_attention_heads / plan.tp * plan.mbs * plan.seq_length**2 * 2 * c.num_layers
    assert (unfused - flash) * 1024**3 == pytest.approx(probs)
    plan.cfg.recompute_granularity = "selective"
    assert plan.memory_estimate_gb()["activations"] == pytest.approx(flash)
    plan.cfg.recompute_modules = ["shared_experts"]  # a dense model: nothing recomputed
    assert plan.memory_estimate_gb()["activations"] == pytest.approx(unfused)


@pytest.mark.parametrize("size", ["debug", None])
@pytest.mark.parametrize("name", ["coom_llama31_405b", "coom_llama31_8b_mlperf",
                                  "coom_gpt_oss_20b", "coom_gpt_oss_20b_gated", "coom_deepseek"])
def test_every_model_has_fp8_widths(name, size):
    """Each family's preset and debug size meet FP8's multiples of 16
    at its default layout (the DeepSeek debug size did not: 40)."""
    recipe = FACTORIES[name](precision="fp8-current", **({"size": size} if size else {}))
    assert check_recipe(recipe).precision == "fp8-tensorwise"


@pytest.mark.parametrize("field, value, what", [
    ("qk_pos_emb_head_dim", 8, "kv_lora_rank + qk_pos_emb_head_dim (linear_kv_down_proj) is 40"),
    ("moe_ffn_hidden_size", 40, "moe_ffn_hidden_size / ETP1 is 40"),
    ("q_lora_rank", 24, "q_lora_rank is 24"),
    ("hidden_size", 40, "hidden_size is 40"),
])
def test_fp8_refuses_a_width_that_is_not_a_multiple_of_16(field, value, what):
    recipe = FACTORIES["coom_deepseek"](size="debug", gpus_per_node=1, precision="fp8-current")
    setattr(recipe.model.config, field, value)
    with pytest.raises(PlanError) as error:
        check_recipe(recipe)
    assert error.value.field == f"model.config.{field}"
    assert str(error.value).startswith(f"model.config.{field}: {what}, but FP8 GEMMs need "
                                       "widths that are multiples of 16; change it")
    recipe.trainer.plugins = fdl.Config(type(fdl.build(recipe.trainer.plugins)))  # bf16
    check_recipe(recipe)


def test_fp8_refuses_a_tensor_parallel_share_that_is_not_a_multiple_of_16():
    recipe = llama31_405b.pretrain_recipe(size="debug", gpus_per_node=2, layout="TP2",
                                          precision="fp8-current")
    recipe.model.config.ffn_hidden_size = 336  # 168 a rank
    with pytest.raises(PlanError, match=r"^model.config.ffn_hidden_size: ffn_hidden_size / "
                                        r"TP2 is 168, but FP8"):
        check_recipe(recipe)
    recipe.data.seq_length, recipe.data.micro_batch_size = 72, 1
    recipe.model.config.ffn_hidden_size = 384
    with pytest.raises(PlanError, match=r"^data.seq_length: MBS x seq_length / CP1 \(a micro "
                                        r"batch's tokens\) is 72, but FP8"):
        check_recipe(recipe)


def test_fp8_widths_of_an_all_moe_model_skip_the_dense_ffn():
    """GPT-OSS has experts in every layer: its ``ffn_hidden_size``
    (2880, 360 a rank at TP8) makes no GEMM and must not be refused."""
    recipe = FACTORIES["coom_gpt_oss_20b"](precision="fp8-current", gpus_per_node=8,
                                           layout="TP8.ETP1")
    assert check_recipe(recipe).tp == 8
    recipe.model.config.moe_layer_freq = [0] + [1] * (recipe.model.config.num_layers - 1)
    with pytest.raises(PlanError, match="^model.config.ffn_hidden_size: ffn_hidden_size / TP8 "
                                        "is 360"):
        check_recipe(recipe)


def test_fp8_counts_the_mtp_projection_share_of_each_tensor_parallel_rank():
    """MTP's eh_proj (2h -> h) is column-parallel: h / TP a rank."""
    recipe = FACTORIES["coom_deepseek"](size="debug", gpus_per_node=2, layout="TP2",
                                        precision="fp8-blockwise")
    check_recipe(recipe)
    recipe.model.config.hidden_size = 48
    with pytest.raises(PlanError, match=r"^model.config.hidden_size: hidden_size / TP2 \(MTP's "
                                        r"eh_proj\) is 24, but FP8"):
        check_recipe(recipe)
    recipe.model.config.mtp_num_layers = None
    check_recipe(recipe)


def test_fp8_delayed_scaling_with_shared_experts_is_refused_unless_they_are_recomputed():
    """TE refuses the BF16 input megatron-core has the shared experts
    keep under delayed scaling (a DeepSeek debug run on an H100 failed
    so in its first forward); the refusal names both ways out."""
    recipe = FACTORIES["coom_deepseek"](size="debug", gpus_per_node=1, precision="fp8-current")
    check_recipe(recipe)
    recipe.trainer.plugins = PRECISIONS["fp8-delayed"]()
    with pytest.raises(PlanError) as error:
        check_recipe(recipe)
    assert error.value.field == "trainer.plugins"
    assert str(error.value) == (
        "trainer.plugins: FP8 delayed scaling with shared experts: megatron-core has their "
        "linear_fc1 save its BF16 input, which TE refuses under delayed scaling; use "
        "--precision fp8-current or fp8-blockwise, or recompute the shared experts "
        "(recompute_granularity='selective', recompute_modules=['shared_experts'], "
        "moe_shared_expert_overlap=False)")
    config = recipe.model.config
    config.recompute_granularity, config.recompute_modules = "selective", ["core_attn"]
    with pytest.raises(PlanError, match="^trainer.plugins: FP8 delayed scaling with shared"):
        check_recipe(recipe)
    config.recompute_modules = ["shared_experts"]
    config.moe_shared_expert_overlap = False
    assert check_recipe(recipe).precision == "fp8-delayed"
    config.moe_shared_expert_intermediate_size = None  # no shared experts: nothing to refuse
    config.recompute_granularity = None
    assert check_recipe(recipe).precision == "fp8-delayed"


def test_gated_attention_and_mtp_count_what_they_keep_for_the_backward():
    """The gate keeps its sigmoid and the gated output (2 x heads x
    head width a token and layer); each MTP depth a layer of the last
    layer's kind, its own 6h, and a second set of logits."""
    from coom_nemo.plan import Plan, _saved_per_token
    from coom_nemo.recipe import _build

    recipe = FACTORIES["coom_gpt_oss_20b_gated"](size="debug", gpus_per_node=1)
    plan = Plan.from_parts(recipe.model, recipe.data, recipe.trainer, recipe.optim,
                           _build(recipe.plan))
    c, tokens = plan.cfg, plan.seq_length * plan.mbs
    gated = plan.memory_estimate_gb()["activations"] * 1024**3
    c.attention_gate = False
    plain = plan.memory_estimate_gb()["activations"] * 1024**3
    assert gated - plain == pytest.approx(
        2 * c.num_attention_heads * c.kv_channels * tokens * 2 * c.num_layers)
    c.mtp_num_layers = 1
    logits = tokens * c.vocab_size * 2  # TE's cross entropy, as the node builds it
    assert plan.memory_estimate_gb()["activations"] * 1024**3 - plain == pytest.approx(
        tokens * (_saved_per_token(c, c.num_layers - 1) + 6 * c.hidden_size) * 2 + logits,
        rel=1e-3)


def test_fp8_delayed_scaling_with_a_recomputed_norm_or_expert_activation_is_refused():
    """GPT-OSS 20B recomputes its experts' activation; under delayed
    scaling TE refuses what that recompute has the next linear keep,
    and megatron-core's own check never sees FP8 (NeMo sets it on the
    config after the config's checks ran)."""
    with pytest.raises(PlanError) as error:
        FACTORIES["coom_gpt_oss_20b"](precision="fp8-delayed")
    assert str(error.value) == (
        "model.config.recompute_modules: recompute of moe_act under FP8 delayed scaling: "
        "megatron-core then has the next linear save its BF16 input, which TE refuses under "
        "delayed scaling; drop moe_act from recompute_modules, or use --precision fp8-current "
        "or fp8-blockwise")
    recipe = FACTORIES["coom_gpt_oss_20b"](precision="fp8-current")
    recipe.trainer.plugins = PRECISIONS["fp8-delayed"]()
    recipe.model.config.recompute_modules = ["core_attn"]
    assert check_recipe(recipe).precision == "fp8-delayed"
    with pytest.raises(PlanError, match="recompute of layernorm under FP8 delayed"):
        FACTORIES["coom_deepseek_v3"](precision="fp8-delayed")


@pytest.mark.parametrize("wrap", [lambda f: f, functools.partial])
def test_nemo_local_layer_spec_counts_its_softmax(wrap):
    """NeMo's ``local_layer_spec`` (stock NeMo without TE) keeps the
    s x s probabilities whatever ``attention_backend`` says; the plan
    counts them (it under-planned stock NeMo's local run by 10.6%)."""
    from nemo.collections.llm.gpt.model.base import local_layer_spec

    from coom_nemo.plan import Plan
    from coom_nemo.recipe import _build

    recipe = FACTORIES["coom_llama31_405b"](size="8b", num_nodes=1, gpus_per_node=8,
                                            layout="TP2.CP1", micro_batch_size=1, mlperf=False)
    plan = Plan.from_parts(recipe.model, recipe.data, recipe.trainer, recipe.optim,
                           _build(recipe.plan))
    flash = plan.memory_estimate_gb()["activations"]
    plan.cfg.transformer_layer_spec = wrap(local_layer_spec)
    c = plan.cfg
    probs = c.num_attention_heads / plan.tp * plan.mbs * plan.seq_length**2 * 2 * c.num_layers
    assert (plan.memory_estimate_gb()["activations"] - flash) * 1024**3 == pytest.approx(probs)
