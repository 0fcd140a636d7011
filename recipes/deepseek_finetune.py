"""Fine-tune an imported DeepSeek-V3 on local JSONL; see ``--help``.

  python recipes/deepseek_finetune.py --method lora --size v3 \
      --restore-path /ckpt/dsv3 --data-dir /data/chat
"""

import argparse
import sys

if __name__ == "__main__":
    # Imported here, not at the top: checkpoint writers start processes
    # that re-import this file, and they need none of it.
    choice = argparse.ArgumentParser(add_help=False)
    choice.add_argument("--method", choices=("lora", "sft"), default="lora",
                        help="LoRA adapters or full SFT")
    choice.add_argument("--size", default="16b", help="16b, v3 or debug")
    known, rest = choice.parse_known_args()
    from coom_nemo.launch import main
    from coom_nemo.recipes import FINETUNE_FACTORIES

    scale = "v3" if known.size == "v3" else "16b"
    factory = FINETUNE_FACTORIES[f"coom_deepseek_{scale}_{known.method}"]
    sys.exit(main(factory, default_size=known.size, argv=rest))
