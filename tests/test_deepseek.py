"""coom_deepseek: EP=2 training with MTP and expert-load metrics, the
expert bias balancing load, token dropping, HF import, bad input."""

import json
import math
import os
import time
from types import SimpleNamespace

import pytest
import torch
from conftest import PYTHON, ROOT, free_port
from deepseek_tiny import DEBUG_SHAPE, SHAPES, VOCAB, hf_logits, make_tiny_deepseek
from gpt_oss_tiny import write_finetuning_data
from helpers import check_te_names, falls, train, watched
from test_cli import NEMO

from coom_nemo import launch
from coom_nemo.model_math import kv_cache_report
from coom_nemo.models.base import has_transformer_engine
from coom_nemo.models.conversion import loaded
from coom_nemo.models.deepseek import (
    SIZES,
    CoomDeepSeekConfig,
    config_from_hf,
    deepseek_model,
    export_to_hf,
    hf_config_from,
    import_from_hf,
)
from coom_nemo.models.hf_mapping import CheckpointMismatchError
from coom_nemo.moe_metrics import ExpertLoadMetrics
from coom_nemo.peft_export import export_lora
from coom_nemo.plan import PlanError
from coom_nemo.recipes import deepseek

STEPS = 30  # the expert bias moves 1e-3 a step: 30 steps show it


