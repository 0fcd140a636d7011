"""The shrunk Llama 3.1 405B recipe trains: C4-format indexed data,
validation in file order, the quality-target stop, a start from HF
weights."""

import math
import random
import re

import lightning.pytorch as pl
import numpy
import pytest
import torch
from helpers import falls, train
from mlperf_check import compliance_failures, mllog_events

from coom_nemo import c4
from coom_nemo.plan import PlanError
from coom_nemo.recipes import llama31_8b_mlperf, llama31_405b

VALIDATION = c4.LAYOUTS["reference"]["validation"][0]


def synthetic_documents(count: int, seed: int) -> list[str]:
    """Text with structure to learn: each word has three successors."""
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "re", "su", "ta", "ne", "po", "vi", "da", "go", "ru"]
    words = sorted({"".join(rng.choices(syllables, k=rng.randint(2, 3))) for _ in range(500)})
    follow = {w: rng.sample(words, 3) for w in words}
    docs = []
    for _ in range(count):
        word = rng.choice(words)
        text = [word]
        for _ in range(rng.randint(30, 90)):
            word = rng.choice(follow[word])
            text.append(word)
        docs.append(" ".join(text) + ".")
    return docs


def write_indexed(prefix, documents, tokenizer) -> None:
    """Megatron .bin/.idx as the reference's preprocess.sh writes them
    (one document per entry, no end-of-document token appended)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=numpy.uint16)
    for text in documents:
        builder.add_item(torch.tensor(tokenizer.text_to_ids(text)))
        builder.end_document()
    builder.finalize(f"{prefix}.idx")


@pytest.fixture(scope="module")
def c4_dir(tmp_path_factory):
    """A tokenizer trained offline and C4-format indexed data in the
    reference's layout (two train files read 50/50, one validation)."""
    import sentencepiece as spm
    from nemo.collections.common.tokenizers.sentencepiece_tokenizer import (
        SentencePieceTokenizer,
    )

    root = tmp_path_factory.mktemp("c4")
    docs = synthetic_documents(440, seed=0)
    train_docs, validation_docs = docs[:400], docs[400:]
    (root / "corpus.txt").write_text("\n".join(train_docs))
    spm.SentencePieceTrainer.train(input=str(root / "corpus.txt"),
                                   model_prefix=str(root / "spm"), vocab_size=500,
                                   model_type="bpe", minloglevel=2)
    tokenizer = SentencePieceTokenizer(model_path=str(root / "spm.model"))
    first, second = c4.LAYOUTS["reference"]["train"][1::2]
    write_indexed(root / first, train_docs[:200], tokenizer)
    write_indexed(root / second, train_docs[200:], tokenizer)
    write_indexed(root / VALIDATION, validation_docs, tokenizer)
    return root


def debug_recipe(c4_dir, tmp_path, **kwargs):
    return llama31_405b.pretrain_recipe(
        size="debug", cpu=True, dir=str(tmp_path), c4_dir=str(c4_dir),
        tokenizer=f"sentencepiece:{c4_dir / 'spm.model'}", **kwargs)


def val_steps(out: str) -> list[int]:
    return [int(m) for m in re.findall(r"^step +(\d+) \| val_loss", out, re.M)]


