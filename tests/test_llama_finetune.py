"""Llama 3.1 from Hugging Face to fine-tuning and back, on CPU.

A tiny LlamaForCausalLM with every weight random and shapes unlike the
presets' (6 heads in 3 groups, head_dim 10 apart from hidden 48 / 6,
FFN 80) imports with transformers' logits; LoRA (chat JSONL) and full
SFT (instruction JSONL) train from it with falling loss; the SFT
result exports to a HF directory and the LoRA adapters to PEFT's
format, and transformers (with peft) computes what the fine-tuned NeMo
model computes, within TOLERANCE (fp32).
"""

from pathlib import Path

import pytest
import torch
from conftest import PYTHON
from helpers import falls, watched
from transformers import AutoConfig, LlamaForCausalLM

from coom_nemo import launch
from coom_nemo.models.conversion import loaded
from coom_nemo.models.llama_hf import export_to_hf, import_from_hf
from coom_nemo.peft_export import export_lora
from coom_nemo.recipes.llama31_finetune import FACTORIES
from coom_nemo.tiny import make_tiny_llama, write_finetuning_data

TOKENS = torch.randint(0, 384, (2, 32), generator=torch.Generator().manual_seed(1))
POSITIONS = torch.arange(TOKENS.shape[1]).expand_as(TOKENS)
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="module")
def imported(hf_dir, tmp_path_factory):
    return import_from_hf(hf_dir, tmp_path_factory.mktemp("nemo") / "llama")


def hf_logits(model_dir, adapter=None):
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                             attn_implementation="eager")
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    with torch.no_grad():
        return model.eval()(TOKENS).logits


def finetune(method, imported, data_dir, tmp_path):
    recipe = FACTORIES[f"coom_llama31_8b_{method}"](
        restore_path=str(imported), data_dir=str(data_dir), size="debug", cpu=True,
        dir=str(tmp_path / "run"), seq_length=64)
    recorder, watch = watched(recipe, TOKENS)
    assert len(recorder.losses) == 10
    assert falls(recorder.losses, margin=0.5), recorder.losses
    return watch.logits, next((tmp_path / "run").rglob("*-last"))


def test_import_matches_transformers(hf_dir, imported):
    with loaded(imported) as model, torch.no_grad():
        ours = model.eval()(TOKENS, POSITIONS, None)
    theirs = hf_logits(hf_dir)
    assert ours.shape == theirs.shape == (2, 32, 384)
    assert (ours - theirs).abs().max() < TOLERANCE


def test_lora_exports_to_peft(hf_dir, imported, tmp_path):
    data = write_finetuning_data(tmp_path / "chat", chat=True)
    tuned, checkpoint = finetune("lora", imported, data, tmp_path)
    adapter = export_lora(checkpoint, tmp_path / "adapter", base_model=str(hf_dir))
    theirs = hf_logits(hf_dir, adapter)
    assert (tuned - theirs).abs().max() < TOLERANCE
    assert (theirs - hf_logits(hf_dir)).abs().max() > 0.1  # the adapters did train
    config = (adapter / "adapter_config.json").read_text()
    assert '"r": 8' in config and '"lora_alpha": 16' in config
    with pytest.raises(ValueError, match="^checkpoint: a LoRA run's checkpoint holds"):
        export_to_hf(checkpoint, tmp_path / "hf")


def test_sft_exports_to_transformers(hf_dir, imported, tmp_path):
    data = write_finetuning_data(tmp_path / "instructions", chat=False)
    tuned, checkpoint = finetune("sft", imported, data, tmp_path)
    exported = export_to_hf(checkpoint, tmp_path / "hf")
    theirs = hf_logits(exported)
    assert (tuned - theirs).abs().max() < TOLERANCE
    assert (theirs - hf_logits(hf_dir)).abs().max() > 0.1  # it did train
    original, written = AutoConfig.from_pretrained(hf_dir), AutoConfig.from_pretrained(exported)
    for field in ("num_hidden_layers", "hidden_size", "intermediate_size", "head_dim",
                  "num_attention_heads", "num_key_value_heads", "rope_scaling", "rope_theta",
                  "rms_norm_eps", "vocab_size", "tie_word_embeddings"):
        assert getattr(written, field) == getattr(original, field), field
    assert (exported / "tokenizer.json").is_file()
    with pytest.raises(FileExistsError, match="^output_path: "):
        export_to_hf(checkpoint, exported)


def test_launch_paths(imported, run_cmd, tmp_path):
    """``recipes/llama31_finetune.py`` flags and ``nemo llm finetune``
    reach the factories; flags they do not take are refused."""
    data = write_finetuning_data(tmp_path / "data", chat=False)
    args = launch.parse_args(["--size", "debug", "--cpu", "--restore-path", str(imported),
                              "--data-dir", str(data), "--max-steps", "3"], "8b",
                             FACTORIES["coom_llama31_8b_sft"])
    recipe = launch.build(FACTORIES["coom_llama31_8b_sft"], args)
    assert recipe.trainer.max_steps == 3 and recipe.peft is None
    # the debug schedule validates every 5 steps; a 3-step set has 3
    # batches, and Lightning refuses an interval beyond them
    assert recipe.trainer.val_check_interval == 3
    args.data = ["/data/prefix"]
    with pytest.raises(ValueError, match="^--data: this recipe does not take it"):
        launch.build(FACTORIES["coom_llama31_8b_sft"], args)

    factory = f"coom_llama31_70b_lora(restore_path={imported}, data_dir={data}, size=debug, " \
              "cpu=True)"
    code, out = run_cmd([str(Path(PYTHON).parent / "nemo"), "llm", "finetune", "--factory",
                         factory, "--dryrun", "--yes"])
    assert code == 0, out[-3000:]
    assert "model=llama31_debug_lora " in out and "LoRA(" in out


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_full_size_plans_pass_the_plan_check(name, monkeypatch, tmp_path, capsys):
    """NeMo's layouts for 8B/70B/405B; LoRA's frozen weights need no
    gradients or Adam state (70B LoRA fits one TP8 node only so)."""
    from coom_nemo import finetune
    from coom_nemo.models.llama import llama31_model

    size = name.split("_")[2]
    monkeypatch.setattr(finetune, "checkpoint_model", lambda path, importer: llama31_model(size))
    recipe = FACTORIES[name](restore_path="/ckpt",
                             data_dir=str(write_finetuning_data(tmp_path, chat=True)))
    assert f"model=llama31_{size}_" in capsys.readouterr().out
    assert recipe.plan.frozen_weights == name.endswith("_lora")
