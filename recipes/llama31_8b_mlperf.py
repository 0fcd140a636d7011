"""Launch the llama31_8b_mlperf recipe; see ``--help``."""

import sys

if __name__ == "__main__":
    # Imported here, not at the top: checkpoint writers start processes
    # that re-import this file, and they need none of it.
    from coom_nemo.launch import main
    from coom_nemo.recipes.llama31_8b_mlperf import pretrain_recipe

    sys.exit(main(pretrain_recipe, default_size="8b"))
