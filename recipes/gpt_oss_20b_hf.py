"""GPT-OSS checkpoints between Hugging Face and NeMo.

  python recipes/gpt_oss_20b_hf.py import HF_DIR OUT [--gated]
  python recipes/gpt_oss_20b_hf.py export NEMO_CHECKPOINT OUT

``import`` reads a local HF directory (bf16 or MXFP4 safetensors) into a
NeMo checkpoint for the fine-tuning recipes (``--gated``: the
gated-attention variant, computing the same function); ``export``
writes a trained non-gated checkpoint as a HF directory. OUT must not
exist yet.
"""

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("direction", choices=("import", "export"))
    parser.add_argument("source", help="HF directory (import) or NeMo checkpoint (export)")
    parser.add_argument("output", help="new directory to write")
    parser.add_argument("--gated", action="store_true", help="import with gated attention")
    args = parser.parse_args(argv)

    from coom_nemo.models.gpt_oss_hf import export_to_hf, import_from_hf

    try:
        if args.direction == "import":
            written = import_from_hf(args.source, args.output, attention_gate=args.gated)
        else:
            written = export_to_hf(args.source, args.output)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    # Heavy imports stay inside main: checkpoint writers start processes
    # that re-import this file.
    sys.exit(main())