def test_trains_on_c4_and_validates_on_schedule(c4_dir, tmp_path, capsys):
    recipe = debug_recipe(c4_dir, tmp_path, max_steps=16, seed=7)
    assert recipe.model.config.vocab_size == 512  # 500 tokens, padded to 64
    recorder, trainer = train(recipe)
    out = capsys.readouterr().out
    assert len(recorder.losses) == 16 and falls(recorder.losses), recorder.losses
    # the LR schedule keeps the debug rules' 64 steps (a 16-step one
    # would be at its 3e-5 floor now)
    assert trainer.lr_scheduler_configs[0].scheduler.max_steps == 64
    assert trainer.optimizers[0].param_groups[0]["lr"] > 2e-3
    # debug rules: first evaluation after 64 sequences (8 steps at
    # GBS 8), then every 8 steps, on 16 sequences
    assert val_steps(out) == [8, 16]
    assert len(recorder.val_losses) == 2
    assert recorder.val_losses[-1] < recorder.val_losses[0] < math.log(512)
    assert "hyperparameters: seed=7 global_batch_size=8 " in out
    assert "quality target reached" not in out
    # MLPerf mode: an MLLOG file in the run folder (the console names
    # it; its lines go to the run's log), no checkpoint
    mllog = tmp_path / "llama31_debug" / "mlperf_llama31_405b.log"
    events = mllog_events(mllog)
    assert f"MLLOG: {mllog}" in out
    accuracy = [e for e in events if e["key"] == "eval_accuracy"]
    assert [e["metadata"]["samples_count"] for e in accuracy] == [64, 128]
    assert [e["value"] for e in accuracy] == pytest.approx(recorder.val_losses)
    run_stop = next(e for e in events if e["key"] == "run_stop")
    assert run_stop["metadata"]["status"] == "aborted"
    assert not list(tmp_path.rglob("*.distcp")) and not list(tmp_path.rglob("*-last"))
    # The debug size cannot meet the rules that fix the full size's
    # sequence length, LR formula, decay length and evaluation size,
    # nor the target 5.6 unless its loss falls that far; every other
    # key and value passes.
    unmet = {"max_sequence_length", "opt_base_learning_rate", "opt_learning_rate_decay_steps",
             "eval_samples"} | ({"eval_accuracy"} if min(recorder.val_losses) > 5.6 else set())
    assert set(compliance_failures(mllog, "6.0.0")) == unmet


def test_quality_target_stops_the_run(c4_dir, tmp_path, capsys):
    recipe = debug_recipe(c4_dir, tmp_path, max_steps=16, target_log_ppl=100.0)
    recorder, trainer = train(recipe)
    out = capsys.readouterr().out
    assert len(recorder.losses) == 8 and trainer.global_step == 8
    assert re.search(r"quality target reached: val_loss \d+\.\d+ <= 100.0 at step 8 "
                     r"\(64 samples\); stopping", out), out[-2000:]
    events = mllog_events(tmp_path / "llama31_debug" / "mlperf_llama31_405b.log")
    assert [e["key"] for e in events[-5:]] == ["eval_start", "eval_accuracy", "eval_stop",
                                               "run_stop", "train_samples"]
    assert events[-2]["metadata"]["status"] == "success" and events[-1]["value"] == 64


def test_8b_benchmark_debug_run_writes_mllog(c4_dir, tmp_path, capsys):
    """The 8B benchmark's debug size trains on the reference's en_6
    alone and writes its MLLOG file."""
    recipe = llama31_8b_mlperf.pretrain_recipe(
        size="debug", cpu=True, dir=str(tmp_path), c4_dir=str(c4_dir),
        tokenizer=f"sentencepiece:{c4_dir / 'spm.model'}", max_steps=8, seed=3)
    assert recipe.data.paths["train"] == ["10", str(c4_dir / c4.train_prefix(6))]
    recorder, _ = train(recipe)
    out = capsys.readouterr().out
    assert len(recorder.losses) == 8 and "hyperparameters: seed=3 " in out
    mllog = tmp_path / "llama31_mlperf_debug" / "mlperf_llama31_8b.log"
    events = {e["key"]: e for e in mllog_events(mllog)}
    assert events["submission_benchmark"]["value"] == "llama31_8b"
    assert events["eval_accuracy"]["metadata"]["samples_count"] == 64
    assert events["eval_accuracy"]["value"] == pytest.approx(recorder.val_losses[-1])
    # Beyond the debug size: sequence length, decay length, max_steps
    # (1.2M), evaluation size, and the target 3.3 unless reached.
    unmet = {"max_sequence_length", "opt_learning_rate_decay_steps", "max_steps",
             "eval_samples"} | ({"eval_accuracy"} if min(recorder.val_losses) > 3.3 else set())
    assert set(compliance_failures(mllog, "6.1.0")) == unmet


