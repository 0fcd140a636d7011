"""Convert a local HF Llama 3.1 checkpoint (e.g. the bf16
meta-llama/Llama-3.1-405B) to the NeMo checkpoint that
``recipes/llama31_405b.py --restore-path`` starts from, as the MLPerf
reference's utils/nemo_convert.py does.

Usage: python recipes/llama31_import_hf.py HF_DIR OUTPUT_DIR
Nothing is downloaded; OUTPUT_DIR must not exist yet.
"""

import sys

if __name__ == "__main__":
    # Imported here, not at the top: checkpoint writers start processes
    # that re-import this file, and they need none of it.
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    from coom_nemo.models.llama import import_hf_checkpoint

    print(import_hf_checkpoint(sys.argv[1], sys.argv[2]))
