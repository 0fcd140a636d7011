"""HF import into a model whose parameters are on the meta device.

With TransformerEngine, NeMo's importer builds TE's layers on the meta
device (nemo/lightning/_strategy_lib.py:190-193): a weight copied into
one is silently dropped, and the save then fails ("Cannot copy out of
meta tensor"; seen on an H100, 2026-12-07). TE needs a GPU, so here
every parameter is moved to meta just before the table fills the
model, as TE's would be, and the import must still give transformers'
logits, for every family.
"""

import pytest
import torch
from deepseek_tiny import make_tiny_deepseek
from gpt_oss_tiny import make_tiny_gpt_oss

from coom_nemo.models import conversion, deepseek, gpt_oss_hf, llama_hf
from coom_nemo.models.hf_mapping import megatron_core, megatron_state
from coom_nemo.tiny import make_tiny_llama

FAMILIES = {"llama": (make_tiny_llama, llama_hf), "gpt_oss": (make_tiny_gpt_oss, gpt_oss_hf),
            "deepseek": (make_tiny_deepseek, deepseek)}
TOKENS = torch.randint(0, 384, (2, 24), generator=torch.Generator().manual_seed(1))
TOLERANCE = 1e-4  # fp32 on the CPU on both sides


def parameters_on_meta(module) -> int:
    """Replace every parameter of ``module`` by a meta one of its shape
    (megatron-core's attributes kept); return how many."""
    count = 0
    for owner in module.modules():
        for key, param in list(owner._parameters.items()):
            if param is not None:
                meta = torch.nn.Parameter(torch.empty_like(param, device="meta"),
                                          requires_grad=param.requires_grad)
                meta.__dict__.update(param.__dict__)
                owner._parameters[key] = meta
                count += 1
    return count


@pytest.mark.parametrize("family", FAMILIES)
def test_import_fills_parameters_built_on_meta(family, tmp_path, monkeypatch):
    make, module = FAMILIES[family]
    fill = conversion.hf_to_megatron
    moved = []

    def fill_on_meta(tensors, target, mappings, config):
        moved.append(parameters_on_meta(megatron_core(target)))
        fill(tensors, target, mappings, config)
        left = [name for name, t in megatron_state(target).items() if t.is_meta]
        assert not left, left

    monkeypatch.setattr(conversion, "hf_to_megatron", fill_on_meta)
    hf = make(tmp_path / "hf")
    checkpoint = module.import_from_hf(hf, tmp_path / "nemo")
    assert moved and moved[0] > 10

    from transformers import AutoModelForCausalLM

    positions = torch.arange(TOKENS.shape[1]).expand_as(TOKENS)
    with conversion.loaded(checkpoint) as model, torch.no_grad():
        ours = model.eval()(TOKENS, positions, None)
    reference = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32,
                                                     attn_implementation="eager").eval()
    with torch.no_grad():
        theirs = reference(TOKENS).logits
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max() < TOLERANCE
