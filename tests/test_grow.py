"""Progressive model expansion (coom_nemo.grow), on CPU in fp32.

Every source is a random checkpoint (norms, biases, sinks, expert
biases all off their defaults); a function-preserving growth must give
the source's logits (main head and MTP heads) within 1e-5, and a stack
must hold in grown layer k the source layer it names.
"""

import dataclasses
import json

import fiddle as fdl
import pytest
import torch
from grow_tools import head_logits, make_source

from coom_nemo import grow
from coom_nemo.grow import Growth
from coom_nemo.models.deepseek import deepseek_model
from coom_nemo.models.gpt_oss import gpt_oss_model
from coom_nemo.models.llama import llama31_model
from coom_nemo.plan import PlanError
from coom_nemo.recipes import FACTORIES

# Shapes other than the debug defaults; GPT-OSS gated, DeepSeek with
# MLA, a dense first layer, shared experts, group routing and MTP.
FAMILIES = {
    "llama": llama31_model("debug", hidden_size=96, ffn_hidden_size=160,
                           num_attention_heads=6, num_query_groups=3),
    "gpt_oss_gated": gpt_oss_model("debug", attention_gate=True, num_layers=2,
                                   window_size=(5, 0)),
    "deepseek": deepseek_model("debug", num_layers=3, moe_layer_freq=[0, 1, 1],
                               mtp_num_layers=1),
}

FACTORY = {"llama": "coom_llama31_405b", "gpt_oss_gated": "coom_gpt_oss_20b_gated",
           "deepseek": "coom_deepseek"}

# Each function-preserving operator, alone and all together.
GROWTHS = {
    "depth_stack": dict(layers=4, preserve=True),
    "depth_midas": dict(layers=4, depth="midas", preserve=True),
    "width": dict(hidden=2, ffn=2, moe_ffn=2),  # factors
    "experts": dict(experts=2),
    "all": dict(layers=4, preserve=True, hidden=2, ffn=3, moe_ffn=2, experts=2),
}


def growth_for(config, name) -> Growth:
    spec = dict(GROWTHS[name])
    moe = bool(getattr(config, "num_moe_experts", None))
    if not moe:
        if name == "experts":
            return None
        spec.pop("moe_ffn", None)
        spec.pop("experts", None)
    sizes = dict(hidden="hidden_size", ffn="ffn_hidden_size", moe_ffn="moe_ffn_hidden_size",
                 experts="num_moe_experts")
    for key, field in sizes.items():
        if key in spec:
            spec[key] *= getattr(config, field)
    if config.num_layers == 3 and "layers" in spec:
        spec["layers"] = 5 if spec.get("depth") == "midas" else 6
    return Growth(**spec)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """{family: (checkpoint, logits, state, config)}, made once."""
    root = tmp_path_factory.mktemp("sources")
    made = {}
    for family, model in FAMILIES.items():
        make_source(model, root / family)
        made[family] = (root / family, *head_logits(root / family))
    return made


def assert_same_logits(grown, source):
    assert len(grown) == len(source)
    for g, s in zip(grown, source, strict=True):
        assert g.shape == s.shape
        assert (g - s).abs().max().item() < 1e-5, (g - s).abs().max().item()


@pytest.mark.parametrize("family", FAMILIES)
def test_function_preserving_growth(sources, tmp_path, family):
    path, logits, _, config = sources[family]
    assert logits[0].abs().max() > 1.0  # a random model, not a constant one
    for name in GROWTHS:
        growth = growth_for(config, name)
        if growth is None:
            continue
        plan = grow.grow_checkpoint(path, tmp_path / name, growth)
        grown_logits, state, grown_config = head_logits(tmp_path / name)
        assert_same_logits(grown_logits, logits)
        assert grown_config.num_layers == (growth.layers or config.num_layers)
        assert grown_config.hidden_size == (growth.hidden or config.hidden_size)
        if growth.experts:
            assert grown_config.num_moe_experts == growth.experts
            assert grown_config.moe_router_topk == config.moe_router_topk * 2
        record = json.loads((tmp_path / name / "grow.json").read_text())
        assert record["mapping"] == plan.mapping
    # the family's recipe builds the last one's grown shape; Llama's
    # refuses it: 6 heads are not its debug size's 4 (test_grow_parallel
    # restores a Llama of the debug size)
    factory = FACTORIES[FACTORY[family]]
    if family == "llama":
        with pytest.raises(PlanError, match="holds num_attention_heads=6, the recipe builds 4"):
            factory(size="debug", cpu=True, restore_path=str(tmp_path / name))
        return
    recipe = factory(size="debug", cpu=True, restore_path=str(tmp_path / name))
    assert grow._shape(grown_config) == grow._shape(fdl.build(recipe.model.config))


