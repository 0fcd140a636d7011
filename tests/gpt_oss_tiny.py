"""A tiny GPT-OSS Hugging Face checkpoint, made here (no download).

Sizes differ from each other (hidden 64, expert width 96, head 16) so a
transposed or misplaced tensor cannot go unnoticed; the 8-token window
is shorter than the test sequences; YaRN keeps gpt-oss-20b's settings.
"""

from pathlib import Path

import torch

from coom_nemo.tiny import make_tokenizer, write_finetuning_data  # noqa: F401

# Shapes besides the default: top-1 routing (megatron-core refuses it
# without pre-softmax), odd head counts, GQA 3, 3 layers.
SHAPES = {
    "default": {},
    "top1_odd_heads": dict(num_hidden_layers=3, num_local_experts=5, num_experts_per_tok=1,
                           hidden_size=48, intermediate_size=40, head_dim=8,
                           num_attention_heads=9, num_key_value_heads=3, sliding_window=6),
    "top3_of_6": dict(num_local_experts=6, num_experts_per_tok=3, num_attention_heads=5,
                      num_key_value_heads=5, head_dim=12),
}


def make_tiny_gpt_oss(directory: Path, seed: int = 0, shape: str = "default") -> Path:
    """A random tiny GptOssForCausalLM (fp32) and its tokenizer."""
    from transformers import GptOssConfig, GptOssForCausalLM

    directory = Path(directory)
    fields = dict(
        num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2, vocab_size=384,
        hidden_size=64, intermediate_size=96, head_dim=16, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=8)
    config = GptOssConfig(**{**fields, **SHAPES[shape]}, dtype=torch.float32,
                          eos_token_id=0, bos_token_id=0, pad_token_id=0)
    torch.manual_seed(seed)
    model = GptOssForCausalLM(config).float()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.1 * torch.randn_like(param))
            else:  # every bias and sink non-zero, so each mapping counts
                param.normal_(0.0, 0.1)
    model.save_pretrained(directory)
    make_tokenizer(directory)
    return directory


def hf_logits(directory: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import GptOssForCausalLM

    model = GptOssForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                              attn_implementation="eager").eval()
    with torch.no_grad():
        return model(tokens).logits
