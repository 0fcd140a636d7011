"""TinyStories-format text as a Megatron indexed dataset, made here.

TinyStories (Eldan and Li, 2023) is one short story per JSONL record,
``{"text": "Once upon a time ..."}``. The stories below are generated
from templates; a SentencePiece model is trained on them offline and
megatron-core's IndexedDatasetBuilder writes ``.bin``/``.idx``, one
document per story, ending in end-of-document as data_prep does.
"""

import itertools
import json
from pathlib import Path

import numpy as np
import torch

NAMES = ["Lily", "Tom", "Max", "Mia", "Ben", "Sue"]
THINGS = ["a red ball", "a small cat", "a big tree", "a blue kite", "a shiny stone"]
PLACES = ["the park", "the garden", "the beach", "the forest"]
FRIENDS = ["mom", "dad", "a friend", "the dog", "grandma", "a bird", "the teacher",
           "a little bear", "the baker"]


def stories():
    """1080 stories: enough documents that the 990/8/2 split leaves
    the test split some (megatron-core loops forever on none)."""
    for name, thing, place, friend in itertools.product(NAMES, THINGS, PLACES, FRIENDS):
        yield (f"Once upon a time, {name} went to {place}. {name} found {thing}. "
               f"{name} was very happy and showed {thing} to {friend}. The end.")


def make_indexed_tinystories(directory: Path):
    """Write ``stories.jsonl``, ``spm.model`` and the ``stories``
    ``.bin``/``.idx``; return (dataset prefix, tokenizer model)."""
    import sentencepiece as spm
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    directory = Path(directory)
    texts = list(stories())
    with open(directory / "stories.jsonl", "w") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=str(directory / "spm"), vocab_size=256,
        model_type="bpe", eos_id=1, bos_id=-1, pad_id=-1, unk_id=0, minloglevel=2)
    tokenizer = spm.SentencePieceProcessor(model_file=str(directory / "spm.model"))
    prefix = directory / "stories"
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.int32)
    for text in texts:
        ids = tokenizer.encode(text) + [tokenizer.eos_id()]
        builder.add_item(torch.tensor(ids))
        builder.end_document()
    builder.finalize(f"{prefix}.idx")
    return str(prefix), str(directory / "spm.model")
