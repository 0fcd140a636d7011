"""Llama 3.1 between Hugging Face and megatron-core: the mapping table.

Every weight of a tiny LlamaForCausalLM is random (norms included), in
shapes other than the presets' (odd head counts, GQA ratios 1, 2 and
4, head_dim apart from hidden / heads, tied and untied embeddings,
llama3 RoPE scaling); converted into megatron-core's local (TE-free)
spec, its logits equal transformers' within TOLERANCE, and converted
back every tensor is the original. A tensor left over on either side
is refused in one line.
"""

import pytest
import torch
from helpers import check_te_names

from coom_nemo.models import hf_mapping
from coom_nemo.models.hf_mapping import CheckpointMismatchError, megatron_state, shapes
from coom_nemo.models.llama_hf import MAPPINGS, config_from_hf, hf_config_from
from coom_nemo.tiny import llama_config, randomize

# fp32 on CPU
TOLERANCE = 1e-4
TOKENS = torch.randint(0, 384, (2, 40), generator=torch.Generator().manual_seed(1))

SHAPES = {
    "gqa2-odd-heads-head_dim": dict(num_attention_heads=6, num_key_value_heads=3, head_dim=10),
    "mha-3-heads-tied": dict(num_attention_heads=3, num_key_value_heads=3, head_dim=16,
                             tie_word_embeddings=True),
    "gqa4-odd-groups": dict(num_attention_heads=12, num_key_value_heads=3, head_dim=6,
                            num_hidden_layers=3),
    "gqa4-one-group-tied": dict(num_attention_heads=4, num_key_value_heads=1, head_dim=12,
                                hidden_size=40, intermediate_size=72, tie_word_embeddings=True),
}


def hf_model(seed=0, **shape):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(llama_config(**shape, attn_implementation="eager")).float()
    randomize(model, seed)
    return model.eval()


def hf_to_megatron(hf_state, model, config):
    hf_mapping.hf_to_megatron(hf_state, model, MAPPINGS, config)


def megatron_to_hf(model, config):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        wanted = AutoModelForCausalLM.from_config(hf_config_from(config)).state_dict()
    return hf_mapping.megatron_to_hf(megatron_state(model), shapes(wanted), MAPPINGS, config)


def megatron_model(config):
    model = config.configure_model(None)
    return model.eval()


def megatron_logits(model):
    positions = torch.arange(TOKENS.shape[1]).expand_as(TOKENS)
    with torch.no_grad():
        return model(TOKENS, positions, None)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES)
def test_logits_match_transformers_and_every_tensor_round_trips(model_parallel, shape):
    hf = hf_model(**shape)
    config = config_from_hf(hf.config, dtype=torch.float32)
    model = megatron_model(config)
    assert "decoder.layers.0.input_layernorm.weight" in megatron_state(model)  # local spec
    hf_to_megatron(hf.state_dict(), model, config)
    with torch.no_grad():
        theirs = hf(TOKENS).logits
    ours = megatron_logits(model)
    assert ours.shape == theirs.shape == (*TOKENS.shape, 384)
    assert (ours - theirs).abs().max() < TOLERANCE

    back = megatron_to_hf(model, config)
    original = hf.state_dict()
    if hf.config.tie_word_embeddings:
        original.pop("lm_head.weight")
    assert back.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(back[name], tensor), name


def test_norm_weights_matter(model_parallel):
    """What the old import got wrong: norms left at 1.0 change the
    logits far beyond the tolerance."""
    hf = hf_model(**SHAPES["gqa2-odd-heads-head_dim"])
    config = config_from_hf(hf.config, dtype=torch.float32)
    model = megatron_model(config)
    hf_to_megatron(hf.state_dict(), model, config)
    with torch.no_grad():
        theirs = hf(TOKENS).logits
        for name, param in model.named_parameters():
            if "layernorm" in name and "final" not in name:
                param.fill_(1.0)
    assert (megatron_logits(model) - theirs).abs().max() > 100 * TOLERANCE


