"""Registered recipes.

``nemo llm pretrain --factory <name>`` finds these through the
``nemo_run.cli`` entry point, which imports this package.
"""

from coom_nemo.recipes import (
    deepseek,
    gpt_oss_20b,
    llama31_8b_mlperf,
    llama31_405b,
    llama31_finetune,
)

FACTORIES = {
    "coom_llama31_405b": llama31_405b.pretrain_recipe,
    "coom_llama31_8b_mlperf": llama31_8b_mlperf.pretrain_recipe,
    "coom_gpt_oss_20b": gpt_oss_20b.pretrain_recipe,
    "coom_gpt_oss_20b_gated": gpt_oss_20b.pretrain_recipe_gated,
    "coom_deepseek": deepseek.pretrain_recipe,
    "coom_deepseek_v3": deepseek.pretrain_recipe_v3,
}

# Fine-tuning from an imported checkpoint (``nemo llm finetune``).
FINETUNE_FACTORIES = {
    "coom_gpt_oss_20b_lora": gpt_oss_20b.lora_recipe,
    "coom_gpt_oss_20b_sft": gpt_oss_20b.sft_recipe,
    **llama31_finetune.FACTORIES,
    "coom_deepseek_16b_lora": deepseek.lora_recipe_16b,
    "coom_deepseek_16b_sft": deepseek.sft_recipe_16b,
    "coom_deepseek_v3_lora": deepseek.lora_recipe_v3,
    "coom_deepseek_v3_sft": deepseek.sft_recipe_v3,
}
