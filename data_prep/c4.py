"""C4 ``c4/en/3.0.1`` to Megatron indexed datasets, split as MLPerf.

MLPerf Training's Llama 3.1 405B benchmark trains on the last 256 of
the 1024 train shards (``c4-train.00768-of-01024.json.gz`` to
``01023``) and validates on the first 91205 documents of the unshuffled
validation set (``c4-validation.00000-of-00008.json.gz`` onwards).

    python -m data_prep.c4 --c4-dir /data/c4/en \\
        --tokenizer hf:/data/mixtral-tokenizer --output /data/c4

writes the prefixes ``<output>/train`` and ``<output>/validation`` for
``data_paths={"train": ["/data/c4/train"], "validation":
["/data/c4/validation"]}``, each document ending in an EOD token.

``--layout reference`` writes the reference's token stream instead
(mlcommons/training utils/consolidate_data.sh and preprocess.sh, both
benchmarks): no EOD token, train part ``en_<k>`` made of shards
``128k`` to ``128k + 127`` (``--parts``, default 6 and 7, which the
405B benchmark reads 50/50; the 8B one reads 6 alone) and the first
91205 validation documents, named as the reference names them
(``c4-train.en_6_text_document``, ...) so a recipe's ``c4_dir`` reads
them. Each shard is one piece: a rerun after an interruption redoes
only the shards not finished.
"""

from __future__ import annotations

import sys
from pathlib import Path

from data_prep import prepare

REFERENCE_TRAIN = "c4-train.en_{}_text_document"  # coom_nemo/c4.py
REFERENCE_VALIDATION = "c4-validation-{}-samples.en_text_document"

TRAIN_SHARDS = 1024
VALIDATION_SHARDS = 8
MLPERF_TRAIN_SHARDS = range(768, 1024)  # the last 256 of 1024
MLPERF_VALIDATION_DOCS = 91205


def train_file(c4_dir, shard: int) -> Path:
    return Path(c4_dir) / f"c4-train.{shard:05d}-of-{TRAIN_SHARDS:05d}.json.gz"


def validation_file(c4_dir, shard: int) -> Path:
    return Path(c4_dir) / f"c4-validation.{shard:05d}-of-{VALIDATION_SHARDS:05d}.json.gz"


def train_files(c4_dir, shards=MLPERF_TRAIN_SHARDS) -> list[Path]:
    """The train shards, in order; all of them must be there."""
    files = [train_file(c4_dir, shard) for shard in shards]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(
            f"c4-dir: {len(missing)} of the {len(files)} train shards are missing, the first "
            f"{missing[0]}; download them (c4/en/3.0.1) or choose --train-shards")
    return files


def validation_files(c4_dir) -> list[Path]:
    """The validation shards present from ``00000`` on, in order (the
    first 91205 documents need only the first three)."""
    files = []
    for shard in range(VALIDATION_SHARDS):
        if not validation_file(c4_dir, shard).is_file():
            break
        files.append(validation_file(c4_dir, shard))
    if not files:
        raise FileNotFoundError(f"c4-dir: no {validation_file(c4_dir, 0)}")
    return files


def part_shards(part: int) -> range:
    """The shards of the reference's train part ``en_<part>``
    (consolidate_data.sh: ``part * 128`` to ``part * 128 + 127``)."""
    return range(part * 128, part * 128 + 128)


def _shards(text: str) -> range:
    start, _, stop = text.partition(":")
    return range(int(start), int(stop))


def main(argv=None) -> int:
    p = prepare.command_line(__doc__, "c4")
    p.add_argument("--c4-dir", required=True, help="directory of the en json.gz shards")
    p.add_argument("--output", required=True, help="directory for train and validation")
    p.add_argument("--layout", choices=("data_prep", "reference"), default="data_prep",
                   help="reference: MLPerf's file names and token stream (no EOD)")
    p.add_argument("--split", nargs="+", choices=("train", "validation"),
                   default=["train", "validation"])
    p.add_argument("--train-shards", type=_shards, default=MLPERF_TRAIN_SHARDS,
                   help="START:STOP of the 1024 train shards (default MLPerf's 768:1024)")
    p.add_argument("--parts", type=int, nargs="+", default=[6, 7],
                   help="--layout reference: train parts en_<k> (default 6 7)")
    p.add_argument("--validation-docs", type=int, default=MLPERF_VALIDATION_DOCS,
                   help="first N validation documents (default MLPerf's 91205)")
    prepare.add_arguments(p)
    args = p.parse_args(argv)
    reference = args.layout == "reference"
    if reference:
        args.append_eod = False  # the reference's preprocess.sh appends none
    out = Path(args.output)
    jobs = []
    try:
        if "train" in args.split and reference:
            jobs += [(train_files(args.c4_dir, part_shards(part)),
                      str(out / REFERENCE_TRAIN.format(part)), None) for part in args.parts]
        elif "train" in args.split:
            jobs.append((train_files(args.c4_dir, args.train_shards), str(out / "train"), None))
        if "validation" in args.split:
            name = REFERENCE_VALIDATION.format(args.validation_docs) if reference else "validation"
            jobs.append((validation_files(args.c4_dir), str(out / name), args.validation_docs))
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return prepare.run(args, jobs)


if __name__ == "__main__":
    sys.exit(main())
