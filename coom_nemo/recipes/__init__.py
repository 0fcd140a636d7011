"""Registered recipes.

``nemo llm pretrain --factory <name>`` finds these through the
``nemo_run.cli`` entry point, which imports this package.
"""

from coom_nemo.recipes import deepseek, gpt_oss_20b, llama31_405b

FACTORIES = {
    "coom_llama31_405b": llama31_405b.pretrain_recipe,
    "coom_gpt_oss_20b": gpt_oss_20b.pretrain_recipe,
    "coom_deepseek": deepseek.pretrain_recipe,
    "coom_deepseek_v3": deepseek.pretrain_recipe_v3,
}
