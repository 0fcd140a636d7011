"""The C4 files MLPerf's Llama 3.1 benchmarks train and validate on.

The split (the last 256 of the 1024 ``c4/en/3.0.1`` train shards; the
first 91205 documents of the unshuffled validation set) is made by
``python -m data_prep.c4`` (its constants: ``data_prep/c4.py``). A
``c4_dir`` holds the indexed datasets in one of these layouts:

- data_prep's default: ``train`` and ``validation`` (``.bin``/``.idx``),
  shards 768-1023 in one file (405B only);
- the reference's (mlcommons/training utils/consolidate_data.sh and
  preprocess.sh, MLCommons' preprocessed download, and
  ``python -m data_prep.c4 --layout reference``):
  ``c4-train.en_6_text_document`` and ``c4-train.en_7_text_document``
  (shards 768-895 and 896-1023) and
  ``c4-validation-91205-samples.en_text_document``. The 405B benchmark
  reads en_6 and en_7 with equal weights (its pretrain_llama31.py
  ``get_data``), the 8B one en_6 alone (small_llm_pretraining's
  ``get_data`` without ``use_full_dataset``).
"""

from __future__ import annotations

from pathlib import Path

VALIDATION = "c4-validation-91205-samples.en_text_document"


def train_prefix(part: int) -> str:
    """The reference's name for train part ``part`` (shards
    ``128 part`` to ``128 part + 127``)."""
    return f"c4-train.en_{part}_text_document"


LAYOUTS = {
    "data_prep": {"train": ["train"], "validation": ["validation"]},
    "reference": {"train": ["50", train_prefix(6), "50", train_prefix(7)],
                  "validation": [VALIDATION]},
    "reference_8b": {"train": ["10", train_prefix(6)], "validation": [VALIDATION]},
}


def _files(layout: dict) -> list[str]:
    prefixes = [p for group in layout.values() for p in group if not p.isdigit()]
    return [p + suffix for p in prefixes for suffix in (".bin", ".idx")]


def mlperf_paths(directory: str, layouts=("data_prep", "reference")) -> dict[str, list[str]]:
    """``PreTrainingDataModule`` paths of the first of ``layouts``
    (names in :data:`LAYOUTS`) found in ``directory``."""
    for name in layouts:
        layout = LAYOUTS[name]
        if not any(Path(directory, f).is_file() for f in _files(layout)):
            continue
        missing = [f for f in _files(layout) if not Path(directory, f).is_file()]
        if missing:
            raise FileNotFoundError(
                f"c4_dir: {directory} lacks {', '.join(missing)} of the {name} layout "
                "(coom_nemo/c4.py); rerun data_prep or fix the directory")
        paths = {split: [p if p.isdigit() else str(Path(directory, p)) for p in group]
                 for split, group in layout.items()}
        return {**paths, "test": paths["validation"]}
    layout = "" if "data_prep" in layouts else " --layout reference"
    raise FileNotFoundError(
        f"c4_dir: {directory} holds no C4 indexed files; build them with "
        f"python -m data_prep.c4{layout} or point c4_dir at MLPerf's preprocessed C4")