def test_left_over_tensors_are_refused_in_one_line(model_parallel):
    hf = hf_model(**SHAPES["gqa2-odd-heads-head_dim"])
    config = config_from_hf(hf.config, dtype=torch.float32)
    model = megatron_model(config)
    state = hf.state_dict()

    extra = {**state, "model.layers.0.self_attn.q_norm.weight": torch.ones(10)}
    with pytest.raises(CheckpointMismatchError) as error:
        hf_to_megatron(extra, model, config)
    assert str(error.value).startswith("model.layers.0.self_attn.q_norm.weight: in the HF "
                                       "checkpoint but used by no tensor")
    missing = {k: v for k, v in state.items() if "post_attention_layernorm" not in k}
    with pytest.raises(CheckpointMismatchError, match=(
            r"^model\.layers\.0\.post_attention_layernorm\.weight: missing from the HF "
            r"checkpoint")):
        hf_to_megatron(missing, model, config)
    deeper = config_from_hf(llama_config(**SHAPES["gqa2-odd-heads-head_dim"],
                                         num_hidden_layers=1), dtype=torch.float32)
    with pytest.raises(CheckpointMismatchError) as error:
        hf_to_megatron(state, megatron_model(deeper), deeper)
    # layer 1's nine tensors: the first named, the rest counted
    assert str(error.value).startswith("model.layers.1.input_layernorm.weight (and 8 more): ")
    assert "\n" not in str(error.value)


def test_transformer_engine_names_convert_both_ways(model_parallel):
    """The TE spec fuses each norm into the next linear; the same
    table maps those names (checked here without TE on the host)."""
    hf = hf_model(**SHAPES["gqa4-odd-groups"])
    config = config_from_hf(hf.config, dtype=torch.float32)
    model = megatron_model(config)
    hf_to_megatron(hf.state_dict(), model, config)
    te = check_te_names(hf.state_dict(), megatron_state(model), MAPPINGS, config, mla=False,
                        dense_layers=range(config.num_layers))
    assert any(k.endswith("linear_qkv.layer_norm_weight") for k in te)


def test_configs_without_llama31_rope_are_refused_in_one_line():
    with pytest.raises(ValueError, match=r"^rope_scaling: None is not Llama 3\.1's"):
        config_from_hf(llama_config(rope_scaling=None))
    with pytest.raises(ValueError, match="^attention_bias: "):
        config_from_hf(llama_config(attention_bias=True))


def test_checkpoint_files_are_read_as_the_index_names_them(tmp_path):
    """A sharded directory is read through its index, as transformers
    reads it: a stray file repeating a tensor with other values moved
    Llama's logits by 6 when every ``*.safetensors`` was read. Without
    an index a tensor in two files, and with one a missing file, are
    refused; so is a truncated file, naming it."""
    import json

    from safetensors.torch import save_file

    from coom_nemo.models.conversion import read_safetensors

    norm = torch.rand(8)
    for name, tensors in {"model-00001-of-00002.safetensors": {"a": torch.rand(3)},
                          "model-00002-of-00002.safetensors": {"model.norm.weight": norm}}.items():
        save_file(tensors, tmp_path / name)
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors",
                            "model.norm.weight": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    save_file({"model.norm.weight": torch.full((8,), 3.0)}, tmp_path / "stale.safetensors")
    read = read_safetensors(tmp_path)
    assert set(read) == {"a", "model.norm.weight"} and torch.equal(read["model.norm.weight"], norm)

    (tmp_path / "model.safetensors.index.json").unlink()
    with pytest.raises(CheckpointMismatchError, match=(
            r"^model\.norm\.weight: in both model-00002-of-00002\.safetensors and "
            r"stale\.safetensors; keep one copy of each tensor")):
        read_safetensors(tmp_path)

    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {**index["weight_map"], "b": "model-00003-of-00003.safetensors"}}))
    with pytest.raises(FileNotFoundError, match=(
            r"^hf_dir: model-00003-of-00003\.safetensors \(named in "
            r"model\.safetensors\.index\.json\) is missing")):
        read_safetensors(tmp_path)

    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    first = tmp_path / "model-00001-of-00002.safetensors"
    first.write_bytes(first.read_bytes()[:40])
    with pytest.raises(ValueError, match=f"^hf_dir: {first} cannot be read \\(.*\\); copy it "
                       "again$"):
        read_safetensors(tmp_path)
