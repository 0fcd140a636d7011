"""Shared pieces of the growth tests: random source checkpoints and
the logits of a checkpoint on a fixed batch."""

import zlib

import fiddle as fdl
import torch

from coom_nemo import grow


def randomize(module, salt=lambda name, p: "") -> None:
    """Every parameter random, norms around 1 and biases off zero; the
    same name and ``salt(name, p)`` give the same values."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            g = torch.Generator().manual_seed(zlib.crc32(f"{salt(name, p)}{name}".encode()))
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            scale = 0.5 if "word_embeddings" in name else 0.08
            value = noise * scale + (1.0 if "norm" in name else 0.0)
            p.copy_(value.to(p.dtype))
        for name, b in module.named_buffers():
            if name.endswith("expert_bias"):
                g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
                b.copy_(torch.randn(b.shape, generator=g) * 0.05)


def make_source(model_config, path) -> None:
    """Write a random fp32 checkpoint of ``model_config`` (a
    run.Config of a coom model, e.g. llama31_model("debug"))."""
    model = fdl.build(model_config)
    grow._fp32(model.config)
    with grow.on_this_host():
        trainer = grow._trainer_for(model)
        randomize(model.module)
        path.mkdir(parents=True)
        grow.save_model(trainer, path)


def batch(vocab: int = 1024, length: int = 24):
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, vocab, (2, length), generator=g)
    positions = torch.arange(length).expand(2, -1)
    return tokens, positions


def head_logits(path):
    """Logits of the main head, then of every MTP head, on
    :func:`batch`, and the full state dict, of the checkpoint at
    ``path``."""
    with grow.on_this_host():
        model = grow.load_model(path)
        module = model.module
        module.eval()
        # every output_layer call (the MTP heads, then the main one),
        # copied: megatron-core's cross entropy works in place on them
        heads = []
        module.output_layer.register_forward_hook(lambda m, i, o: heads.append(o[0].clone()))
        tokens, positions = batch()
        with torch.no_grad():  # labels: megatron-core's MTP needs them
            module(tokens, positions, attention_mask=None, labels=tokens)
        logits = heads[-1:] + heads[:-1]
        state = {k: v.detach().clone() for k, v in module.state_dict().items()
                 if torch.is_tensor(v)}
    return logits, state, model.config
