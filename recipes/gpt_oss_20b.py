"""Launch the gpt_oss_20b recipe; see ``--help``."""

import sys

from coom_nemo import console

# Framework output from here on goes to the run's log file, also in
# helper processes that re-import this file (multiprocessing's spawn
# runs it as __mp_main__); see coom_nemo/console.py.
if __name__ in ("__main__", "__mp_main__"):
    console.start(main=__name__ == "__main__")

if __name__ == "__main__":
    # Imported here, not at the top: checkpoint writers start processes
    # that re-import this file, and they need none of it.
    from coom_nemo.launch import main
    from coom_nemo.recipes.gpt_oss_20b import pretrain_recipe

    sys.exit(main(pretrain_recipe, default_size="20b"))
