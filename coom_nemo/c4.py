"""The C4 files MLPerf's Llama 3.1 405B benchmark trains and
validates on.

The split (the last 256 of the 1024 ``c4/en/3.0.1`` train shards; the
first 91205 documents of the unshuffled validation set) is made by
``python -m data_prep.c4`` (its constants: ``data_prep/c4.py``). A
``c4_dir`` holds the indexed datasets in one of two layouts:

- data_prep's: ``train`` and ``validation`` (``.bin``/``.idx``);
- the reference's (its utils/preprocess.sh, and MLCommons' preprocessed
  download): ``c4-train.en_6_text_document`` and
  ``c4-train.en_7_text_document`` (shards 768-895 and 896-1023, read
  with equal weights) and
  ``c4-validation-91205-samples.en_text_document``.
"""

from __future__ import annotations

from pathlib import Path

LAYOUTS = {
    "data_prep": {"train": ["train"], "validation": ["validation"]},
    "reference": {"train": ["50", "c4-train.en_6_text_document",
                            "50", "c4-train.en_7_text_document"],
                  "validation": ["c4-validation-91205-samples.en_text_document"]},
}


def _files(layout: dict) -> list[str]:
    prefixes = [p for group in layout.values() for p in group if not p.isdigit()]
    return [p + suffix for p in prefixes for suffix in (".bin", ".idx")]


def mlperf_paths(directory: str) -> dict[str, list[str]]:
    """``PreTrainingDataModule`` paths of the layout in
    ``directory``."""
    for name, layout in LAYOUTS.items():
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
    raise FileNotFoundError(
        f"c4_dir: {directory} holds no C4 indexed files; build them with "
        "python -m data_prep.c4 or point c4_dir at MLPerf's preprocessed C4")
