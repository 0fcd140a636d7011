"""Data modules: mock tokens and Megatron indexed datasets."""

from __future__ import annotations

from pathlib import Path

import nemo_run as run
import numpy
from megatron.core.datasets.gpt_dataset import GPTDataset
from megatron.core.datasets.utils import Split
from nemo.collections import llm
from nemo.collections.llm.gpt.data.mock import _MockGPTDataset


class _RepeatingMockDataset(_MockGPTDataset):
    """Mock samples that repeat every ``period`` indices (learnable)."""

    def __init__(self, *args, period: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.period = period

    def __getitem__(self, idx):
        return super().__getitem__(idx % self.period)


class MockData(llm.MockDataModule):
    """``llm.MockDataModule`` that yields a mask where attention needs
    one.

    NeMo 2.7.3's ``MockDataModule.setup`` passes
    ``create_attention_mask``
    (set when TransformerEngine is absent) positionally into ``seed``,
    so
    no mask is made and ``gpt_forward_step`` asserts; here it goes by
    keyword.

    Args:
        repeat_every: If set, sample ``i`` equals sample ``i %
        repeat_every``:
            a loss that can fall well below ``ln(vocab)``, for smoke
            tests.
    """

    def __init__(self, *args, repeat_every: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.repeat_every = repeat_every

    def setup(self, stage: str = "") -> None:
        def dataset(name: str, samples: int):
            kwargs = dict(create_attention_mask=self.create_attention_mask)
            if self.repeat_every:
                return _RepeatingMockDataset(self.tokenizer, name, samples, self.seq_length,
                                             period=self.repeat_every, **kwargs)
            return _MockGPTDataset(self.tokenizer, name, samples, self.seq_length, **kwargs)

        self._train_ds = dataset("train", self.num_train_samples)
        self._validation_ds = dataset("valid", self.num_val_samples)
        self._test_ds = dataset("test", self.num_test_samples)

    # NeMo 2.7.3's MockDataModule keeps no data position in checkpoints,
    # so a resumed run read its samples from the first one again; these
    # do as PreTrainingDataModule does (pre_training.py:388,421).
    def train_dataloader(self):
        self.data_sampler.init_global_step = self.trainer.global_step
        return super().train_dataloader()

    # Evaluation reads from its first sample, not from the training
    # position: NeMo's sampler tells them apart by this attribute
    # (data_sampler.py:95), which only WrappedDataLoader has.
    def val_dataloader(self):
        return _with_mode(super().val_dataloader(), "validation")

    def test_dataloader(self):
        return _with_mode(super().test_dataloader(), "test")

    def state_dict(self) -> dict:
        steps = self.trainer.global_step - self.data_sampler.init_global_step
        return {"consumed_samples": self.data_sampler.compute_consumed_samples(steps)}

    def load_state_dict(self, state_dict: dict) -> None:
        consumed = state_dict["consumed_samples"]
        self.data_sampler.init_consumed_samples = consumed
        self.data_sampler.prev_consumed_samples = consumed
        self.data_sampler.if_first_step = 1


def _with_mode(loader, mode: str):
    loader.mode = mode
    return loader


class InOrderEvalDataset(GPTDataset):
    """GPTDataset whose validation and test splits keep file order.

    MLPerf's Llama 3.1 reference patches megatron-core (mcore.patch) so
    evaluation reads the validation documents unshuffled: every
    evaluation starts at sample 0 and covers the first sequences of
    the file. Here an evaluation split is one epoch, in order; indices
    past it wrap around to its start (as many as the data module asks
    for, without building an index for each epoch).
    """

    def __init__(self, indexed_dataset, dataset_path, indexed_indices, num_samples,
                 index_split, config):
        self.in_order = index_split != Split.train
        self.requested = num_samples if self.in_order else None
        super().__init__(indexed_dataset, dataset_path, indexed_indices,
                         None if self.in_order else num_samples, index_split, config)

    def _build_document_sample_shuffle_indices(self):
        if not self.in_order:
            return super()._build_document_sample_shuffle_indices()
        from megatron.core.datasets import helpers

        documents = self.indices.astype(numpy.int32)
        drop_last = (self.index_split != Split.valid
                     or self.config.drop_last_partial_validation_sequence)
        samples = helpers.build_sample_idx(
            self.dataset.sequence_lengths, documents, self.config.sequence_length, 1,
            self._get_num_tokens_per_epoch(), drop_last, self.config.add_extra_token_to_sequence)
        return documents, samples, numpy.arange(len(samples) - 1, dtype=numpy.int64)

    def __len__(self) -> int:
        return self.requested or super().__len__()

    def __getitem__(self, idx):
        if self.in_order and idx is not None:
            idx %= super().__len__()
        return super().__getitem__(idx)


def mock_data(tokenizer: run.Config, seq_length: int, global_batch_size: int,
              micro_batch_size: int, *, num_train_samples: int = 10_000_000,
              repeat_every: int | None = None, cpu: bool = False) -> run.Config[MockData]:
    return run.Config(
        MockData,
        seq_length=seq_length,
        tokenizer=tokenizer,
        global_batch_size=global_batch_size,
        micro_batch_size=micro_batch_size,
        num_train_samples=num_train_samples,
        num_val_samples=max(global_batch_size * 4, 64),
        num_test_samples=max(global_batch_size * 4, 64),
        repeat_every=repeat_every,
        num_workers=0 if cpu else 4,
        pin_memory=not cpu,
    )


def check_prefixes(prefixes, field: str) -> None:
    """Each Megatron dataset prefix must have its ``.bin`` and a
    ``.idx`` that describes it (:func:`check_indexed`)."""
    for prefix in prefixes:
        missing = [s for s in (".bin", ".idx") if not Path(f"{prefix}{s}").is_file()]
        if missing:
            raise FileNotFoundError(
                f"{field}: {prefix}{missing[0]} does not exist; run data_prep to build "
                "the indexed dataset or fix the path (give the prefix without .bin/.idx)"
            )
        check_indexed(prefix, field)


# megatron/core/datasets/indexed_dataset.py: _INDEX_HEADER and DType
_INDEX_HEADER = b"MMIDIDX\x00\x00"
_DTYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 8, 7: 4, 8: 2}


def check_indexed(prefix, field: str) -> None:
    """Refuse a ``.bin`` that its ``.idx`` does not describe (a copy
    cut short, a file of another dataset), naming the file, before a
    run starts: megatron-core reads past the end in the first step.

    Reads the index header and its last entries only (indexed_dataset.py
    _IndexReader: header, version, dtype code, sequence and document
    counts, int32 lengths, int64 byte pointers, int64 document starts).
    """
    import struct

    idx, bin_ = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    fix = "rebuild it with data_prep, or copy it again"

    def refuse(problem: str):
        raise ValueError(f"{field}: {problem}; {fix}")

    with open(idx, "rb") as stream:
        head = stream.read(34)
        if len(head) < 34 or head[:9] != _INDEX_HEADER:
            refuse(f"{idx} is not a Megatron index (no MMIDIDX header)")
        code = head[17]
        sequences, documents = struct.unpack("<QQ", head[18:34])
        if code not in _DTYPE_SIZES:
            refuse(f"{idx} names token dtype code {code}, not one of megatron-core's")
        need = 34 + sequences * 12 + documents * 8
        if idx.stat().st_size < need:
            refuse(f"{idx} is {idx.stat().st_size} bytes, its header ({sequences} sequences, "
                   f"{documents} documents) needs {need}")
        if not sequences:
            refuse(f"{idx} indexes no sequences")
        stream.seek(34 + (sequences - 1) * 4)
        (length,) = struct.unpack("<i", stream.read(4))
        stream.seek(34 + sequences * 4 + (sequences - 1) * 8)
        (pointer,) = struct.unpack("<q", stream.read(8))
        stream.seek(34 + sequences * 12)
        first = struct.unpack("<q", stream.read(8))[0]
        stream.seek(34 + sequences * 12 + (documents - 1) * 8)
        last = struct.unpack("<q", stream.read(8))[0]
    if first != 0 or last != sequences:
        refuse(f"{idx}: its document starts run from {first} to {last}, not from 0 to its "
               f"{sequences} sequences")
    expected = pointer + length * _DTYPE_SIZES[code]
    if bin_.stat().st_size != expected:
        refuse(f"{bin_} is {bin_.stat().st_size} bytes, but {idx.name} indexes {expected} "
               f"({sequences} sequences of {_DTYPE_SIZES[code]}-byte tokens)")


def indexed_data(paths, tokenizer: run.Config, seq_length: int, global_batch_size: int,
                 micro_batch_size: int, *, split: str = "990,8,2", seed: int = 1234,
                 cpu: bool = False, **kwargs) -> run.Config[llm.PreTrainingDataModule]:
    """Megatron indexed datasets (``.bin``/``.idx`` from data_prep).

    ``paths`` is a list of prefixes (split by ``split``) or a dict with
    ``train``/``validation``/``test`` lists, as
    ``PreTrainingDataModule``
    takes them; a missing ``test`` reuses ``validation`` (NeMo needs
    all three).
    """
    if isinstance(paths, dict) and "test" not in paths:
        paths = {**paths, "test": paths.get("validation", [])}
    groups = paths.values() if isinstance(paths, dict) else [paths]
    for group in groups:
        check_prefixes([p for p in group if not _is_weight(p)], "data.paths")
    return run.Config(
        llm.PreTrainingDataModule,
        paths=paths,
        seq_length=seq_length,
        tokenizer=tokenizer,
        global_batch_size=global_batch_size,
        micro_batch_size=micro_batch_size,
        split=None if isinstance(paths, dict) else split,
        seed=seed,
        num_workers=0 if cpu else 2,
        pin_memory=not cpu,
        **kwargs,
    )


def _is_weight(item) -> bool:
    try:
        float(item)
    except (TypeError, ValueError):
        return False
    return True


def sft_data(data_dir, seq_length: int, global_batch_size: int, micro_batch_size: int, *,
             cpu: bool = False) -> run.Config[llm.FineTuningDataModule]:
    """Fine-tuning data from local JSONL files.

    ``data_dir`` holds ``training.jsonl`` and ``validation.jsonl``, one
    record a line, either instructions, ``{"input": ..., "output":
    ...}`` (the loss counts the output), or chats, ``{"messages":
    [{"role": ..., "content": ...}, ...]}`` (rendered by the
    tokenizer's chat template; the loss counts the assistant turns).
    The first record decides which. The tokenizer is the model's.
    """
    import json

    root = Path(data_dir)
    for name in ("training.jsonl", "validation.jsonl"):
        if not (root / name).is_file():
            raise FileNotFoundError(f"data_dir: {root / name} does not exist; put "
                                    "training.jsonl and validation.jsonl there")
    with open(root / "training.jsonl") as lines:
        chat = "messages" in json.loads(lines.readline())
    extra = dict(use_hf_tokenizer_chat_template=True) if chat else {}
    return run.Config(
        llm.ChatDataModule if chat else llm.FineTuningDataModule,
        dataset_root=str(root),
        seq_length=seq_length,
        global_batch_size=global_batch_size,
        micro_batch_size=micro_batch_size,
        num_workers=0 if cpu else 2,
        pin_memory=not cpu,
        **extra,
    )
