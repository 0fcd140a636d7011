"""GPT-OSS to and from Hugging Face, on CPU.

A tiny GptOssForCausalLM made here imports into NeMo (plain and gated)
with logits equal to transformers' within TOLERANCE; LoRA (on chat
JSONL) and full SFT (on instruction JSONL) train from the import with
falling loss; the SFT result exports back to HF and computes there
what it computes in NeMo.
"""

import dataclasses
from pathlib import Path

import pytest
import torch
from conftest import PYTHON, ROOT
from gpt_oss_tiny import hf_logits, make_tiny_gpt_oss, write_finetuning_data
from helpers import check_te_names, falls, watched
from safetensors.torch import load_file
from transformers import AutoConfig

from coom_nemo.models.conversion import loaded
from coom_nemo.models.gpt_oss import CoomGptOssConfig
from coom_nemo.models.gpt_oss_hf import (
    config_from_hf,
    export_to_hf,
    hf_config_from,
    import_from_hf,
)
from coom_nemo.models.hf_mapping import CheckpointMismatchError
from coom_nemo.recipes import gpt_oss_20b

TOKENS = torch.randint(0, 384, (2, 32), generator=torch.Generator().manual_seed(1))
# fp32 on CPU; measured max |difference| 1.7e-6 (logits up to ~3)
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_tiny_gpt_oss(tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="module")
def imported(hf_dir, tmp_path_factory):
    return import_from_hf(hf_dir, tmp_path_factory.mktemp("nemo") / "gpt_oss")


@pytest.fixture(scope="module")
def gated(hf_dir, tmp_path_factory):
    return import_from_hf(hf_dir, tmp_path_factory.mktemp("nemo") / "gated",
                          attention_gate=True)


def nemo_logits(checkpoint):
    with loaded(checkpoint) as model:
        positions = torch.arange(TOKENS.shape[1]).expand_as(TOKENS)
        with torch.no_grad():
            return model.eval()(TOKENS, positions, None)


def test_import_matches_hf_logits(hf_dir, imported):
    ours, theirs = nemo_logits(imported), hf_logits(hf_dir, TOKENS)
    assert ours.shape == theirs.shape == (2, 32, 384)
    assert (ours - theirs).abs().max() < TOLERANCE


@pytest.mark.parametrize("shape", ["top1_odd_heads", "top3_of_6"])
def test_other_shapes_import_with_matching_logits(shape, tmp_path):
    # top-1: megatron-core refuses it without pre-softmax, which would
    # weigh the expert by its probability where transformers weighs 1
    hf_dir = make_tiny_gpt_oss(tmp_path / "hf", seed=2, shape=shape)
    imported = import_from_hf(hf_dir, tmp_path / "nemo")
    config = AutoConfig.from_pretrained(hf_dir)
    with loaded(imported) as model:
        assert model.config.moe_router_topk == config.num_experts_per_tok
        assert not model.config.moe_router_pre_softmax
    theirs = hf_logits(hf_dir, TOKENS)
    assert (nemo_logits(imported) - theirs).abs().max() < TOLERANCE
    # and back: every tensor round-trips unchanged
    assert torch.equal(hf_logits(export_to_hf(imported, tmp_path / "out"), TOKENS), theirs)


def test_transformer_engine_names_convert_both_ways(hf_dir, imported):
    """The TE spec fuses the input norm into linear_qkv and groups the
    experts (weight<e>, bias<e>); the same table maps those names
    (checked here without TE on the host)."""
    from coom_nemo.models.gpt_oss_hf import mappings
    from coom_nemo.models.hf_mapping import megatron_state

    with loaded(imported) as model:
        local, config = megatron_state(model), model.config
    te = check_te_names(load_file(hf_dir / "model.safetensors"), local, mappings(config), config,
                        mla=False, dense_layers=())
    assert "decoder.layers.1.mlp.experts.linear_fc1.bias3" in te


def test_a_tensor_no_weight_takes_is_refused_in_one_line(hf_dir, tmp_path):
    import shutil

    from safetensors.torch import save_file

    copy = Path(shutil.copytree(hf_dir, tmp_path / "hf"))
    tensors = load_file(copy / "model.safetensors")
    tensors["model.layers.1.self_attn.k_norm.weight"] = torch.ones(16)
    save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointMismatchError) as error:
        import_from_hf(copy, tmp_path / "out")
    assert str(error.value) == (
        "model.layers.1.self_attn.k_norm.weight: in the checkpoint but not in transformers' "
        "GptOssForCausalLM of the config; give a complete checkpoint of one architecture and "
        "its own config")
    assert not (tmp_path / "out").exists()


def test_gated_import_computes_the_same_function(hf_dir, gated, tmp_path):
    with loaded(gated) as model:
        gates = [p for n, p in model.named_parameters() if n.endswith("linear_gate.weight")]
        assert len(gates) == 2 and all(not g.any() for g in gates)
    # with the gate ignored, the doubled projection would not match
    assert (nemo_logits(gated) - hf_logits(hf_dir, TOKENS)).abs().max() < TOLERANCE
    with pytest.raises(ValueError, match="^attention_gate: "):
        export_to_hf(gated, tmp_path / "hf")