def test_validation_reads_documents_in_file_order(c4_dir):
    """The first evaluation sequence is the validation file's first
    tokens, and indices past one epoch wrap around."""
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from megatron.core.datasets.utils import Split
    from nemo.collections.common.tokenizers.sentencepiece_tokenizer import (
        SentencePieceTokenizer,
    )

    from coom_nemo.data import InOrderEvalDataset

    prefix = str(c4_dir / VALIDATION)
    indexed = IndexedDataset(prefix)
    config = GPTDatasetConfig(
        random_seed=5, sequence_length=32, blend=[[prefix], None], split="1,0,0",
        tokenizer=SentencePieceTokenizer(model_path=str(c4_dir / "spm.model")),
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False)
    documents = numpy.arange(len(indexed), dtype=numpy.int32)
    valid = InOrderEvalDataset(indexed, prefix, documents, 1000, Split.valid, config)
    stream = numpy.concatenate([indexed[i] for i in range(len(indexed))])
    epoch = (len(stream) - 1) // 32
    assert len(valid) == 1000 and epoch < 1000
    for i in (0, 1, epoch - 1):
        assert valid[i]["tokens"].tolist() == stream[32 * i:32 * i + 32].tolist()
    assert valid[epoch]["tokens"].tolist() == valid[0]["tokens"].tolist()
    shuffled = InOrderEvalDataset(indexed, prefix, documents, 100, Split.train, config)
    assert shuffled[0]["tokens"].tolist() != valid[0]["tokens"].tolist()


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    """A random Llama 3.1-shaped HF checkpoint, the debug size's shape,
    with a tokenizer (NeMo's importer reads one), saved locally."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=1024, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        rope_theta=500_000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    model = LlamaForCausalLM(config)
    model.save_pretrained(root)
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(synthetic_documents(50, seed=2),
                                  trainers.BpeTrainer(special_tokens=["<unk>", "<s>", "</s>"]))
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(root)
    return root, model


class FirstWeights(pl.Callback):
    """Copies the weights as training starts."""

    def on_train_start(self, trainer, pl_module):
        self.weights = {n: p.detach().clone() for n, p in pl_module.named_parameters()}


def test_starts_from_hf_weights(hf_llama, tmp_path):
    import nemo_run as run

    from coom_nemo.models.llama import import_hf_checkpoint

    hf_dir, hf_model = hf_llama
    checkpoint = import_hf_checkpoint(str(hf_dir), str(tmp_path / "nemo"))
    with pytest.raises(FileExistsError, match="output_path: .* already exists"):
        import_hf_checkpoint(str(hf_dir), str(checkpoint))

    # weights of another shape are refused before anything starts
    with pytest.raises(PlanError, match="restore_path: .* holds vocab_size=1024, the recipe "
                       "builds 512; choose the size and tokenizer"):
        llama31_405b.pretrain_recipe(size="debug", cpu=True, restore_path=str(checkpoint),
                                     tokenizer="null:512")

    recipe = llama31_405b.pretrain_recipe(size="debug", cpu=True, dir=str(tmp_path / "run"),
                                          restore_path=str(checkpoint), max_steps=2)
    recipe.trainer.callbacks.append(run.Config(FirstWeights))
    _, trainer = train(recipe)
    first = next(c for c in trainer.callbacks if isinstance(c, FirstWeights)).weights

    def ours(suffix):
        return next(w for name, w in first.items() if name.endswith(suffix))

    hf = dict(hf_model.named_parameters())
    assert torch.equal(ours("embedding.word_embeddings.weight"), hf["model.embed_tokens.weight"])
    assert torch.equal(ours("output_layer.weight"), hf["lm_head.weight"])
    assert torch.equal(ours("decoder.layers.1.mlp.linear_fc2.weight"),
                       hf["model.layers.1.mlp.down_proj.weight"])
    assert torch.equal(ours("decoder.final_layernorm.weight"), hf["model.norm.weight"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_trains_on_one_gpu(c4_dir, tmp_path, capsys):
    recipe = llama31_405b.pretrain_recipe(
        size="debug", gpus_per_node=1, dir=str(tmp_path), c4_dir=str(c4_dir),
        tokenizer=f"sentencepiece:{c4_dir / 'spm.model'}", max_steps=16, target_log_ppl=100.0)
    recorder, trainer = train(recipe)
    out = capsys.readouterr().out
    assert recorder.device.type == "cuda"
    assert len(recorder.losses) == 8 and falls(recorder.losses, margin=0.02), recorder.losses
    assert "quality target reached" in out
