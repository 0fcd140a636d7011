"""TinyStories, text or parquet form, to Megatron indexed datasets.

    python -m data_prep.tinystories --input /data/TinyStories \\
        --tokenizer sentencepiece:/data/spm.model --output /data/ts

finds the train and validation files under ``--input``

- text form: ``*train*.txt`` and ``*valid*.txt``
  (``TinyStoriesV2-GPT4-train.txt``, ``TinyStories-valid.txt``)
- parquet form: ``**/train-*.parquet`` and ``**/validation-*.parquet``
  (the ``data/`` folder of the hub's copy)

and writes the prefixes ``<output>/train`` and ``<output>/validation``
the recipes take: ``--data <output>/train`` or ``data_paths={"train":
["<output>/train"], "validation": ["<output>/validation"]}``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from data_prep import prepare

FORMS = {"text": ("*train*.txt", "*valid*.txt"),
         "parquet": ("**/train-*.parquet", "**/validation-*.parquet")}


def find(directory, form: str = "auto") -> dict[str, list[Path]]:
    """``{"train": [...], "validation": [...]}`` files of one form."""
    for name in ("text", "parquet") if form == "auto" else (form,):
        train, validation = (sorted(Path(directory).glob(glob)) for glob in FORMS[name])
        if train:
            return {"train": train, "validation": validation}
    globs = " or ".join(FORMS["text"][:1] + FORMS["parquet"][:1])
    raise FileNotFoundError(f"input: no TinyStories train files ({globs}) in {directory}")


def main(argv=None) -> int:
    p = prepare.command_line(__doc__, "tinystories")
    p.add_argument("--input", required=True, help="directory holding TinyStories")
    p.add_argument("--form", choices=("auto", "text", "parquet"), default="auto",
                   help="which form to read where both are there (default auto: text)")
    p.add_argument("--output", required=True, help="directory for train and validation")
    prepare.add_arguments(p)
    args = p.parse_args(argv)
    try:
        splits = find(args.input, args.form)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    jobs = [(files, str(Path(args.output) / split), None)
            for split, files in splits.items() if files]
    return prepare.run(args, jobs)


if __name__ == "__main__":
    sys.exit(main())