def test_a_swiglu_limit_transformers_ignores_is_refused_both_ways(hf_dir):
    """transformers' GPT-OSS clamps at 7.0 whatever ``swiglu_limit``
    says (a limit of 0.5 imported as such moved the logits by 2.9)."""
    hf = AutoConfig.from_pretrained(hf_dir)
    hf.swiglu_limit = 0.5
    with pytest.raises(ValueError, match=r"^config.json: swiglu_limit=0.5 is not supported; "):
        config_from_hf(hf)
    hf.swiglu_limit = 7.0
    config = CoomGptOssConfig(**config_from_hf(hf))
    with pytest.raises(ValueError, match=r"^activation_func_clamp_value: 5.0 has no HF form"):
        hf_config_from(dataclasses.replace(config, activation_func_clamp_value=5.0))


def test_shapes_unlike_the_config_name_the_first_mismatching_tensor(hf_dir, tmp_path):
    config = CoomGptOssConfig(**config_from_hf(AutoConfig.from_pretrained(hf_dir)))
    wider = dataclasses.replace(config, ffn_hidden_size=128, moe_ffn_hidden_size=128)
    with pytest.raises(CheckpointMismatchError) as error:
        import_from_hf(hf_dir, tmp_path / "out", config=wider)
    assert error.value.tensor == "model.layers.0.mlp.experts.gate_up_proj"
    assert "shape (4, 64, 192) in the checkpoint, but the config expects (4, 64, 256)" in str(
        error.value)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


def test_an_existing_output_is_refused_not_overwritten(hf_dir, imported):
    before = {p: p.stat().st_mtime_ns for p in imported.rglob("*")}
    with pytest.raises(FileExistsError, match="^output_path: "):
        import_from_hf(hf_dir, imported)
    assert {p: p.stat().st_mtime_ns for p in imported.rglob("*")} == before


def finetune(factory, imported, data_dir, tmp_path):
    recipe = factory(restore_path=str(imported), data_dir=str(data_dir), size="debug",
                     cpu=True, dir=str(tmp_path / "run"), seq_length=64)
    recorder, watch = watched(recipe)
    assert len(recorder.losses) == 10
    assert falls(recorder.losses, margin=0.5), recorder.losses
    return watch


def embedding(weights):
    return next(w for n, w in weights.items() if n.endswith("embedding.word_embeddings.weight"))


def test_lora_on_chat_data_trains_only_the_adapters(hf_dir, imported, tmp_path):
    data = write_finetuning_data(tmp_path / "chat", chat=True)
    watch = finetune(gpt_oss_20b.lora_recipe, imported, data, tmp_path)
    adapters = {n for n in watch.before if ".adapter." in n}
    assert adapters and watch.trainable == adapters
    changed = {n for n in watch.before if not torch.equal(watch.before[n], watch.after[n])}
    assert changed == adapters
    hf_weights = load_file(hf_dir / "model.safetensors")
    assert torch.equal(embedding(watch.before), hf_weights["model.embed_tokens.weight"])


def test_sft_on_instructions_trains_and_exports_to_hf(hf_dir, imported, tmp_path):
    data = write_finetuning_data(tmp_path / "instructions", chat=False)
    watch = finetune(gpt_oss_20b.sft_recipe, imported, data, tmp_path)
    assert watch.trainable == set(watch.before)
    hf_weights = load_file(hf_dir / "model.safetensors")
    assert torch.equal(embedding(watch.before), hf_weights["model.embed_tokens.weight"])

    trained = next((tmp_path / "run").rglob("*-last"))
    exported = export_to_hf(trained, tmp_path / "hf")
    theirs = hf_logits(exported, TOKENS)
    assert (nemo_logits(trained) - theirs).abs().max() < TOLERANCE
    assert (theirs - hf_logits(hf_dir, TOKENS)).abs().max() > 0.1  # it did train
    original, written = AutoConfig.from_pretrained(hf_dir), AutoConfig.from_pretrained(exported)
    for field in ("num_hidden_layers", "hidden_size", "intermediate_size", "head_dim",
                  "num_attention_heads", "num_key_value_heads", "num_local_experts",
                  "num_experts_per_tok", "sliding_window", "layer_types", "rope_scaling",
                  "rope_theta", "vocab_size"):
        assert getattr(written, field) == getattr(original, field), field
    assert (exported / "tokenizer.json").is_file()


def test_command_lines(gated, imported, run_cmd, tmp_path):
    """The converter script refuses in one line; ``nemo llm finetune``
    finds the fine-tuning factories."""
    code, out = run_cmd([PYTHON, str(ROOT / "recipes" / "gpt_oss_20b_hf.py"), "export",
                         str(gated), str(tmp_path / "hf")])
    assert code == 2
    assert [line for line in out.splitlines() if line.startswith("error:")] == [
        "error: attention_gate: transformers' GptOss has no attention gate, so a gated model "
        "cannot be exported; export a model trained without it"]

    data = write_finetuning_data(tmp_path / "data", chat=False)
    factory = f"coom_gpt_oss_20b_lora(restore_path={imported}, data_dir={data}, size=debug, " \
              "cpu=True)"
    code, out = run_cmd([str(Path(PYTHON).parent / "nemo"), "llm", "finetune", "--factory",
                         factory, "--dryrun", "--yes"])
    assert code == 0, out[-3000:]
    assert "Dry run for finetune" in out and "model=gpt_oss_debug_lora " in out
    assert "LoRA(" in out
