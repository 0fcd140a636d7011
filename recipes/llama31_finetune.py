"""Fine-tune an imported Llama 3.1 on local JSONL; see ``--help``.

``--method lora`` (default) or ``sft``; ``--restore-path`` is the
import's output, ``--data-dir`` holds training.jsonl and
validation.jsonl. The factories behind it are
``coom_llama31_<size>_<method>``.
"""

import argparse
import sys

if __name__ == "__main__":
    # Imported here, not at the top: checkpoint writers start processes
    # that re-import this file, and they need none of it.
    method = argparse.ArgumentParser(add_help=False)
    method.add_argument("--method", choices=("lora", "sft"), default="lora",
                        help="LoRA adapters or full SFT")
    known, rest = method.parse_known_args()
    from coom_nemo.launch import main
    from coom_nemo.recipes.llama31_finetune import FACTORIES

    sys.exit(main(FACTORIES[f"coom_llama31_8b_{known.method}"], default_size="8b", argv=rest))