@pytest.mark.parametrize("depth, mapping", [("stack", [0, 1, 2, 0, 1, 2]),
                                            ("midas", [0, 1, 2, 1, 2])])
def test_stacking_copies_the_named_layers(sources, tmp_path, depth, mapping):
    """Not function-preserving: layer k holds source layer mapping[k],
    every tensor of it, and nothing is zeroed."""
    path, _, state, config = sources["deepseek"]
    plan = grow.grow_checkpoint(path, tmp_path / depth, Growth(layers=len(mapping),
                                                                depth=depth))
    assert plan.mapping == mapping and not plan.zeroed
    _, grown, grown_config = head_logits(tmp_path / depth)
    assert grown_config.moe_layer_freq == [[0, 1, 1][s] for s in mapping]
    for k, s in enumerate(mapping):
        layer = {key.split(".", 3)[3]: v for key, v in grown.items()
                 if key.startswith(f"decoder.layers.{k}.")}
        source = {key.split(".", 3)[3]: v for key, v in state.items()
                  if key.startswith(f"decoder.layers.{s}.")}
        assert layer.keys() == source.keys()
        for key in layer:
            assert torch.equal(layer[key], source[key]), (k, key)
    rest = [key for key in state if not key.startswith("decoder.layers.")]
    assert rest and all(torch.equal(grown[key], state[key]) for key in rest)


def test_refusals_come_before_anything_is_written(sources, tmp_path):
    path, _, _, config = sources["deepseek"]
    cases = [
        (Growth(layers=2), "layers: 2 is fewer than the source's 3"),
        (Growth(hidden=100), "hidden: 100 is not a multiple of the source's hidden_size=64"),
        (Growth(experts=24), "experts: 24 is not a multiple"),
        (Growth(layers=7, depth="midas"), "midas repeats at most"),
    ]
    for growth, message in cases:
        with pytest.raises(PlanError, match=message):
            grow.grow_checkpoint(path, tmp_path / "out", growth)
        assert not (tmp_path / "out").exists()
    with pytest.raises(PlanError, match="EP3 does not divide the grown model's 32 experts"):
        grow.grow_checkpoint(path, tmp_path / "out", Growth(experts=32), layout="EP3")
    (tmp_path / "out").mkdir()
    with pytest.raises(PlanError, match="already exists"):
        grow.grow_checkpoint(path, tmp_path / "out", Growth(layers=4))
    assert not any((tmp_path / "out").iterdir())


def test_window_alternation_follows_the_grown_index(sources):
    """GPT-OSS: every 2nd layer is full attention. Stacking 3 layers
    would put source layer 0 (windowed) at index 3 (full)."""
    config = dataclasses.replace(sources["gpt_oss_gated"][3], num_layers=3)
    with pytest.raises(PlanError, match="grown layer 3 would hold source layer 0 "
                                        r"\(sliding-window attention\) where layer 3 is full"):
        grow.plan_growth(config, Growth(layers=6))
    # zeroed copies compute nothing, so they may sit anywhere
    assert grow.plan_growth(config, Growth(layers=6, preserve=True)).zeroed == {3, 4, 5}
    assert grow.plan_growth(sources["gpt_oss_gated"][3], Growth(layers=6)).mapping == \
        [0, 1, 0, 1, 0, 1]


def test_layout_that_cannot_hold_the_grown_model_is_refused(sources):
    config = sources["llama"][3]  # 6 heads, 3 KV groups
    with pytest.raises(PlanError, match="TP4 does not divide the grown model's 6 heads"):
        grow.plan_growth(config, Growth(layers=4), layout="TP4")
    with pytest.raises(PlanError, match="PP4 does not divide the grown model's 6 layers"):
        grow.plan_growth(config, Growth(layers=6), layout="TP3.PP4")
    assert grow.plan_growth(config, Growth(layers=6), layout="TP3.PP3").config.num_layers == 6


def test_tied_embeddings_refuse_hidden_growth(sources):
    config = dataclasses.replace(sources["llama"][3], share_embeddings_and_output_weights=True)
    with pytest.raises(PlanError, match="ties its input and output embeddings"):
        grow.plan_growth(config, Growth(hidden=192))
    assert grow.plan_growth(config, Growth(layers=3)).mapping == [0, 1, 0]
