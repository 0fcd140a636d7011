"""Convert a local HF Llama 3.1 checkpoint (e.g. the bf16
meta-llama/Llama-3.1-405B) to the NeMo checkpoint that
``recipes/llama31_405b.py --restore-path`` starts from, as the MLPerf
reference's utils/nemo_convert.py does; the same as
``recipes/llama31_hf.py import``.

Usage: python recipes/llama31_import_hf.py HF_DIR OUTPUT_DIR
Nothing is downloaded; OUTPUT_DIR must not exist yet.
"""

import sys
from pathlib import Path

if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sys.path.insert(0, str(Path(__file__).parent))
    from llama31_hf import main

    sys.exit(main(["import", *sys.argv[1:]]))