@pytest.mark.multiproc
def test_ep2_trains_logs_mtp_and_load_and_the_expert_bias_balances(run_cmd, tmp_path):
    # EP2 with the expert bias at megatron-core's default rate, then
    # off (same seed and data); then PP2, whose rank 0 has no MoE layer
    code, out = run_cmd([PYTHON, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                         "--master-port", str(free_port()),
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


# -- HF import, export and fine-tuning ------------------------------

TOKENS = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
# fp32 on CPU; measured max |difference| 2e-6 to 5e-6 (logits up to ~5)
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(HF directory, NeMo import) of a shape, made once per module."""
    made = {}

    def make(shape):
        if shape not in made:
            root = tmp_path_factory.mktemp(shape)
            hf = make_tiny_deepseek(root / "hf", shape)
            made[shape] = hf, import_from_hf(hf, root / "nemo")
        return made[shape]

    return make


def nemo_logits(path):
    with loaded(path) as model:
        positions = torch.arange(TOKENS.shape[1]).expand_as(TOKENS)
        with torch.no_grad():
            return model.eval()(TOKENS, positions, None)


def test_hf_config_reads_as_the_debug_size():
    from transformers import DeepseekV3Config

    imported = config_from_hf(DeepseekV3Config(**DEBUG_SHAPE))
    debug = SIZES["debug"]
    shared = set(debug) & set(imported) - {"make_vocab_size_divisible_by", "mtp_num_layers",
                                           "mtp_loss_scaling_factor", "vocab_size"}
    assert len(shared) == 16
    assert {k: imported[k] for k in shared} == {k: debug[k] for k in shared}
    assert imported["moe_router_group_score_topk"] == 2  # transformers' group score


@pytest.mark.parametrize("shape", SHAPES)
def test_import_matches_transformers_logits_and_exports_back(checkpoint, shape, tmp_path):
    hf, imported = checkpoint(shape)
    ours, theirs = nemo_logits(imported), hf_logits(hf, TOKENS)
    assert ours.shape == theirs.shape == (2, 24, VOCAB)
    assert (ours - theirs).abs().max() < TOLERANCE
    # and back: every tensor round-trips unchanged
    assert torch.equal(hf_logits(export_to_hf(imported, tmp_path / "hf"), TOKENS), theirs)


def test_routing_matches_transformers_where_biased_scores_are_negative(tmp_path):
    """transformers scores the experts of the groups not chosen 0 and
    megatron-core -inf: with expert biases around -1 the debug shape
    (whose group score both compute alike) moved the logits by 4 when
    imported onto megatron-core's router."""
    hf = make_tiny_deepseek(tmp_path / "hf", "debug", expert_bias_mean=-1.0)
    imported = import_from_hf(hf, tmp_path / "nemo")
    assert (nemo_logits(imported) - hf_logits(hf, TOKENS)).abs().max() < TOLERANCE


def test_megatron_core_group_scores_would_route_otherwise(checkpoint, monkeypatch, tmp_path):
    # the same checkpoint imported with megatron-core's group score
    # (top k/groups = 3 experts, not 2) computes other logits
    from coom_nemo.models import deepseek as models

    hf, _ = checkpoint("k6_of_2groups_lite")
    monkeypatch.setattr(models, "HF_GROUP_SCORE_TOPK", None)
    imported = import_from_hf(hf, tmp_path / "nemo")
    assert (nemo_logits(imported) - hf_logits(hf, TOKENS)).abs().max() > 1e-2


@pytest.mark.parametrize("change, message", [
    ("add", "model.layers.0.mlp.extra.weight: in the checkpoint but not in transformers' "
            "DeepseekV3ForCausalLM of the config; give a complete checkpoint of one "
            "architecture and its own config"),
    ("drop", "model.layers.1.mlp.gate.e_score_correction_bias: missing from the checkpoint; "
             "give a complete checkpoint of one architecture and its own config"),
])
def test_a_stray_or_missing_tensor_is_refused_in_one_line(checkpoint, change, message,
                                                          tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    hf = shutil.copytree(checkpoint("debug")[0], tmp_path / "hf")
    tensors = load_file(hf / "model.safetensors")
    if change == "add":
        tensors["model.layers.0.mlp.extra.weight"] = torch.ones(4)
    else:
        del tensors["model.layers.1.mlp.gate.e_score_correction_bias"]
    save_file(tensors, hf / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointMismatchError) as error:
        import_from_hf(hf, tmp_path / "out")
    assert str(error.value) == message
    assert not (tmp_path / "out").exists()


def test_a_checkpoints_mtp_layers_are_left_out(checkpoint, tmp_path):
    """DeepSeek-V3's files hold its MTP layers as the layers after
    ``num_hidden_layers`` (``num_nextn_predict_layers`` of them), which
    transformers' model lacks: left out; a layer the config does not
    name is refused."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    source, _ = checkpoint("debug")
    hf = shutil.copytree(source, tmp_path / "hf")
    tensors = load_file(hf / "model.safetensors")
    mtp = {k.replace("layers.1.", "layers.2."): v.clone() for k, v in tensors.items()
           if k.startswith("model.layers.1.")}
    save_file({**tensors, **mtp}, hf / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointMismatchError, match=r"^model\.layers\.2\..* \(and \d+ more\): "
                       "in the checkpoint but not in transformers' DeepseekV3ForCausalLM"):
        import_from_hf(hf, tmp_path / "refused")
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 1}))
    imported = import_from_hf(hf, tmp_path / "nemo")
    assert (nemo_logits(imported) - hf_logits(source, TOKENS)).abs().max() < TOLERANCE


@pytest.mark.parametrize("shape", SHAPES)
def test_transformer_engine_names_convert_both_ways(checkpoint, shape):
    """The TE spec fuses MLA's q/kv norms and a dense layer's MLP norm
    into the next linear and groups the experts; the same table maps
    those names (checked here without TE on the host)."""
    from safetensors.torch import load_file

    from coom_nemo.models.deepseek import MAPPINGS
    from coom_nemo.models.hf_mapping import megatron_state

    hf, imported = checkpoint(shape)
    with loaded(imported) as model:
        local = megatron_state(model)
    te = check_te_names(load_file(hf / "model.safetensors"), local, MAPPINGS, model.config,
                        mla=True, dense_layers=range(SHAPES[shape]["first_k_dense_replace"]))
    assert any(".experts.linear_fc1.weight" in k for k in te)
    dense = SHAPES[shape]["first_k_dense_replace"]
    assert ("decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in te) == bool(dense)
    assert (f"decoder.layers.{dense}.self_attention.linear_q_up_proj.layer_norm_weight" in te
            ) == bool(SHAPES[shape]["q_lora_rank"])


YARN = DEBUG_SHAPE["rope_scaling"]


@pytest.mark.parametrize("rope_scaling, message", [
    (dict(rope_type="linear", factor=4.0), "rope_scaling type 'linear' is not supported"),
    (dict(rope_type="dynamic", factor=4.0), "rope_scaling type 'dynamic' is not supported"),
    ({**YARN, "attention_factor": 2.0}, r"rope_scaling.attention_factor=2.0 is not supported"),
    ({**YARN, "truncate": False}, "rope_scaling.truncate=False is not supported"),
    ({k: v for k, v in YARN.items() if k != "mscale"},
     "rope_scaling.mscale_all_dim=1.0 without mscale is not supported"),
])
def test_rope_scaling_mla_cannot_compute_is_refused_in_one_line(rope_scaling, message):
    """Each of these moved the logits by 0.07 to 7 when imported as
    plain RoPE or with the field ignored."""
    from transformers import DeepseekV3Config

    with pytest.raises(ValueError, match=f"^config.json: {message}; [^\n]+$"):
        config_from_hf(DeepseekV3Config(**{**DEBUG_SHAPE, "rope_scaling": rope_scaling}))


def test_yarn_with_one_mscale_is_transformers_default_scaling():
    """Without both mscales transformers scales cos/sin by
    0.1 ln(factor) + 1 whatever ``mscale`` says: MLA's (1, 0); export
    refuses what has no such form."""
    import fiddle as fdl
    from transformers import DeepseekV3Config

    one = {**YARN, "mscale": 0.707, "mscale_all_dim": 0}
    imported = config_from_hf(DeepseekV3Config(**{**DEBUG_SHAPE, "rope_scaling": one}))
    assert (imported["mscale"], imported["mscale_all_dim"]) == (1.0, 0.0)
    config = fdl.build(deepseek_model("debug", rope_type="yarn", mscale=0.707,
                                      mscale_all_dim=0.0)).config
    with pytest.raises(ValueError, match=r"^mscale, mscale_all_dim: \(0.707, 0.0\) has no HF "):
        hf_config_from(config)


def test_export_refuses_what_transformers_cannot_compute():
    import fiddle as fdl

    config = fdl.build(deepseek_model("debug", moe_router_topk=6)).config
    with pytest.raises(ValueError, match=(
            r"^moe_router_group_score_topk: a group scores its top 3 experts here, "
            r"transformers' DeepseekV3 its top 2; export a model trained with "
            r"moe_router_group_score_topk=2$")):
        hf_config_from(config)


def finetune(factory, checkpoint, data, run_dir, lora_targets=None):
    recipe = factory(restore_path=str(checkpoint), data_dir=str(data), size="debug", cpu=True,
                     dir=str(run_dir), seq_length=64)
    if lora_targets:
        recipe.peft.target_modules = lora_targets
    recorder, watch = watched(recipe, TOKENS)
    assert len(recorder.losses) == 10
    assert falls(recorder.losses, margin=0.5), recorder.losses
    return watch


MLA = {"linear_q_down_proj", "linear_q_up_proj", "linear_kv_down_proj", "linear_kv_up_proj",
       "linear_proj"}


@pytest.mark.parametrize("shape, lora_targets, adapted", [
    # low-rank q, 5 heads, 8 experts, no dense layer: the recipe's MLA
    # targets
    ("k2_of_2groups_all_moe", None, MLA),
    # full-rank q, 3 heads, 12 experts, 2 shared, a dense layer: every
    # linear NeMo's LoRA reaches (dense MLP, shared and routed experts)
    ("k6_of_2groups_lite", deepseek.LORA_TARGETS + ["linear_fc1", "linear_fc2"],
     MLA - {"linear_q_down_proj", "linear_q_up_proj"} | {
         "linear_q_proj", "linear_fc1", "linear_fc2"}),
])
def test_lora_trains_its_adapters_and_exports_to_peft(checkpoint, shape, lora_targets, adapted,
                                                      tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import DeepseekV3ForCausalLM

    hf, imported = checkpoint(shape)
    data = write_finetuning_data(tmp_path / "chat", chat=True)
    watch = finetune(deepseek.lora_recipe_16b, imported, data, tmp_path / "run", lora_targets)
    adapters = {n for n in watch.before if ".adapter." in n}
    assert watch.trainable == adapters
    assert {n.split(".adapter.")[0].rsplit(".", 1)[-1] for n in adapters} == adapted
    changed = {n for n in watch.before if not torch.equal(watch.before[n], watch.after[n])}
    assert changed == adapters

    adapter = export_lora(next((tmp_path / "run").rglob("*-last")), tmp_path / "adapter",
                          base_model=str(hf))
    base = DeepseekV3ForCausalLM.from_pretrained(hf, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    # every HF linear the adapted megatron-core linears stand for (all
    # of a layer's linears with the MLPs, its attention's without),
    # each with an A and a B that are not zero
    wanted = {name for name, module in base.named_modules()
              if isinstance(module, torch.nn.Linear) and name.startswith("model.layers.")
              and (lora_targets or ".self_attn." in name)}
    tensors = load_file(adapter / "adapter_model.safetensors")
    assert {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in tensors} == wanted
    assert len(tensors) == 2 * len(wanted)
    assert all(t.abs().amax() > 0 for t in tensors.values())
    with torch.no_grad():
        untuned = base(TOKENS).logits
        theirs = PeftModel.from_pretrained(base, adapter).eval()(TOKENS).logits
    print(f"{shape}: PEFT vs NeMo max |difference| {(watch.logits - theirs).abs().max():.2e}, "
          f"adapters moved the logits by {(theirs - untuned).abs().max():.2f}")
    assert (watch.logits - theirs).abs().max() < TOLERANCE
    assert (theirs - untuned).abs().max() > 0.1  # the adapters did train


def _with_adapters(*names, width=4, rank=2):
    """A module tree holding NeMo-shaped LoRA adapters at ``names``."""
    root = torch.nn.Module()
    for name in names:
        module = root
        for part in name.split("."):
            if not hasattr(module, part):
                module.add_module(part, torch.nn.Module())
            module = getattr(module, part)
        module.dim, module.alpha = rank, 2 * rank
        module.linear_in = torch.nn.Linear(width, rank, bias=False)
        module.linear_out = torch.nn.Linear(rank, 2 * width, bias=False)
    return root


def test_grouped_experts_adapter_is_every_experts_and_a_stray_one_is_refused():
    """TE's grouped experts (a GPU-only spec) get one adapter per layer
    from NeMo's LoRA; in PEFT it is each expert's gate/up with the
    same A and the B's halves. An adapter of no HF linear (gated
    attention's gate) is refused."""
    from coom_nemo.models.deepseek import MAPPINGS
    from coom_nemo.peft_export import lora_tensors

    model = _with_adapters("decoder.layers.1.mlp.experts.linear_fc1.adapter")
    tensors, rank, alpha = lora_tensors(model, SimpleNamespace(num_moe_experts=3), MAPPINGS)
    adapter = model.get_submodule("decoder.layers.1.mlp.experts.linear_fc1.adapter")
    gate, up = adapter.linear_out.weight.detach().chunk(2)
    assert (rank, alpha) == (2, 4) and len(tensors) == 3 * 2 * 2
    for expert in range(3):
        for proj, b in (("gate_proj", gate), ("up_proj", up)):
            prefix = f"base_model.model.model.layers.1.mlp.experts.{expert}.{proj}"
            assert torch.equal(tensors[f"{prefix}.lora_A.weight"], adapter.linear_in.weight)
            assert torch.equal(tensors[f"{prefix}.lora_B.weight"], b)
    with pytest.raises(ValueError, match=(
            r"^decoder\.layers\.0\.self_attention\.linear_gate: a LoRA adapter of no HF "
            r"linear \(PEFT has no name for it\); train without it \(peft\.target_modules\)$")):
        lora_tensors(_with_adapters("decoder.layers.0.self_attention.linear_gate.adapter"),
                     SimpleNamespace(num_moe_experts=3), MAPPINGS)


def test_sft_trains_and_exports_to_transformers(checkpoint, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoConfig

    hf, imported = checkpoint("k6_of_2groups_lite")
    data = write_finetuning_data(tmp_path / "instructions", chat=False)
    watch = finetune(deepseek.sft_recipe_16b, imported, data, tmp_path / "run")
    assert watch.trainable == set(watch.before)
    start = {n.split("module.")[-1]: w for n, w in watch.before.items()}
    hf_weights = load_file(hf / "model.safetensors")
    assert torch.equal(start["decoder.layers.2.mlp.router.weight"],
                       hf_weights["model.layers.2.mlp.gate.weight"])

    trained = next((tmp_path / "run").rglob("*-last"))
    exported = export_to_hf(trained, tmp_path / "hf")
    theirs = hf_logits(exported, TOKENS)
    assert (nemo_logits(trained) - theirs).abs().max() < TOLERANCE
    assert (theirs - hf_logits(hf, TOKENS)).abs().max() > 0.1  # it did train
    original, written = AutoConfig.from_pretrained(hf), AutoConfig.from_pretrained(exported)
    for field in ("num_hidden_layers", "hidden_size", "intermediate_size",
                  "moe_intermediate_size", "num_attention_heads", "q_lora_rank",
                  "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                  "n_routed_experts", "n_shared_experts", "num_experts_per_tok", "n_group",
                  "topk_group", "first_k_dense_replace", "routed_scaling_factor",
                  "rope_scaling", "rope_theta", "vocab_size", "rms_norm_eps"):
        assert getattr(written, field) == getattr(original, field), field
    assert (exported / "tokenizer.json").is_file()
    with pytest.raises(FileExistsError, match="^output_path: "):
        export_to_hf(trained, exported)


def test_an_hf_import_restores_only_without_mtp(checkpoint):
    _, imported = checkpoint("debug")
    with pytest.raises(PlanError, match="^restore_path: .* holds no MTP weights .*"
                                        "pass mtp_layers=0"):
        deepseek.pretrain_recipe(size="debug", cpu=True, restore_path=str(imported))


@pytest.mark.parametrize("size", ["16b", "v3"])
def test_full_size_fine_tuning_plans_pass_the_plan_check(size, monkeypatch, tmp_path, capsys):
    from coom_nemo import finetune as finetune_module

    monkeypatch.setattr(finetune_module, "checkpoint_model",
                        lambda path, importer: deepseek_model(size, mtp_num_layers=None))
    data = write_finetuning_data(tmp_path / "data", chat=False)
    for factory, method in ((getattr(deepseek, f"lora_recipe_{size}"), "lora"),
                            (getattr(deepseek, f"sft_recipe_{size}"), "sft")):
        recipe = factory(restore_path="/ckpt", data_dir=str(data))
        assert recipe.trainer.num_nodes == deepseek.PRESETS[size].cluster.num_nodes
        assert (recipe.peft is not None) == (method == "lora")
        assert f"model=deepseek_{size}_{method} " in capsys.readouterr().out


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
@pytest.mark.parametrize("precision, scaling", [("fp8-current", "tensorwise"),
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


def test_fp8_delayed_scaling_is_refused_before_a_launch(capsys):
    """Shared experts under delayed scaling fail in TE's first
    forward on a GPU; the launcher says so in one line, first."""
    code = launch.main(deepseek.pretrain_recipe, "16b",
                       ["--size", "debug", "--gpus-per-node", "1", "--precision", "fp8-delayed"])
    assert code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(errors) == 1
    assert errors[0].startswith("error: trainer.plugins: FP8 delayed scaling with shared experts")


def test_fp8_in_cpu_mode_is_refused_not_silently_dropped():
    with pytest.raises(PlanError, match="^precision: fp8-current needs TransformerEngine"):
        deepseek.pretrain_recipe(size="debug", cpu=True, precision="fp8-current")


@pytest.mark.parametrize("fusion", [True, False])
def test_mla_rope_fusion_opts_into_megatron_experimental_code(fusion, monkeypatch):
    """megatron-core 0.15.3's fused MLA RoPE raises in the first
    forward unless its experimental flag is on (a MoE bench run on an
    H100 did, 2026-12-07); asking for the fusion turns it on, and
    nothing else does."""
    import fiddle as fdl
    from megatron.core import config as mcore_config

    from coom_nemo.models import base

    monkeypatch.setattr(base, "has_transformer_engine", lambda: True)  # keeps the fusion on
    monkeypatch.setattr(mcore_config, "ENABLE_EXPERIMENTAL", False)
    recipe = deepseek.pretrain_recipe(size="debug", cpu=True)
    recipe.model.config.apply_rope_fusion = fusion
    config = fdl.build(recipe.model.config)
    assert config.multi_latent_attention and config.apply_rope_fusion is fusion
    assert mcore_config.is_experimental_enabled() is fusion
