"""``python -m data_prep.c4 --layout reference`` writes MLPerf's token
stream: on a small C4-format sample and a byte-level BPE tokenizer made
here, its files are byte-identical to those of the reference's own
steps, written out below from mlcommons/training
``small_llm_pretraining/nemo/utils`` (the 405B benchmark's are the
same):

- consolidate_data.sh: ``cat`` the gzip shards ``128k`` to
  ``128k + 127`` into ``c4-train.en_<k>.json.gz``; ``zcat`` the 8
  validation shards, keep the first N lines, ``gzip``;
- preprocess.sh: NeMo's preprocess_data_for_megatron.py with
  ``--tokenizer-library huggingface --tokenizer-type <dir>`` and no
  ``--append-eod``: NeMo's HF tokenizer's ``text_to_ids`` of each JSON
  line's ``text``, documents of no tokens left out, ``uint16`` for a
  vocabulary under 65500 tokens, else ``int32``.
"""

import gzip
import json
import random

import numpy
import pytest
import torch

from data_prep import c4 as c4_prep

SPECIAL = ["", "   ", "Ünïcödé façade — naïve café\n\n\tTabs and  double  spaces.",
           "数据 and 日本語のテキスト 🙂🚀", "line one\nline two\r\nline three", " leading space",
           "trailing space ", "x" * 3000, "Numbers 3.14159, 2026-11-29, $1,234.56 and #tags."]


def documents(rng: random.Random, count: int) -> list[str]:
    words = ["the", "model", "trains", "on", "Common", "Crawl", "text", "and", "it's",
             "validation", "loss", "falls", "quickly", "(slowly)", "tokens", "per", "second"]
    docs = []
    for _ in range(count):
        if rng.random() < 0.15:
            docs.append(rng.choice(SPECIAL))
        else:
            docs.append(" ".join(rng.choices(words, k=rng.randint(3, 60))) + ".")
    return docs


def write_shard(path, docs) -> None:
    lines = [json.dumps({"text": d, "timestamp": "2019-04-25T12:57:54Z",
                         "url": "https://example.com/"}) for d in docs]
    path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """C4's file names with a few documents each: the 256 train shards
    the reference reads (768-1023) and the 8 validation shards."""
    root = tmp_path_factory.mktemp("c4") / "en"
    root.mkdir()
    rng = random.Random(0)
    for shard in range(768, 1024):
        docs = documents(rng, rng.randint(1, 4))
        write_shard(root / f"c4-train.{shard:05d}-of-01024.json.gz",
                    docs + [""] if shard == 800 else docs)
    for shard in range(8):
        docs = documents(rng, 12)
        write_shard(root / f"c4-validation.{shard:05d}-of-00008.json.gz",
                    docs[:3] + [""] + docs[3:] if shard == 0 else docs)
    return root


def make_tokenizer(directory, extra_tokens: int) -> None:
    """A byte-level BPE tokenizer in HF's format, trained on the
    sample's kind of text; ``extra_tokens`` added tokens push the
    vocabulary past 65500 (the int32 files of Llama 3.1's 128256)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(documents(random.Random(1), 300) + SPECIAL, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>")
    if extra_tokens:
        fast.add_tokens([f"<extra_{i}>" for i in range(extra_tokens)])
    fast.save_pretrained(directory)


def reference_consolidate(c4_dir, merged, validation_docs: int) -> None:
    for part in (6, 7):
        with open(merged / f"c4-train.en_{part}.json.gz", "wb") as out:
            for shard in range(128 * part, 128 * part + 128):
                out.write((c4_dir / f"c4-train.{shard:05d}-of-01024.json.gz").read_bytes())
    text = b"".join(gzip.decompress((c4_dir / f"c4-validation.{s:05d}-of-00008.json.gz")
                                    .read_bytes()) for s in range(8))
    head = b"".join(text.splitlines(keepends=True)[:validation_docs])
    name = f"c4-validation-{validation_docs}-samples.en.json.gz"
    (merged / name).write_bytes(gzip.compress(head))


def reference_preprocess(json_gz, output_prefix, tokenizer_dir) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    from nemo.collections.common.tokenizers.tokenizer_utils import get_nmt_tokenizer

    tokenizer = get_nmt_tokenizer(library="huggingface", model_name=str(tokenizer_dir))
    dtype = numpy.uint16 if tokenizer.vocab_size < 65500 else numpy.int32
    builder = IndexedDatasetBuilder(f"{output_prefix}_text_document.bin", dtype=dtype)
    with gzip.open(json_gz, "r") as lines:
        for line in lines:
            ids = tokenizer.text_to_ids(json.loads(line)["text"])
            if ids:
                builder.add_item(torch.IntTensor(ids))
                builder.end_document()
    builder.finalize(f"{output_prefix}_text_document.idx")


# The int32 case (Llama 3.1's tokenizer) takes the validation split
# only: the train parts go through the same code.
@pytest.mark.parametrize("extra_tokens, dtype, splits", [
    (0, numpy.uint16, ["train", "validation"]), (70_000, numpy.int32, ["validation"])])
def test_reference_layout_is_the_reference_token_stream(sample, tmp_path, extra_tokens, dtype,
                                                        splits):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tokenizer = tmp_path / "tokenizer"
    make_tokenizer(tokenizer, extra_tokens)
    validation_docs = 50
    merged, reference, ours = (tmp_path / name for name in ("merged", "reference", "ours"))
    merged.mkdir()
    reference.mkdir()
    reference_consolidate(sample, merged, validation_docs)
    names = [f"c4-validation-{validation_docs}-samples.en"]
    if "train" in splits:
        names += ["c4-train.en_6", "c4-train.en_7"]
    for name in names:
        reference_preprocess(merged / f"{name}.json.gz", reference / name, tokenizer)

    code = c4_prep.main(["--c4-dir", str(sample), "--output", str(ours), "--layout",
                         "reference", "--tokenizer", f"hf:{tokenizer}", "--validation-docs",
                         str(validation_docs), "--workers", "2", "--no-progress",
                         "--split", *splits])
    assert code == 0
    written = sorted(p.name for p in ours.iterdir() if p.suffix in (".bin", ".idx"))
    assert written == sorted(p.name for p in reference.iterdir())
    for name in written:
        assert (ours / name).read_bytes() == (reference / name).read_bytes(), name

    # the comparison has teeth: documents with no tokens were left out,
    # no EOD is there, the dtype is the vocabulary's
    validation = IndexedDataset(str(ours / f"c4-validation-{validation_docs}-samples.en"
                                       "_text_document"))
    assert validation[0].dtype == dtype
    assert 0 < len(validation) < validation_docs  # "" is among the first 50
    eos = json.loads((tokenizer / "tokenizer.json").read_text())["model"]["vocab"]["</s>"]
    assert all(validation[i][-1] != eos for i in range(len(validation)))
