"""Tiny Hugging Face models, tokenizer and fine-tuning data, made here
(nothing is downloaded): what the tests and the README's fine-tuning
walk-through start from.

  python -m coom_nemo.tiny OUTPUT

writes ``OUTPUT/hf`` (a random Llama 3.1-shaped ``LlamaForCausalLM``
with a byte-level BPE tokenizer and a chat template),
``OUTPUT/chat`` and ``OUTPUT/instructions`` (``training.jsonl`` and
``validation.jsonl`` in the two record forms
:func:`coom_nemo.data.sft_data` reads).
"""

from __future__ import annotations

import argparse
import json
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

# Shapes unlike any preset's: odd head count, GQA 2, head_dim apart
# from hidden / heads, so a transposed or misplaced tensor shows.
LLAMA_SHAPE = dict(num_hidden_layers=2, hidden_size=48, intermediate_size=80,
                   num_attention_heads=6, num_key_value_heads=3, head_dim=10, vocab_size=384)


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


def randomize(model, seed: int = 0) -> None:
    """Every weight random: norms near 1, the rest N(0, 0.1), so a
    tensor left at its initial value changes the logits."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=param.dtype)
            param.copy_(1 + 0.1 * noise if "norm" in name else 0.1 * noise)


def llama_config(**shape):
    """A Llama 3.1 ``LlamaConfig`` (llama3 RoPE scaling, fp32) of
    ``LLAMA_SHAPE`` with ``shape``'s changes."""
    from transformers import LlamaConfig

    fields = dict(LLAMA_SHAPE, max_position_embeddings=256, rope_theta=500_000.0,
                  rms_norm_eps=1e-5, tie_word_embeddings=False, dtype=torch.float32,
                  bos_token_id=0, eos_token_id=0, pad_token_id=0,
                  # a short original context: the scaling moves more
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
    return LlamaConfig(**{**fields, **shape})


def make_tiny_llama(directory: Path, seed: int = 0, **shape) -> Path:
    """A random tiny ``LlamaForCausalLM`` (fp32) and its tokenizer."""
    from transformers import LlamaForCausalLM

    directory = Path(directory)
    model = LlamaForCausalLM(llama_config(**shape)).float()
    randomize(model, seed)
    model.save_pretrained(directory)
    make_tokenizer(directory)
    return directory


def write_finetuning_data(directory: Path, chat: bool) -> Path:
    """training.jsonl and validation.jsonl asking for STORIES, as chat
    records or as instruction records."""
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", help="new directory to write")
    args = parser.parse_args(argv)
    output = Path(args.output)
    if output.exists():
        parser.error(f"output: {output} already exists; give a new directory")
    make_tiny_llama(output / "hf")
    write_finetuning_data(output / "chat", chat=True)
    write_finetuning_data(output / "instructions", chat=False)
    print(f"wrote {output}/hf, {output}/chat, {output}/instructions")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
