"""A tiny GPT-OSS Hugging Face checkpoint, made here (no download).

Sizes differ from each other (hidden 64, expert width 96, head 16) so a
transposed or misplaced tensor cannot go unnoticed; the 8-token window
is shorter than the test sequences; YaRN keeps gpt-oss-20b's settings.
"""

from pathlib import Path

import torch

STORIES = [
    "Once upon a time there was a little dog named Max. Max liked to run in the park.",
    "One day a girl called Lily found a red ball. She gave the ball to her friend Tom.",
    "The sun was warm and the birds sang. Tom and Lily played until it was dark.",
    "Max was tired after the long walk. He slept under the big green tree.",
]


# Marks the assistant turns ({% generation %}) so that chat fine-tuning
# counts the loss on them only.
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}"
    "{{ m['content'] }}<|endoftext|>{% endgeneration %}"
    "{% else %}{{ m['role'] }}: {{ m['content'] }}\n{% endif %}{% endfor %}"
)


def make_tokenizer(directory: Path, vocab_size: int = 384):
    """Byte-level BPE trained on STORIES, with a chat template, saved in
    HF form."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(STORIES * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)
    return fast


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


def write_finetuning_data(directory: Path, chat: bool) -> Path:
    """training.jsonl and validation.jsonl asking for STORIES, as chat
    records or as instruction records."""
    import json

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    records = []
    for i, story in enumerate(STORIES):
        prompt = f"Tell me story number {i}."
        if chat:
            records.append({"messages": [{"role": "user", "content": prompt},
                                         {"role": "assistant", "content": story}]})
        else:
            records.append({"input": prompt, "output": story})
    for name, rows in (("training.jsonl", records * 8), ("validation.jsonl", records)):
        with open(directory / name, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    return directory
