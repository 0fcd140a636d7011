"""Llama 3.1 checkpoints between Hugging Face and NeMo.

  python recipes/llama31_hf.py import HF_DIR OUT
  python recipes/llama31_hf.py export CHECKPOINT OUT
  python recipes/llama31_hf.py export-lora CHECKPOINT OUT [--base HF]

``import`` reads a local HF ``LlamaForCausalLM`` directory into a NeMo
checkpoint for the fine-tuning and pretraining recipes; ``export``
writes a NeMo checkpoint (e.g. an SFT run's ``*-last``) as a HF
directory; ``export-lora`` writes a LoRA run's adapters in the PEFT
format (``--base`` is recorded as the base model). OUT must not exist
yet.
"""

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("direction", choices=("import", "export", "export-lora"))
    parser.add_argument("source", help="HF directory (import) or NeMo checkpoint (export)")
    parser.add_argument("output", help="new directory to write")
    parser.add_argument("--base", help="export-lora: the HF base model's directory or name")
    args = parser.parse_args(argv)

    from coom_nemo.models.llama_hf import export_to_hf, import_from_hf
    from coom_nemo.peft_export import export_lora

    try:
        if args.direction == "import":
            written = import_from_hf(args.source, args.output)
        elif args.direction == "export":
            written = export_to_hf(args.source, args.output)
        else:
            written = export_lora(args.source, args.output, base_model=args.base)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    # Heavy imports stay inside main: checkpoint writers start processes
    # that re-import this file.
    sys.exit(main())
